"""Send JSON batches to nftables: through libnftables (ctypes) or, failing that, ``nft -j -f -``.

Threads and namespaces (the trap this module exists to contain)
---------------------------------------------------------------
An ``nft_ctx`` is not thread-safe, and the netlink socket it talks through belongs to the network
namespace of the thread that opened it. So ``LibNft`` owns one dedicated worker thread (a
single-worker executor): the thread enters the requested netns with ``setns(2)`` (Python 3.11 has
no ``os.setns``), creates the context, and then runs every command of this ``LibNft`` and
nothing else. ``setns`` moves only the calling thread, and this thread is ours alone, so the event
loop and the shared executors never change namespace. ctypes releases the GIL around the C call,
so a large batch does not stall the loop.

A batch is one JSON document ``{"nftables": [metainfo, *commands]}``; libnftables turns it into
one netlink transaction, which the kernel applies entirely or not at all.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from plexus.dataplane.nft._json import FAMILY, TABLE, Json
from plexus.errors import DataplaneError, Unsupported

LIBRARY = "libnftables.so.1"
METAINFO: Json = {"metainfo": {"json_schema_version": 1}}
LIST_TABLE: Json = {"list": {"table": {"family": FAMILY, "name": TABLE}}}
LIST_TABLES: Json = {"list": {"tables": {"family": FAMILY}}}
EMPTY: Json = {"nftables": []}

# include/nftables/libnftables.h
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_HANDLE = 1 << 3
NFT_CTX_OUTPUT_JSON = 1 << 4
CLONE_NEWNET = 0x40000000



class Nft(Protocol):
    """One way of talking to nftables in one network namespace."""

    async def run(self, cmds: list[Json]) -> Json: ...
    def run_sync(self, cmds: list[Json]) -> Json: ...
    def run_text_sync(self, text: str) -> None:
        """Commands in nft's own syntax, one transaction: for what its JSON cannot say (in
        nft 1.0.6, a rule that updates a map from the packet path)."""
    async def list_table(self) -> Json: ...
    def list_table_sync(self) -> Json: ...
    def close(self) -> None: ...


def open_nft(netns: str | None = None, *, library: str = LIBRARY) -> Nft:
    """libnftables if it loads, else the ``nft`` command; Unsupported if neither exists."""
    try:
        return LibNft(netns, library=library)
    except Unsupported:
        if shutil.which("nft") is None:
            raise
        return NftCli(netns)


def netns_path(netns: str | None) -> str | None:
    """A netns given by name (``ip netns``) or by path."""
    if netns is None or "/" in netns:
        return netns
    return f"/run/netns/{netns}"


def document(cmds: list[Json]) -> str:
    return json.dumps({"nftables": [METAINFO, *cmds]}, separators=(",", ":"))


def parse_output(text: str) -> Json:
    text = text.strip()
    return json.loads(text) if text else {}


def _table_absent(listing: Json) -> bool:
    return not any(
        o.get("table", {}).get("name") == TABLE for o in listing.get("nftables", [])
    )


# -- libnftables ---------------------------------------------------------------------------------


class LibNft:
    """libnftables through ctypes, on one dedicated thread (see the module notes)."""

    def __init__(self, netns: str | None = None, *, library: str = LIBRARY) -> None:
        self._lib = _load(library)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plexus-nft")
        self._ctx: int | None = None
        try:
            self._ctx = self._pool.submit(self._open, netns_path(netns)).result()
        except BaseException:
            self._pool.shutdown(wait=True)
            raise

    async def run(self, cmds: list[Json]) -> Json:
        return await asyncio.wrap_future(self._pool.submit(self._run, cmds))

    def run_sync(self, cmds: list[Json]) -> Json:
        return self._pool.submit(self._run, cmds).result()

    def run_text_sync(self, text: str) -> None:
        self._pool.submit(self._run_text, text).result()

    async def list_table(self) -> Json:
        return await asyncio.wrap_future(self._pool.submit(self._list_table))

    def list_table_sync(self) -> Json:
        return self._pool.submit(self._list_table).result()

    def close(self) -> None:
        if self._ctx is not None:
            self._pool.submit(self._lib.nft_ctx_free, self._ctx).result()
            self._ctx = None
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LibNft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The methods below run on the worker thread only.

    def _open(self, netns: str | None) -> int:
        if netns is not None:
            _enter_netns(netns)
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise DataplaneError("nft_ctx_new failed")
        self._lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)
        return int(ctx)

    def _run(self, cmds: list[Json]) -> Json:
        if self._ctx is None:
            raise DataplaneError("nft context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, document(cmds).encode())
        # Always drain both buffers: libnftables rewinds a buffer only when it is read.
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise DataplaneError(f"nft: {err.strip() or f'error {rc}'}")
        return parse_output(out)

    def _run_text(self, text: str) -> None:
        """libnftables parses a buffer that is not JSON as nft's syntax, even in JSON mode."""
        if self._ctx is None:
            raise DataplaneError("nft context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
        self._lib.nft_ctx_get_output_buffer(self._ctx)
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise DataplaneError(f"nft: {err.strip() or f'error {rc}'}")

    def _list_table(self) -> Json:
        return _list_table(self._run)


def _load(library: str) -> Any:
    try:
        lib = ctypes.CDLL(library, use_errno=True)
    except OSError as e:
        raise Unsupported(f"{LIBRARY} not found: install the nftables package") from e
    ptr, cstr, uint = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint
    signatures: dict[str, tuple[list[Any], Any]] = {
        "nft_ctx_new": ([ctypes.c_uint32], ptr),
        "nft_ctx_free": ([ptr], None),
        "nft_ctx_output_set_flags": ([ptr, uint], None),
        "nft_ctx_buffer_output": ([ptr], ctypes.c_int),
        "nft_ctx_buffer_error": ([ptr], ctypes.c_int),
        "nft_ctx_get_output_buffer": ([ptr], cstr),
        "nft_ctx_get_error_buffer": ([ptr], cstr),
        "nft_run_cmd_from_buffer": ([ptr, cstr], ctypes.c_int),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _enter_netns(path: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise DataplaneError(f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _list_table(run: Callable[[list[Json]], Json]) -> Json:
    """``list table inet plexus``, or an empty listing if the table does not exist."""
    try:
        return run([LIST_TABLE])
    except DataplaneError:
        # Ask again rather than parse the (locale-dependent) error text.
        if _table_absent(run([LIST_TABLES])):
            return dict(EMPTY)
        raise


# -- nft command ---------------------------------------------------------------------------------


class NftCli:
    """The same interface over ``nft -j -f -`` (about 2 ms more per call; no library needed)."""

    def __init__(self, netns: str | None = None, *, nft: str = "nft") -> None:
        path = netns_path(netns)
        enter = ["nsenter", f"--net={path}"] if path is not None else []
        self._prefix = [*enter, nft]
        self._argv = [*self._prefix, "-j", "-f", "-"]

    async def run(self, cmds: list[Json]) -> Json:
        proc = await asyncio.create_subprocess_exec(
            *self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate(document(cmds).encode())
        return self._result(proc.returncode, out, err)

    def run_sync(self, cmds: list[Json]) -> Json:
        proc = subprocess.run(self._argv, input=document(cmds).encode(), capture_output=True)
        return self._result(proc.returncode, proc.stdout, proc.stderr)

    def run_text_sync(self, text: str) -> None:
        proc = subprocess.run([*self._prefix, "-f", "-"], input=text.encode(),
                              capture_output=True)
        self._result(proc.returncode, b"", proc.stderr)

    async def list_table(self) -> Json:
        try:
            return await self.run([LIST_TABLE])
        except DataplaneError:
            if _table_absent(await self.run([LIST_TABLES])):
                return dict(EMPTY)
            raise

    def list_table_sync(self) -> Json:
        return _list_table(self.run_sync)

    def close(self) -> None:
        pass

    @staticmethod
    def _result(rc: int | None, out: bytes, err: bytes) -> Json:
        if rc != 0:
            raise DataplaneError(f"nft: {err.decode().strip() or f'exit status {rc}'}")
        return parse_output(out.decode())

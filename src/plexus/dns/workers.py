"""DNS worker processes: N copies of ``DnsServer`` sharing each address with SO_REUSEPORT.

Why. A DNS server inside the agent shares one event loop (and one GIL) with the API, the
reconcilers and the datastore watch: a burst of lookups slows container starts, and a long
reconcile delays lookups. Workers take DNS out of the agent's loop and, on hosts with cores to
spare, multiply throughput (the kernel spreads queries over the sockets of one SO_REUSEPORT
group by the client's address and port).

How the agent talks to them. Each worker is ``python -m plexus.dns`` with its stdin and
stdout as a private channel of frames (4-byte length + pickle; both ends are ours). The parent
keeps the current table (its networks and endpoints in dicts, see ``RecordTable.sources``),
sends the whole of it once, when a worker starts, and from then on only the changes:

    ("hello", ServerOptions)                          once, first
    ("table", networks, endpoints, settings, gen)     the whole state: when the worker starts
                                                      (or restarts) and on a full load or a
                                                      settings change (``DnsService.load``);
                                                      networks by name, endpoints by key
    ("apply", DnsChanges, gen)                        every change (``DnsService.apply``): the
                                                      worker applies the delta to its own table,
                                                      O(size of the change)
    ("listeners", [ListenAddress, ...])               the full wanted set (level-triggered)
    ("stats",) / ("lookup", net, name, qtype, client) requests; every request gets one reply
                                                      frame, in order

Every table message carries the parent's generation, so that all workers give the same SOA
serials. (Before, every change sent the whole state and every worker rebuilt its table from it:
at 5,000 containers, ~3 MB of pickle and ~175 ms of rebuilding per worker per change.) Frames on
one pipe arrive in the order they were written, and a restarted worker's full table is written
after the last change the parent has applied, so a worker never misses or repeats a change.

Supervision. A worker that exits is restarted (backoff from 0.1 s to 5 s) and given the current
table and listeners; the others keep serving meanwhile, since the kernel moves its share of the
SO_REUSEPORT group to the remaining sockets. Workers ask the kernel for SIGTERM when the agent
dies (PR_SET_PDEATHSIG) and also exit when their stdin closes, so none outlives the agent. A
worker that falls too far behind (``_MAX_BACKLOG`` unread bytes) is killed and so restarted
from the full state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from plexus.dns.metrics import merge_stats
from plexus.dns.model import DnsChanges, Explanation
from plexus.dns.records import RecordTable
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions

log = logging.getLogger("plexus.dns")

_FRAME = struct.Struct("!I")
_MAX_FRAME = 256 * 1024 * 1024
_MAX_BACKLOG = 64 * 1024 * 1024  # unread updates queued for one worker before it is restarted
PR_SET_PDEATHSIG = 1


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _FRAME.unpack(await reader.readexactly(4))
    if size > _MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return pickle.loads(await reader.readexactly(size))


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


@dataclass(eq=False)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerPool:
    """The parent side: same verbs as ``DnsServer`` (update, set_listeners, stats, lookup)."""

    def __init__(self, count: int, options: ServerOptions | None = None,
                 python: str = sys.executable) -> None:
        base = options or ServerOptions()
        self.options = ServerOptions(**{**_fields(base), "reuse_port": True})
        self.count = count
        self.python = python
        self.table = RecordTable.empty()
        self._wanted: list[ListenAddress] = []
        self._workers = [_Worker(i) for i in range(count)]
        self._supervisors: list[asyncio.Task[None]] = []
        self._closing = False
        self._listen_errors: dict[int, list[str]] = {}

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)
            self._supervisors.append(asyncio.get_running_loop().create_task(
                self._supervise(worker)))

    async def close(self) -> None:
        self._closing = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for worker in self._workers:
            await _stop(worker.proc)

    def update(self, table: RecordTable) -> None:
        """A whole new table: every worker gets all of it."""
        self.table = table
        self._broadcast(_table_message(table))

    def apply(self, changes: DnsChanges) -> None:
        """Apply a change to the parent's table and send only the change to every worker."""
        self.table.apply(changes)
        self._broadcast(("apply", changes, self.table.generation))

    def _broadcast(self, message: Any) -> None:
        data = _frame(message)  # pickled once for all workers
        for worker in self._workers:
            self._send(worker, data)

    async def set_listeners(self, wanted: Sequence[ListenAddress]) -> list[str]:
        self._wanted = sorted(set(wanted))
        replies = await self._ask_all(("listeners", self._wanted))
        errors = sorted({e for r in replies if isinstance(r, list) for e in r})
        return errors

    async def stats(self) -> dict[str, Any]:
        replies = await self._ask_all(("stats",))
        merged = merge_stats([r for r in replies if isinstance(r, dict)])
        if merged:
            merged["listeners"] = sorted(set(merged.get("listeners", [])))
            merged["table"] = {"generation": self.table.generation,
                               "records": self.table.record_count(),
                               "networks": len(self.table.networks)}
        merged["workers"] = {"count": self.count, "alive": sum(
            1 for w in self._workers if w.proc and w.proc.returncode is None),
            "restarts": sum(w.restarts for w in self._workers), "pids": self.pids()}
        return merged

    async def lookup(self, network: str, name: str, qtype: int | str,
                     client: str | None) -> Explanation:
        reply: Any = RuntimeError("no dns worker is running")
        for worker in self._workers:  # the first one that is alive answers
            reply = await self._ask(worker, ("lookup", network, name, qtype, client))
            if isinstance(reply, Explanation):
                return reply
            if not isinstance(reply, RuntimeError):
                break
        raise reply if isinstance(reply, Exception) else RuntimeError(repr(reply))

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc and w.proc.returncode is None]

    # --- processes ---------------------------------------------------------------------------

    async def _spawn(self, worker: _Worker) -> None:
        worker.proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "plexus.dns", str(worker.index),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._send(worker, ("hello", self.options))
        self._send(worker, _table_message(self.table))
        if self._wanted:
            await self._ask(worker, ("listeners", self._wanted))
        worker.ready.set()

    async def _supervise(self, worker: _Worker) -> None:
        backoff = 0.1
        while not self._closing:
            assert worker.proc is not None
            started = asyncio.get_running_loop().time()
            code = await worker.proc.wait()
            if self._closing:
                return
            worker.ready.clear()
            worker.restarts += 1
            log.warning("dns worker %d exited (%s); restarting", worker.index, code)
            if asyncio.get_running_loop().time() - started > 30:
                backoff = 0.1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            with contextlib.suppress(OSError):
                await self._spawn(worker)

    def _send(self, worker: _Worker, message: Any) -> None:
        """Queue a message (or an already framed one) for one worker; never blocks."""
        proc = worker.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        if proc.stdin.transport.get_write_buffer_size() > _MAX_BACKLOG:
            log.error("dns worker %d does not read its updates; killing it", worker.index)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # the supervisor restarts it with the current state
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(message if isinstance(message, bytes) else _frame(message))

    async def _ask(self, worker: _Worker, message: Any, timeout: float = 10.0) -> Any:
        async with worker.lock:
            proc = worker.proc
            if proc is None or proc.stdout is None or proc.returncode is not None:
                return RuntimeError(f"dns worker {worker.index} is not running")
            self._send(worker, message)
            try:
                async with asyncio.timeout(timeout):
                    return await _read_frame(proc.stdout)
            except (TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                return RuntimeError(f"dns worker {worker.index}: {exc!r}")

    async def _ask_all(self, message: Any) -> list[Any]:
        return list(await asyncio.gather(*(self._ask(w, message) for w in self._workers)))


def _table_message(table: RecordTable) -> tuple[Any, ...]:
    networks, endpoints = table.sources
    return ("table", list(networks.values()), dict(endpoints), table.settings, table.generation)


def _fields(options: ServerOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


async def _stop(proc: asyncio.subprocess.Process | None, timeout: float = 3.0) -> None:
    if proc is None or proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


# --- the worker side -------------------------------------------------------------------------


async def _serve(stdin: asyncio.StreamReader, out: asyncio.StreamWriter) -> None:
    kind, options = await _read_frame(stdin)
    assert kind == "hello"
    server = DnsServer(options=options)
    await server.start()
    try:
        while True:
            try:
                message = await _read_frame(stdin)
            except asyncio.IncompleteReadError:
                return  # the agent went away
            if message[0] in ("table", "apply"):
                _install(server, message)  # no reply; a failure ends the worker (see below)
                continue
            reply = await _handle(server, message)
            out.write(_frame(reply))
            await out.drain()
    finally:
        await server.close()


def _install(server: DnsServer, message: tuple[Any, ...]) -> None:
    """Take a whole table or a change. Nothing is sent back, so a failure cannot be reported:
    it is logged and ends the worker, whose table may now be half-changed; the supervisor
    restarts it from the parent's full state."""
    try:
        if message[0] == "table":
            _, networks, endpoints, settings, generation = message
            server.update(RecordTable.build(networks, endpoints, settings, generation))
            # A table is tens of thousands of long-lived objects; without this the next full
            # collection would walk them all while queries wait (a p99 spike per update).
            gc.freeze()
        else:
            _, changes, generation = message
            server.apply(changes, generation)
    except Exception:
        log.exception("dns worker: %s failed; exiting to be restarted with the full table",
                      message[0])
        raise


async def _handle(server: DnsServer, message: tuple[Any, ...]) -> Any:
    kind = message[0]
    try:
        if kind == "listeners":
            return await server.set_listeners(message[1])
        if kind == "stats":
            return server.stats()
        if kind == "lookup":
            return await server.lookup(*message[1:])
    except Exception as exc:
        log.exception("dns worker: %s failed", kind)
        return exc
    return RuntimeError(f"unknown message {kind!r}")


async def _worker_main(channel: int) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=2**16)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(channel, "wb"))
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    serving = loop.create_task(_serve(stdin, out))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (serving, stopping):
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await serving


def main() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    logging.basicConfig(level=logging.WARNING, format="plexus-dns[%(process)d] %(message)s")
    # fd 1 is the channel to the agent: keep it private, and send stray output to stderr.
    channel = os.dup(1)
    os.dup2(2, 1)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_worker_main(channel))
    else:
        uvloop.run(_worker_main(channel))


"""The applier of ``table inet plexus_services`` (renderers: ``nft.lb``): the whole table, or one
batch per change; stale UDP conntrack entries forgotten; element counts read back.

It remembers the frontends the kernel holds (what it last applied), because a change must know
which backend chains and elements go away. A batch the kernel refuses applies nothing and leaves
that memory as it was; the caller's answer to a ``DataplaneError`` is ``replace``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Protocol

from plexus.dataplane.nft import lb as render
from plexus.dataplane.nft.libnft import Nft, netns_path
from plexus.errors import DataplaneError
from plexus.lb.model import Backend, Change, Frontend, index

CONNTRACK_TIMEOUT = 5.0  # seconds one `conntrack -D` may take


class ServiceKernel(Protocol):
    async def replace(self, frontends: Iterable[Frontend]) -> None:
        """Exactly ``frontends``, in one batch."""

    async def change(self, change: Change) -> None:
        """Only the frontends in ``change``, in one batch; DataplaneError if refused."""

    async def remove(self) -> None:
        """No table (no services)."""

    async def forget_udp(self, frontend: Frontend, backends: Iterable[Backend]) -> None:
        """Delete the UDP conntrack entries of ``frontend`` that lead to ``backends``."""

    async def sizes(self) -> dict[str, int] | None:
        """Elements per set or map, and "chains", as the kernel holds them (None: no table)."""


class ServiceTable:
    """``netns``: the namespace ``nft`` talks to, by name or path, for ``conntrack`` to work in
    the same one (None: the caller's)."""

    def __init__(self, nft: Nft, netns: str | None = None) -> None:
        self._nft = nft
        path = netns_path(netns)
        self._enter = [] if path is None else ["nsenter", f"--net={path}", "--"]
        self._held = index(())

    async def replace(self, frontends: Iterable[Frontend]) -> None:
        frontends = list(frontends)
        await self._nft.run(render.render_table(frontends))
        self._held = index(frontends)

    async def change(self, change: Change) -> None:
        if not change:
            return
        await self._nft.run(render.render_change(change, self._held))
        for f in change.removed:
            self._held.pop(f.key, None)
        self._held.update((f.key, f) for f in change.changed)

    async def remove(self) -> None:
        await self._nft.run(render.render_teardown())
        self._held = index(())

    async def forget_udp(self, frontend: Frontend, backends: Iterable[Backend]) -> None:
        """UDP has no end: a client that keeps sending to a VIP keeps its conntrack entry, and
        with it the backend it was DNATed to, long after that backend is gone (the stale-UDP
        problem of kube-proxy's users). The entries whose reply comes from a removed backend,
        for the VIP and for each published port, are deleted; the next datagram is a new
        connection and draws a live backend."""
        if frontend.proto != "udp":
            return
        for b in backends:
            reply = ["--reply-src", str(b.address), "--reply-port-src", str(b.port)]
            await self._conntrack_delete(["--orig-dst", str(frontend.vip),
                                     "--orig-port-dst", str(frontend.port), *reply])
            for p in frontend.published:
                where = [] if p.address is None else ["--orig-dst", str(p.address)]
                await self._conntrack_delete([*where, "--orig-port-dst", str(p.port), *reply])

    async def sizes(self) -> dict[str, int] | None:
        try:
            out = await self._nft.run([{"list": {"table": {"family": render.FAMILY,
                                                           "name": render.TABLE}}}])
        except DataplaneError:
            return None
        objs = list(out.get("nftables", []))
        if not any("table" in o for o in objs):
            return None
        sizes = {"chains": sum(1 for o in objs if "chain" in o)}
        for o in objs:
            for kind in ("set", "map"):
                body = o.get(kind)
                if isinstance(body, dict) and body["name"] in render.SETS:
                    sizes[str(body["name"])] = len(body.get("elem", []) or [])
        return sizes


    async def _conntrack_delete(self, filters: list[str]) -> None:
        """``conntrack -D -p udp FILTERS``; nothing matching is not an error."""
        proc = await asyncio.create_subprocess_exec(
            *self._enter, "conntrack", "-D", "-p", "udp", *filters,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), CONNTRACK_TIMEOUT)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""The applier of ``table inet plexus_services`` (renderers: ``nft.lb``, placement:
``nft.lb_slots``): the whole table, or one element transaction per change; stale UDP conntrack
and affinity entries forgotten; element counts read back.

Elements go over netlink (``setelem``): a change is one nf_tables transaction of just the
elements that differ, so it costs the same with 10 or 10,000 services. libnftables writes only
the fixed body and a shared pick chain the first time a frontend of its shape appears.

It remembers where each frontend sits (what it last applied). A transaction the kernel refuses
applies nothing and leaves that memory as it was; the caller's answer to a ``DataplaneError``
is ``replace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from typing import Any, Protocol

from plexus import gcpause
from plexus.dataplane.nft import lb as render
from plexus.dataplane.nft.lb_slots import Placement, Plan
from plexus.dataplane.nft.libnft import Nft, netns_path
from plexus.dataplane.nft.setelem import Change as ElementChange
from plexus.dataplane.nft.setelem import ElementChannel
from plexus.errors import DataplaneError
from plexus.lb.model import Backend, Change, Frontend

log = logging.getLogger(__name__)
CONNTRACK_TIMEOUT = 5.0  # seconds one `conntrack -D` may take
_PICK = re.compile(r"pick_(\d+)(?:_aff_(\d+))?$")


class ServiceKernel(Protocol):
    async def replace(self, frontends: Iterable[Frontend]) -> None:
        """Exactly ``frontends``, in one transaction."""

    async def change(self, change: Change) -> None:
        """Only the frontends in ``change``, in one transaction; DataplaneError if refused."""

    async def remove(self) -> None:
        """No table (no services)."""

    async def forget_udp(self, frontend: Frontend, backends: Iterable[Backend]) -> None:
        """Delete the UDP conntrack entries of ``frontend`` that lead to ``backends``."""

    async def intact(self) -> bool:
        """The table is there and holds as many frontend keys as were applied."""

    async def sizes(self) -> dict[str, int] | None:
        """Elements per set or map, and "chains", as the kernel holds them (None: no table)."""


class ServiceTable:
    """``netns``: the namespace ``nft`` talks to, by name or path, for the element channel and
    ``conntrack`` to work in the same one (None: the caller's)."""

    def __init__(self, nft: Nft, netns: str | None = None) -> None:
        self._nft = nft
        path = netns_path(netns)
        self._enter = [] if path is None else ["nsenter", f"--net={path}", "--"]
        self._channel = ElementChannel(path)
        self._placement = Placement()

    async def replace(self, frontends: Iterable[Frontend]) -> None:
        await asyncio.to_thread(self.replace_sync, list(frontends))

    def replace_sync(self, frontends: list[Frontend]) -> None:
        """A table of this layout in place: emptied and filled in one transaction, so that
        services never pause. Otherwise (none, or an older layout) built anew: body, then
        elements, then base chains."""
        placement = Placement()
        with gcpause.paused():
            plan = placement.everything(frontends)
        found = self._chains()
        fresh = found is None or render.LAYOUT not in found
        if fresh:
            if found is not None:
                log.info("services table of an older layout: replacing it")
            self._nft.run_text_sync(render.render_teardown() + render.render_body(hooked=False))
        chains = set() if fresh or found is None else found
        placement.chains = {_shape(c) for c in chains if _PICK.match(c)}
        self._add_chains(plan, placement)
        flush = [ElementChange(n, t, False, {}, how="flush") for n, t in render.SETS.items()]
        self._channel.send(render.FAMILY, render.TABLE, [*flush, *plan.elements])
        # Base chains last, and whenever one is missing (a first attempt that failed after the
        # body, or a chain deleted by hand): a table without them serves nothing.
        if not _hooked(chains):
            self._nft.run_text_sync(render.render_hooks())
        placement.commit(plan)
        self._placement = placement

    async def change(self, change: Change) -> None:
        if change:
            await asyncio.to_thread(self.change_sync, change)

    def change_sync(self, change: Change) -> None:
        plan = self._placement.plan(change)
        self._add_chains(plan, self._placement)
        self._channel.send(render.FAMILY, render.TABLE, plan.elements)
        self._placement.commit(plan)
        if plan.dead and self._placement.classes:
            try:
                self._forget_affinity(plan.dead)
            except DataplaneError as exc:  # the change is in: stale entries only age out
                log.warning("services: affinity entries of removed backends kept: %s", exc)

    async def remove(self) -> None:
        await asyncio.to_thread(self._nft.run_text_sync, render.render_teardown())
        self._placement = Placement()

    def _add_chains(self, plan: Plan, placement: Placement) -> None:
        missing = [s for s in plan.chains if s not in placement.chains]
        if missing:
            self._nft.run_text_sync("".join(render.render_pick(*s) for s in missing))
            placement.chains.update(missing)

    def _chains(self) -> set[str] | None:
        """The names of this table's chains; None if there is no table."""
        try:
            out = self._nft.run_sync([{"list": {"chains": {"family": render.FAMILY}}}])
        except DataplaneError:
            return None
        names = {str(c["name"]) for o in out.get("nftables", [])
                 if isinstance(c := o.get("chain"), dict) and c.get("table") == render.TABLE}
        return names or None

    def _forget_affinity(self, dead: set[int]) -> None:
        """Clients remembered with a backend that left: forgotten, so that their next
        connection draws again (the packet path cannot overwrite an entry it finds)."""
        for name in render.DYNAMIC:
            stale: dict[object, object] = {k: None for k, b in self._entries(name) if b in dead}
            if stale:
                self._channel.send(render.FAMILY, render.TABLE, [ElementChange(
                    name, render.SETS[name], False, stale, how="destroy")])

    def _entries(self, name: str) -> list[tuple[tuple[int, str | int], int]]:
        try:
            out = self._nft.run_sync([{"list": {"map": {
                "family": render.FAMILY, "table": render.TABLE, "name": name}}}])
        except DataplaneError:
            return []
        found = []
        for o in out.get("nftables", []):
            body = o.get("map")
            if isinstance(body, dict) and body.get("name") == name:
                found += [e for e in map(_entry, body.get("elem", []) or []) if e is not None]
        return found

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

    async def intact(self) -> bool:
        """Its base chains and pick chains are there, and the maps of frontend keys hold as
        many elements as were applied (counted without rendering them again)."""
        chains = await asyncio.to_thread(self._chains)
        wanted = {render.pick_chain(*shape) for shape in self._placement.chains}
        if chains is None or not _hooked(chains) or not wanted <= chains:
            return False
        sizes = await self.sizes(render.SIZED)
        return sizes is not None and sizes == {"chains": len(chains), **self._placement.keys()}

    async def sizes(self, names: Iterable[str] = tuple(render.SETS)) -> dict[str, int] | None:
        return await asyncio.to_thread(self._sizes, list(names))

    def _sizes(self, names: list[str]) -> dict[str, int] | None:
        chains = self._chains()
        if chains is None:
            return None
        sizes = {"chains": len(chains)}
        for name in names:
            kind = "set" if render.SETS[name].data is None else "map"
            try:
                out = self._nft.run_sync([{"list": {kind: {
                    "family": render.FAMILY, "table": render.TABLE, "name": name}}}])
            except DataplaneError:
                return None
            for o in out.get("nftables", []):
                body = o.get(kind)
                if isinstance(body, dict) and body.get("name") == name:
                    sizes[name] = len(body.get("elem", []) or [])
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

    def close(self) -> None:
        self._channel.close()


def _hooked(chains: set[str]) -> bool:
    return all(name in chains for name, *_ in render.HOOKS)


def _shape(chain: str) -> tuple[int, int]:
    m = _PICK.match(chain)
    assert m is not None
    return int(m.group(1)), int(m.group(2) or 0)


def _entry(elem: Any) -> tuple[tuple[int, str | int], int] | None:
    """((frontend id bits, client), backend number) of a listed affinity entry: the client an
    IPv4 address, or the 96 bits of an IPv6 one (``lb.CLIENT``) as nft lists them: a number,
    or a hex string beyond 64 bits (``setelem`` reads both)."""
    try:
        key, data = elem
        val = key["elem"]["val"] if isinstance(key, dict) and "elem" in key else key
        mark, client = val["concat"]
        return (int(mark), client if isinstance(client, int) else str(client)), int(data)
    except (TypeError, ValueError, KeyError):
        return None

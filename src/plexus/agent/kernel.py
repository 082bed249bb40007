"""Kernel events: the kernel telling the agent that something of plexus's changed under it.

The link reconciler programs a link and then trusts what it applied; this watcher is how it
learns otherwise, within milliseconds rather than at the next full pass. Only links this agent
owns count (its tag in the alias, or a legacy alias; another agent's links in the same namespace
are none of its business), and only what plexus would have to repair is acted on (the
reconciler forgets what it applied for that object and does it again, level-triggered):

- a link carrying this agent's alias was deleted: someone deleted it, or the container's namespace
  went away (the kernel destroys a veth with its namespace; the reconciler then finds the
  namespace gone and has the endpoint released);
- one was set down, or an endpoint's veth left its bridge;
- an address was deleted from a network's bridge (a gateway).

plexus's own changes come through here too. Deleting a link that is no longer wanted leaves
nothing to repair (nothing wants it). Creating one is several notifications in a row, with the
link briefly down or not yet on its bridge: a deletion is acted on at once, but "down" and "off
its bridge" only if the link is still so a moment later (``SETTLE``), asked of the kernel for that
one link. When events were lost (the kernel's buffer overran, or the agent fell behind), a full
pass runs instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from plexus.agent.reconcilers.links import LinkReconciler
from plexus.dataplane.events import (
    AddressChange,
    AddressEvent,
    KernelEvent,
    KernelEvents,
    LinkChange,
    LinkEvent,
    Resync,
    ResyncReason,
    owned_links_snapshot,
)
from plexus.dataplane.links import owned_by
from plexus.errors import PlexusError
from plexus.model import keys
from plexus.state.cache import Cache

log = logging.getLogger("plexus.kernel")
SETTLE = 0.1  # seconds a link may look down or bridgeless before it counts as drift

LinkState = Callable[[int], Awaitable[tuple[bool, int | None] | None]]
"""(up, master index) of a link now, None if it is gone."""


class KernelWatcher:
    def __init__(self, cache: Cache, links: LinkReconciler,
                 full_pass: Callable[[], Awaitable[object]], link_state: LinkState,
                 owner: str) -> None:
        self._cache = cache
        self._owner = owner
        self._links = links
        self._full_pass = full_pass
        self._link_state = link_state
        self._suspect: dict[int, str] = {}  # ifindex -> alias, to look at again after SETTLE
        self._settling: asyncio.Task[None] | None = None
        self._aliases: dict[int, str] = {}  # ifindex -> plexus alias, to place address events
        self._events: KernelEvents | None = None
        self._task: asyncio.Task[None] | None = None
        self.repairs = 0
        self.resyncs = 0

    async def start(self, events: KernelEvents) -> None:
        self._events = events
        await events.start()
        # Address events name only an interface index: learn which of plexus's links has which
        # (after subscribing, so a link made meanwhile is in the snapshot or in the events).
        for link in (await owned_links_snapshot(None, owner=self._owner)).values():
            if link.alias is not None:
                self._aliases[link.index] = link.alias
        self._task = asyncio.create_task(self._run(events), name="kernel-events")

    async def close(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
        if self._events is not None:
            self._events.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, events: KernelEvents) -> None:
        async for event in events:
            try:
                await self.handle(event)
            except PlexusError as exc:
                log.error("handling kernel event %s failed: %s", event, exc)

    async def handle(self, event: KernelEvent) -> None:
        if isinstance(event, Resync):
            if event.reason is not ResyncReason.START:  # start-up does a full pass anyway
                self.resyncs += 1
                log.warning("kernel events were lost (%s): running a full pass", event.reason)
                await self._full_pass()
        elif isinstance(event, LinkEvent):
            self._link(event)
        elif isinstance(event, AddressEvent):
            self._address(event)

    def _link(self, event: LinkEvent) -> None:
        link = event.link
        if link.alias is None or not owned_by(link.owner, self._owner):
            self._aliases.pop(link.index, None)  # not (or no longer) this agent's link
            return
        if event.change is LinkChange.DELETED:
            self._aliases.pop(link.index, None)
            self._repair(link.alias, f"link {link.ifname} was deleted")
            return
        self._aliases[link.index] = link.alias
        if not link.admin_up or (link.master is None and link.alias.startswith("ep:")):
            self._suspect[link.index] = link.alias
            if self._settling is None or self._settling.done():
                self._settling = asyncio.create_task(self._settle())

    async def _settle(self) -> None:
        """Look again at links that looked wrong: still down, or still off their bridge?"""
        await asyncio.sleep(SETTLE)
        suspects, self._suspect = self._suspect, {}
        for index, alias in suspects.items():
            try:
                state = await self._link_state(index)
            except PlexusError as exc:
                log.warning("looking at link %d again failed: %s", index, exc)
                continue
            if state is None:
                continue  # deleted meanwhile: its deletion event says so
            up, master = state
            if not up:
                self._repair(alias, f"link {index} is down")
            elif master is None and alias.startswith("ep:") and self._wants_master(alias):
                self._repair(alias, f"link {index} left its bridge")

    def _address(self, event: AddressEvent) -> None:
        alias = self._aliases.get(event.index, "")
        if event.change is AddressChange.DELETED and alias.startswith("net:"):
            self._repair(alias, f"address {event.address} was deleted from its bridge")

    def _wants_master(self, alias: str) -> bool:
        ep = self._cache.endpoint(self._endpoint_key(alias))
        return ep is not None and ep.state == "ready"

    def _endpoint_key(self, alias: str) -> str:
        container_id, _, ifname = alias[len("ep:"):].rpartition("/")
        return keys.endpoint(self._cache.node, container_id, ifname)

    def _repair(self, alias: str, why: str) -> None:
        """Hand the object named by ``alias`` back to the link reconciler, if it is wanted."""
        if alias.startswith("net:"):
            name = alias[len("net:"):]
            if self._cache.network(name) is None:
                return
            objects = ["net:" + name] + ["ep:" + e.store_key for e in self._cache.endpoints_on(name)
                                         if e.node == self._cache.node]
        elif alias.startswith("ep:"):
            key = self._endpoint_key(alias)
            if self._cache.endpoint(key) is None:
                return  # plexus deleted it: nothing wants it
            objects = ["ep:" + key]
        else:
            return
        self.repairs += 1
        log.info("%s: reconciling %s", why, ", ".join(objects[:3]))
        for key in objects:
            self._links.invalidate(key)

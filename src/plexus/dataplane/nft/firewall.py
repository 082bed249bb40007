"""The Firewall seam: what reconcilers call. ``NftFirewall`` is real; ``FakeFirewall``
(``plexus.testing``) keeps the state in memory.

The firewall reconciler calls ``change(delta, full)`` on every change, with only what changed
(``FirewallDelta``: publications added and removed, the network rules before and after), so a
change costs the same with 10 or 10,000 containers; ``sync(state)`` at start-up when ``current()``
differs from what it wants; and ``teardown()`` when the agent is removed. ``update(old, new)``
diffs two whole states (tests and tools).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from plexus.dataplane.nft import _json as j
from plexus.dataplane.nft.libnft import Nft
from plexus.dataplane.nft.readback import parse_table
from plexus.dataplane.nft.render import (
    render_net_delta,
    render_pub_delta,
    render_table,
    render_teardown,
    render_update,
)
from plexus.dataplane.nft.state import FirewallState, NetRule, Publication
from plexus.errors import DataplaneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FirewallDelta:
    """What one batch of changes does to the firewall. The network rules are passed whole
    (networks are few, and their interval sets merge neighbours); publications as differences."""

    old_nets: tuple[NetRule, ...] = ()
    new_nets: tuple[NetRule, ...] = ()
    added: frozenset[Publication] = field(default_factory=frozenset)
    removed: frozenset[Publication] = field(default_factory=frozenset)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.old_nets != self.new_nets)


@runtime_checkable
class Firewall(Protocol):
    async def sync(self, state: FirewallState) -> None:
        """Make the kernel hold exactly ``state`` (one atomic batch that replaces the table)."""

    async def update(self, old: FirewallState, new: FirewallState) -> None:
        """Apply the element differences; replace the whole table if the delta cannot apply."""

    async def change(self, delta: FirewallDelta, full: Callable[[], FirewallState]) -> bool:
        """Apply ``delta`` as one element batch. If the kernel refuses it (it does not hold what
        the delta starts from), replace the table with ``full()`` instead and return False."""

    async def teardown(self) -> None:
        """Remove everything plexus put there; fine if it is already gone."""

    async def current(self) -> FirewallState | None:
        """What the kernel holds, or None if there is no table of the shape this code writes."""


class NftFirewall:
    def __init__(self, nft: Nft) -> None:
        self._nft = nft
        # A delta is only right against the state before it: changes go to the kernel one at a
        # time, in the order they were asked for.
        self._lock = asyncio.Lock()

    async def sync(self, state: FirewallState) -> None:
        async with self._lock:
            await self._nft.run(render_table(state))

    async def update(self, old: FirewallState, new: FirewallState) -> None:
        cmds = render_update(old, new)
        if not cmds:
            return
        async with self._lock:
            try:
                await self._nft.run(cmds)
                return
            except DataplaneError as e:
                # The kernel did not hold ``old`` (table flushed or replaced, elements edited
                # by hand, an older layout): nothing was applied, so replace the table instead.
                log.warning("firewall delta failed, replacing the table: %s", e.message)
            await self._nft.run(render_table(new))

    async def change(self, delta: FirewallDelta, full: Callable[[], FirewallState]) -> bool:
        nets = [] if delta.old_nets == delta.new_nets else render_net_delta(delta.old_nets,
                                                                             delta.new_nets)
        cmds = [*nets, *render_pub_delta(delta.added, delta.removed)]
        if not cmds:
            return True
        async with self._lock:
            try:
                await self._nft.run(cmds)
                return True
            except DataplaneError as e:
                log.warning("firewall delta failed, replacing the table: %s", e.message)
            await self._nft.run(render_table(full()))
            return False

    async def teardown(self) -> None:
        async with self._lock:
            await self._nft.run(render_teardown())

    async def current(self) -> FirewallState | None:
        listing = await self._nft.list_table()
        # Parsing 10,000 elements takes tens of milliseconds of Python: off the event loop.
        return await asyncio.to_thread(parse_table, listing)

    async def counters(self) -> dict[str, tuple[int, int]]:
        """The table's named counters (``render.DROP_COUNTERS``): name -> (packets, bytes);
        empty when the table is absent."""
        try:
            out = await self._nft.run([{"list": {"counters": {"family": j.FAMILY,
                                                               "table": j.TABLE}}}])
        except DataplaneError:
            return {}
        found: dict[str, tuple[int, int]] = {}
        for o in out.get("nftables", []):
            c = o.get("counter")
            if isinstance(c, dict) and c.get("table") == j.TABLE:
                found[str(c["name"])] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        return found

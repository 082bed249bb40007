"""The Firewall seam: what reconcilers call. ``NftFirewall`` is real, ``FakeFirewall`` is memory.

A reconciler computes ``firewall_state(networks, endpoints)`` and calls ``update(old, new)`` on
every change, ``sync(state)`` at start-up (or whenever ``current()`` differs from what it wants),
and ``teardown()`` when the agent is removed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal, Protocol, runtime_checkable

from plexus.dataplane.nft.libnft import Nft
from plexus.dataplane.nft.readback import parse_table
from plexus.dataplane.nft.render import render_table, render_teardown, render_update
from plexus.dataplane.nft.state import FirewallState
from plexus.errors import DataplaneError, PlexusError

log = logging.getLogger(__name__)


@runtime_checkable
class Firewall(Protocol):
    async def sync(self, state: FirewallState) -> None:
        """Make the kernel hold exactly ``state`` (one atomic batch that replaces the table)."""

    async def update(self, old: FirewallState, new: FirewallState) -> None:
        """Apply the element differences; replace the whole table if the delta cannot apply."""

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

    async def teardown(self) -> None:
        async with self._lock:
            await self._nft.run(render_teardown())

    async def current(self) -> FirewallState | None:
        return parse_table(await self._nft.list_table())


Call = Literal["sync", "update", "teardown"]


class FakeFirewall:
    """In-memory Firewall for unit tests: keeps the state and records every call.

    ``update`` behaves like the real one: a delta from a state the "kernel" does not hold falls
    back to a full sync (recorded as ``"sync"``). Set ``fail`` to make the next call raise it.
    """

    def __init__(self, state: FirewallState | None = None) -> None:
        self.state = None if state is None else state.canonical()
        self.calls: list[tuple[Call, FirewallState | None]] = []
        self.fail: PlexusError | None = None

    async def sync(self, state: FirewallState) -> None:
        self._raise_if_failing()
        self._record("sync", state.canonical())

    async def update(self, old: FirewallState, new: FirewallState) -> None:
        self._raise_if_failing()
        old, new = old.canonical(), new.canonical()
        if old == new:
            return
        self._record("update" if self.state == old else "sync", new)

    async def teardown(self) -> None:
        self._raise_if_failing()
        self._record("teardown", None)

    async def current(self) -> FirewallState | None:
        self._raise_if_failing()
        return self.state

    @property
    def syncs(self) -> int:
        return sum(1 for kind, _ in self.calls if kind == "sync")

    def _record(self, kind: Call, state: FirewallState | None) -> None:
        self.state = state
        self.calls.append((kind, state))

    def _raise_if_failing(self) -> None:
        error, self.fail = self.fail, None
        if error is not None:
            raise error

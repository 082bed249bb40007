"""FakeFirewall: the Firewall seam in memory, for unit tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from plexus.dataplane.nft.firewall import FirewallDelta
from plexus.dataplane.nft.state import FirewallState
from plexus.errors import PlexusError

Call = Literal["sync", "update", "change", "teardown"]


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

    async def change(self, delta: FirewallDelta, full: Callable[[], FirewallState]) -> bool:
        """Like the kernel: a delta from a state the "kernel" does not hold fails, and the
        table is replaced with ``full()`` (recorded as ``"sync"``)."""
        self._raise_if_failing()
        if not delta:
            return True
        have = self.state
        if have is None or not delta.removed <= have.pubs or (
            have.nets != FirewallState(delta.old_nets).canonical().nets
        ):
            self._record("sync", full().canonical())
            return False
        pubs = (have.pubs - delta.removed) | delta.added
        self._record("change", FirewallState(delta.new_nets, pubs).canonical())
        return True

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

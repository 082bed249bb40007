"""An in-memory ``ServiceKernel`` (``agent.reconcilers.lb``): the table as a dict of frontends,
every call recorded."""

from __future__ import annotations

from collections.abc import Iterable

from plexus.lb.model import Backend, Change, Frontend, Proto
from plexus.model.types import IPAddress

Key = tuple[IPAddress, Proto, int]


class FakeServiceKernel:
    """The table as a dict of frontends; every call recorded."""

    def __init__(self) -> None:
        self.table: dict[Key, Frontend] | None = None
        self.calls: list[tuple[str, object]] = []

    async def replace(self, frontends: Iterable[Frontend]) -> None:
        self.table = {f.key: f for f in frontends}
        self.calls.append(("replace", sorted(self.table, key=str)))

    async def change(self, change: Change) -> None:
        assert self.table is not None
        for f in change.removed:
            del self.table[f.key]
        for f in change.changed:
            self.table[f.key] = f
        self.calls.append(("change", change))

    async def remove(self) -> None:
        self.table = None
        self.calls.append(("remove", None))

    async def forget_udp(self, frontend: Frontend, backends: Iterable[Backend]) -> None:
        self.calls.append(("forget_udp", (frontend.key, tuple(backends))))

    async def intact(self) -> bool:
        return self.table is not None

    async def sizes(self) -> dict[str, int] | None:
        return None if self.table is None else {"frontends": len(self.table)}

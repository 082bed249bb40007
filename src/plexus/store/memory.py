"""An in-memory Datastore: the unit tests' store, and a typed test double for other packages.

It runs the same engine as ``SqliteStore`` (``_engine``, ``_common``, ``_watch``), so a test
that passes here exercises the same revision, compare, lease and watch semantics.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from plexus.errors import RevisionCompacted
from plexus.store._engine import Clock, Engine
from plexus.store.base import Event, KeyValue


@dataclass(slots=True)
class _Lease:
    ttl: float
    expiry: float


class _MemoryStorage:
    """Dicts, a revision counter and a bounded event log. Nothing here can fail half-way:
    the engine checks a change before writing, so no undo log is needed."""

    def __init__(self, history: int) -> None:
        self._kv: dict[str, KeyValue] = {}
        self._by_lease: dict[int, set[str]] = {}
        self._leases: dict[int, _Lease] = {}
        self._last_lease = 0
        self._revision = 0
        self._log: deque[tuple[int, list[Event]]] = deque()
        self._history = history
        self._compacted = 0  # events of revisions <= this are gone

    # -- KeySpace --------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        return self._kv.get(key)

    def range(self, prefix: str) -> list[KeyValue]:
        return [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]

    def write(self, kv: KeyValue) -> None:
        self.remove(kv.key)
        self._kv[kv.key] = kv
        if kv.lease:
            self._by_lease.setdefault(kv.lease, set()).add(kv.key)

    def remove(self, key: str) -> None:
        old = self._kv.pop(key, None)
        if old is not None and old.lease:
            self._by_lease[old.lease].discard(key)

    def lease_exists(self, lease: int) -> bool:
        return lease in self._leases

    def lease_keys(self, lease: int) -> list[KeyValue]:
        return [self._kv[k] for k in sorted(self._by_lease.get(lease, ()))]

    def drop_lease(self, lease: int) -> None:
        self._leases.pop(lease, None)
        self._by_lease.pop(lease, None)

    # -- Storage ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        yield  # one event loop, no await inside: see _engine

    snapshot = transaction

    def revision(self) -> int:
        return self._revision

    def commit_revision(self, revision: int, events: Sequence[Event]) -> None:
        self._revision = revision
        self._log.append((revision, list(events)))
        while len(self._log) > self._history:
            self._compacted, _ = self._log.popleft()

    def history(self, prefix: str, start: int) -> list[Event]:
        if max(start, 1) <= self._compacted:
            raise RevisionCompacted(f"history starts after revision {self._compacted}")
        return [
            e
            for revision, events in self._log
            if revision >= start
            for e in events
            if e.kv.key.startswith(prefix)
        ]

    def due_leases(self, now: float) -> list[int]:
        return sorted(id_ for id_, lease in self._leases.items() if lease.expiry <= now)

    def add_lease(self, ttl: float, expiry: float) -> int:
        self._last_lease += 1  # never reused: a stale holder must not refresh someone else's
        self._leases[self._last_lease] = _Lease(ttl, expiry)
        return self._last_lease

    def extend_lease(self, lease: int, now: float) -> bool:
        found = self._leases.get(lease)
        if found is None or found.expiry <= now:
            return False
        found.expiry = now + found.ttl
        return True

    def close(self) -> None:
        pass


class MemoryStore(Engine):
    """A Datastore in memory. ``history``: how many revisions of events watches can replay;
    ``clock``: seconds for lease expiry (tests pass a fake one to skip time)."""

    def __init__(
        self,
        *,
        history: int = 10_000,
        watch_buffer: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(_MemoryStorage(history), clock, watch_buffer)

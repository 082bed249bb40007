"""The Datastore verbs on top of a ``Storage``; MemoryStore and SqliteStore differ only there.

Every method runs synchronously on the event-loop thread, without an ``await`` between reading
and writing: within one process that alone makes each call atomic, so 50 tasks racing to
create a key cannot interleave. ``Storage.transaction`` adds what one process cannot see --
all-or-nothing against crashes and other processes (SQLite).

Leases expire lazily: every call first deletes the keys of leases that are due, as its own
revision, inside the same storage transaction as the call's own change. ``expire_leases`` does
the same with no change, for a caller that wants expiry (and its DELETE events) on time even
while nobody else is calling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from plexus.errors import InvalidArgument, NotFound, StoreError
from plexus.store._common import Applied, KeySpace, check_txn, revoke_leases, run_txn
from plexus.store._watch import WatchHub
from plexus.store.base import Compare, Delete, Event, KeyValue, Op, Put, TxnResult

Clock = Callable[[], float]


class Storage(KeySpace, Protocol):
    """Where a backend keeps keys, leases, the revision and the event history."""

    def transaction(self) -> AbstractContextManager[None]:
        """One all-or-nothing write transaction."""
        ...

    def snapshot(self) -> AbstractContextManager[None]:
        """Reads inside see one revision."""
        ...

    def revision(self) -> int: ...

    def commit_revision(self, revision: int, events: Sequence[Event]) -> None:
        """Makes ``revision`` current, keeps ``events`` as its history, forgets the oldest."""
        ...

    def history(self, prefix: str, start: int) -> list[Event]:
        """Events under ``prefix`` from revision ``start`` on; raises ``RevisionCompacted``."""
        ...

    def due_leases(self, now: float) -> list[int]: ...

    def add_lease(self, ttl: float, expiry: float) -> int: ...

    def extend_lease(self, lease: int, now: float) -> bool:
        """Moves a live lease's expiry to ``now + ttl``; False if it is gone or expired."""
        ...

    def close(self) -> None: ...


Change = Callable[[KeySpace, int], Applied]
"""Runs inside a transaction, as if committed at the given revision."""


def _no_change(space: KeySpace, revision: int) -> Applied:
    return Applied()


@dataclass(frozen=True, slots=True)
class _Outcome:
    applied: Applied
    revision: int
    expired: int  # leases that expired on the way


class Engine:
    """Implements ``plexus.store.base.Datastore`` (plus ``expire_leases``) over a Storage."""

    def __init__(self, storage: Storage, clock: Clock, watch_buffer: int) -> None:
        self._storage = storage
        self._clock = clock
        self._hub = WatchHub(storage.history, watch_buffer)
        self._closed = False

    async def get(self, key: str) -> KeyValue | None:
        self._expire_due()
        with self._storage.snapshot():
            return self._storage.get(key)

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        self._expire_due()
        with self._storage.snapshot():
            return self._storage.range(prefix), self._storage.revision()

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        return (await self.txn((), [Put(key, value, lease)])).revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        return len(self._run_txn((), [Delete(key, prefix)], ()).applied.events)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        outcome = self._run_txn(compares, success, failure)
        return TxnResult(outcome.applied.succeeded, outcome.revision, outcome.applied.responses)

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """See ``Datastore.watch``. ``RevisionCompacted`` is raised on the first iteration,
        or later if a consumer falls behind by more than the history window.

        ``start_revision`` is read literally (``mod_revision >= start``): 0 or 1 replay all
        the history there is. etcd reads 0 as "from now"; its backend must pass max(start, 1).
        """
        return self._hub.watch(prefix, start_revision)

    async def revision(self) -> int:
        self._expire_due()
        with self._storage.snapshot():
            return self._storage.revision()

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise InvalidArgument("ttl", ttl, "must be a positive number of seconds")
        self._check_open()
        with self._storage.transaction():
            return self._storage.add_lease(ttl, self._clock() + ttl)

    async def refresh_lease(self, lease: int) -> None:
        self._expire_due()  # an expired lease loses its keys now, whatever the caller does
        with self._storage.transaction():
            alive = self._storage.extend_lease(lease, self._clock())
        if not alive:
            raise NotFound(f"lease {lease} not found (expired or revoked)")

    async def revoke_lease(self, lease: int) -> None:
        """Deletes the lease's keys. Revoking an unknown or expired lease is not an error:
        like every delete verb in plexus it is idempotent (etcd would say "not found")."""
        self._mutate(lambda space, rev: Applied(events=revoke_leases(space, [lease], rev)))

    async def expire_leases(self) -> int:
        """Expires every due lease now (deleting its keys); returns how many expired."""
        return self._mutate(_no_change).expired

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.close()
            self._storage.close()

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _run_txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> _Outcome:
        check_txn(compares, success, failure)
        return self._mutate(lambda space, rev: run_txn(space, rev, compares, success, failure))

    def _expire_due(self) -> None:
        self._check_open()
        with self._storage.snapshot():
            due = self._storage.due_leases(self._clock())
        if due:
            self._mutate(_no_change)

    def _mutate(self, change: Change) -> _Outcome:
        """Expires due leases, then runs ``change``: one storage transaction, two revisions at
        most. A refused change (``Applied.error``) wrote nothing; the expiry still commits."""
        self._check_open()
        storage = self._storage
        with storage.transaction():
            revision = storage.revision()
            due = storage.due_leases(self._clock())
            expired = revoke_leases(storage, due, revision + 1)
            revision = self._commit(revision, expired)
            applied = change(storage, revision + 1)
            revision = self._commit(revision, applied.events)
        self._hub.publish(expired)
        self._hub.publish(applied.events)
        if applied.error is not None:
            raise applied.error
        return _Outcome(applied, revision, len(due))

    def _commit(self, revision: int, events: Sequence[Event]) -> int:
        if not events:
            return revision
        self._storage.commit_revision(revision + 1, events)
        return revision + 1

"""A datastore that times its round trips: the ``Datastore`` it wraps, plus one histogram
observation per call (by engine and operation) and a count of the calls that failed.

A failure is a ``StoreError`` (the store did not answer, lost a race, compacted) or an
``OSError``; a get of a missing key, a refused compare or a lease that expired are answers.
Watches are streams, not round trips: passed through untimed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from plexus.errors import StoreError
from plexus.observe.timing import Timings
from plexus.store.base import Compare, Datastore, Event, KeyValue, Op, TxnResult

T = TypeVar("T")


def engine_of(url: str) -> str:
    """The label of a ``--store`` value: etcd or sqlite."""
    return "etcd" if url.startswith(("etcd://", "etcds://")) else "sqlite"


class TimedStore:
    def __init__(self, store: Datastore, engine: str, timings: Timings) -> None:
        self.inner = store
        self.engine = engine
        self.timings = timings

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except (StoreError, OSError):
            self.timings.error((self.engine, op))
            raise
        finally:
            self.timings.since((self.engine, op), started)

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get", self.inner.get(key))

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        return await self._timed("list", self.inner.list(prefix))

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        return await self._timed("put", self.inner.put(key, value, lease))

    async def delete(self, key: str, prefix: bool = False) -> int:
        return await self._timed("delete", self.inner.delete(key, prefix))

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        return await self._timed("txn", self.inner.txn(compares, success, failure))

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        return self.inner.watch(prefix, start_revision)

    async def revision(self) -> int:
        return await self._timed("revision", self.inner.revision())

    async def grant_lease(self, ttl: float) -> int:
        return await self._timed("grant_lease", self.inner.grant_lease(ttl))

    async def refresh_lease(self, lease: int) -> None:
        await self._timed("refresh_lease", self.inner.refresh_lease(lease))

    async def revoke_lease(self, lease: int) -> None:
        await self._timed("revoke_lease", self.inner.revoke_lease(lease))

    async def close(self) -> None:
        await self.inner.close()

"""Holding a lease: refreshed well before it expires, and a clear signal when it is lost.

An agent puts the keys that say "this host is alive" on a lease and holds it; if the agent
dies, the store deletes them one TTL later and the other hosts see DELETE events. Any
backend works (``Datastore.refresh_lease``); on etcd the TTL runs on the server.

- A refresh every ``ttl / 3`` leaves room for two refreshes to fail before the lease expires.
- A store that does not answer (``StoreError``) is asked again every ``ttl / 10`` until it
  answers: the lease may still be alive, and only the store can say.
- A store that says the lease is gone (``NotFound``: expired during an outage, or revoked)
  ends the keeper and calls ``on_lost``. Its keys are gone too: the owner grants a new lease
  and writes them again -- the keeper cannot know what they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from plexus.errors import NotFound, StoreError
from plexus.store.base import Datastore

log = logging.getLogger("plexus.store.lease")

Sleep = Callable[[float], Awaitable[None]]


def _nothing(lease: int) -> None:
    return None


class LeaseKeeper:
    """Refreshes ``lease`` (granted with ``ttl`` seconds) until ``stop``; see the module doc.
    ``sleep`` is ``asyncio.sleep`` unless a test moves time by hand."""

    def __init__(
        self,
        store: Datastore,
        lease: int,
        ttl: float,
        on_lost: Callable[[int], None] = _nothing,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.store = store
        self.lease = lease
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.refreshes = 0
        self._on_lost = on_lost
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def grant(
        cls, store: Datastore, ttl: float, on_lost: Callable[[int], None] = _nothing
    ) -> LeaseKeeper:
        """Grants a lease of ``ttl`` seconds and starts keeping it."""
        keeper = cls(store, await store.grant_lease(ttl), ttl, on_lost)
        keeper.start()
        return keeper

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease-{self.lease}")

    async def stop(self) -> None:
        """Stops refreshing (the lease then expires after its TTL unless revoked)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        interval = self.ttl / 3
        while True:
            await self._sleep(interval)
            try:
                await self.store.refresh_lease(self.lease)
            except NotFound:
                log.error("lease %d is gone (expired or revoked): its keys are deleted",
                          self.lease)
                self.lost.set()
                self._on_lost(self.lease)
                return
            except StoreError as e:
                log.warning("could not refresh lease %d (%s); trying again", self.lease, e)
                interval = self.ttl / 10
                continue
            self.refreshes += 1
            interval = self.ttl / 3

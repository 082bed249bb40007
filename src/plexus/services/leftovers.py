"""What failed requests may have left in the datastore while it did not answer, rolled back
once it answers again, without an agent restart.

A request that fails undoes its transaction (see ``endpoints``), but when the store stops
answering half-way, the undo cannot be written either, and a write whose connection broke may
or may not have been applied (``StoreUnavailable``). The requester was told it failed, so
nobody expects what it wrote to exist: an endpoint left "pending" (its address claims with it),
or a container row left "creating". At start-up the agent rolls these back (``garbage``); this
does it while the agent runs:

- a failed request hands what it may have written here (the endpoints, with the exact values
  it wrote; a container's row key and ID);
- a background task rolls them back as soon as the store answers (bounded backoff), each delete
  guarded on the value being the one the failed request wrote, so a later request's object of
  the same key is never touched;
- a new request for the same container first rolls back that container's leftovers itself
  (``clear``), so a runtime that retries at once is not refused with "already exists".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

from plexus.errors import PlexusError
from plexus.model import keys
from plexus.model.types import Container, Endpoint
from plexus.services.context import Context
from plexus.store.base import Compare, Delete, KeyValue

log = logging.getLogger("plexus.leftovers")

RETRY_MIN, RETRY_MAX = 0.2, 2.0  # seconds between attempts while the store does not answer

Release = Callable[[Sequence[Endpoint], Sequence[Compare]], Awaitable[None]]
"""Releases endpoints with their claims in one transaction, if the compares hold."""


@dataclass
class _Written:
    """What one failed request may have written: endpoint key -> the values it wrote, and
    container row keys -> the container's ID."""

    endpoints: dict[str, set[str]] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.endpoints or self.containers)


class Leftovers:
    def __init__(self, ctx: Context, release: Release) -> None:
        self.ctx = ctx
        self._release = release
        self._written = _Written()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.rolled_back: list[str] = []

    def __len__(self) -> int:
        return len(self._written.endpoints) + len(self._written.containers)

    def endpoints(self, eps: Sequence[Endpoint]) -> None:
        """``eps`` (each value of them a failed request may have written) are not wanted."""
        for ep in eps:
            self._written.endpoints.setdefault(ep.store_key, set()).add(ep.to_json())
        self._wake()

    def container(self, key: str, container_id: str) -> None:
        """The row ``key`` of container ``container_id`` (with its endpoints) is not wanted."""
        self._written.containers[key] = container_id
        self._wake()

    async def clear(self, container_ids: Collection[str] = (),
                    container_keys: Collection[str] = ()) -> None:
        """Rolls back now what is left of these containers (raises if the store still does
        not answer), and waits until the cache no longer holds it."""
        mine = _Written(
            {k: v for k, v in self._written.endpoints.items()
             if _container_of(k) in container_ids},
            {k: v for k, v in self._written.containers.items()
             if k in container_keys or v in container_ids},
        )
        if mine:
            await self._roll_back(mine)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- internals -------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="leftovers")

    async def _run(self) -> None:
        delay = RETRY_MIN
        while self._written:
            try:
                await self._roll_back(self._written)
                delay = RETRY_MIN
            except PlexusError as exc:
                log.warning("rolling back what failed requests left: %s; again in %.1fs",
                            exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _roll_back(self, which: _Written) -> None:
        async with self._lock:
            revision = 0
            for key, values in list(which.endpoints.items()):
                revision = max(revision, await self._endpoint(key, values))
                self._written.endpoints.pop(key, None)
            for key, cid in list(which.containers.items()):
                revision = max(revision, await self._container(key, cid))
                self._written.containers.pop(key, None)
            if revision:
                await self.ctx.seen(revision)

    async def _endpoint(self, key: str, values: set[str]) -> int:
        kv = await self.ctx.store.get(key)
        if kv is None or kv.value not in values:
            return 0  # never written, or since replaced by another request's
        return await self._release_one(kv)

    async def _release_one(self, kv: KeyValue) -> int:
        """0: the release waits for the cache and the reconcilers itself."""
        await self._release([Endpoint.from_json(kv.value)],
                            [Compare(kv.key, "mod", "==", kv.mod_revision)])
        self.rolled_back.append(kv.key)
        log.info("rolled back %s, left by a request that failed", kv.key)
        return 0

    async def _container(self, key: str, container_id: str) -> int:
        found, _ = await self.ctx.store.list(keys.endpoints(self.ctx.node, container_id))
        for kv in found:
            await self._release_one(kv)
        row = await self.ctx.store.get(key)
        if row is None or Container.from_json(row.value).id != container_id:
            return 0
        result = await self.ctx.commit([Compare(key, "mod", "==", row.mod_revision)],
                                       [Delete(key)])
        if result.succeeded:
            self.rolled_back.append(key)
            log.info("rolled back container %s, left by a run that failed", key)
        return result.revision


def _container_of(endpoint_key: str) -> str:
    """The container ID in ``keys.endpoint(node, container_id, ifname)``."""
    return endpoint_key.rstrip("/").rsplit("/", 2)[-2]

"""The informer: list once, then watch from the listed revision; relist when history is gone.

It is the one reader of desired state for the agent: every change, whether this agent, another
host or a human with a datastore client made it, reaches the consumer through here, in revision
order, as ``Change`` batches (one batch per revision, or one big batch after a relist).

Design notes (after flannel's lease watcher and Kubernetes' reflector):
- ``start`` lists the prefix at one revision R and hands the whole listing to the consumer as one
  batch, then watches from R + 1. Nothing can fall between the list and the watch.
- A watch ends with ``RevisionCompacted`` when the consumer fell further behind than the store's
  history (the embedded stores keep 10,000 revisions; etcd compacts on its own schedule). Then
  the informer lists again and hands the consumer the *difference* between what it had and what
  is there now: puts for new or changed keys, deletes for vanished ones. The consumer sees the
  same kind of batch it would have seen from the watch, only coarser.
- A watch that breaks for another reason (etcd restarting) is resumed from the last revision
  seen + 1, with a bounded backoff; if that history is gone too, the relist above follows.
- ``revision`` is the revision of everything handed out so far; ``wait_for(R)`` lets a request
  that committed revision R wait until the consumer has seen it (the first half of "done means
  working"; the reconcilers' own progress is the second half, see ``agent.progress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plexus.errors import RevisionCompacted, StoreError
from plexus.store.base import Datastore, EventType, KeyValue

log = logging.getLogger("plexus.informer")

RETRY_MIN, RETRY_MAX = 0.05, 5.0


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    kv: KeyValue | None  # None: deleted
    revision: int


Consumer = Callable[[Sequence[Change]], None]
"""Called on the event loop with each batch of changes, in revision order. It must not await:
it updates caches and enqueues work, so batches stay in order."""
Advance = Callable[[int], None]
"""Called when every change up to a revision has been handed to the consumer."""


def _nothing(revision: int) -> None:
    return None


class Informer:
    def __init__(self, store: Datastore, prefix: str, consumer: Consumer,
                 on_advance: Advance = _nothing,
                 wanted: Callable[[str], bool] = lambda key: True) -> None:
        self._store = store
        self._prefix = prefix
        self._wanted = wanted  # keys the consumer never sees are not kept either
        self._consumer = consumer
        self._on_advance = on_advance
        self._known: dict[str, int] = {}  # key -> mod_revision handed out
        self._seen = 0
        self._flush_scheduled = False
        self.revision = 0
        self.relists = 0
        self._advanced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Lists and delivers the first batch, then keeps watching in the background."""
        await self._relist()
        self._flush()  # the listing's revision is seen now, not after the next loop turn
        self._task = asyncio.create_task(self._run(), name="informer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_for(self, revision: int, timeout: float = 30.0) -> None:
        """Until the consumer has seen ``revision`` (raises StoreError after ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.revision < revision:
            self._advanced.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise StoreError(f"the datastore watch did not reach revision {revision}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), left)

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self._watch()
            except RevisionCompacted:
                log.warning("watch fell behind the store's history at %d: relisting",
                            self._seen)
                await self._relist_retrying()
            except StoreError as exc:
                log.warning("watch broke at revision %d (%s); resuming in %.2fs",
                            self.revision, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN

    async def _watch(self) -> None:
        async for event in self._store.watch(self._prefix, self._seen + 1):
            kv = event.kv if event.type is EventType.PUT else None
            rev, key = event.kv.mod_revision, event.kv.key
            changes = [Change(key, kv, rev)] if self._wanted(key) else []
            self._apply(changes, rev)

    def _apply(self, changes: list[Change], revision: int) -> None:
        for c in changes:
            if c.kv is None:
                self._known.pop(c.key, None)
            else:
                self._known[c.key] = c.kv.mod_revision
        if changes:
            self._consumer(changes)
        # A revision's events arrive back to back (a transaction's events are published
        # together, and etcd never splits a revision across watch responses), and the watch
        # hands out buffered events without suspending. So the revision is declared seen only
        # once the task has drained what is buffered (call_soon runs after it suspends): a
        # waiter never wakes between two events of one transaction.
        self._seen = max(self._seen, revision)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._seen > self.revision:
            self.revision = self._seen
            self._on_advance(self.revision)
            self._advanced.set()

    async def _relist_retrying(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self._relist()
                return
            except StoreError as exc:
                log.warning("relist failed (%s); again in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def _relist(self) -> None:
        """Deliver the difference between what the consumer has and what the store holds."""
        kvs, revision = await self._store.list(self._prefix)
        self.relists += 1
        kvs = [kv for kv in kvs if self._wanted(kv.key)]
        listed = {kv.key: kv for kv in kvs}
        changes = [Change(key, None, revision) for key in self._known if key not in listed]
        changes += [
            Change(kv.key, kv, revision) for kv in kvs if self._known.get(kv.key) != kv.mod_revision
        ]
        self._apply(changes, revision)
        # The watch resumes from the listed revision even if nothing changed since.
        self._seen = max(self._seen, revision)

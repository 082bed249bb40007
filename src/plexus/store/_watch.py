"""Watches for the embedded backends: replay history, then stream live events.

A watch first replays what the backend's history holds from ``start_revision`` and then hands
out the events the backend publishes after each commit. Both steps happen without an ``await``
in between (the backends commit synchronously on the event loop), so nothing can slip between
the replay and the live stream and nothing is delivered twice.

A watcher whose consumer stops reading must not make the store hold memory without bound, so
its queue is capped: on overflow the queue is dropped and the watcher replays from history
where its consumer left off. Only if that history is gone too does the consumer see
``RevisionCompacted`` -- and then it lists and diffs, as after any compaction.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from plexus.errors import StoreError
from plexus.store.base import Event

History = Callable[[str, int], list[Event]]
"""Events under a prefix with ``mod_revision >= start``, in commit order; raises
``RevisionCompacted`` if the backend no longer has them all."""


class _Cursor:
    """Where a consumer is: the revision it is in and how many of its events it has had.

    One revision can hold many events (a delete of a prefix), so the revision alone is not
    enough to resume a replay without repeating or skipping any.
    """

    def __init__(self, start: int) -> None:
        self.revision = start
        self.seen = 0

    def advance(self, event: Event) -> None:
        if event.kv.mod_revision == self.revision:
            self.seen += 1
        else:
            self.revision, self.seen = event.kv.mod_revision, 1

    def unseen(self, events: list[Event]) -> list[Event]:
        skip = sum(1 for e in events[: self.seen] if e.kv.mod_revision == self.revision)
        return events[skip:]


class _Watcher:
    def __init__(self, prefix: str, start: int, buffer: int) -> None:
        self.prefix = prefix
        self.start = start  # a watch may start ahead of the store: skip what comes before
        self.buffer = buffer
        self.capacity = buffer
        self.pending: deque[Event] = deque()
        self.wake = asyncio.Event()
        self.behind = True  # the first step of every watch is a replay
        self.closed = False

    def offer(self, events: Sequence[Event]) -> None:
        mine = [e for e in events if self._wants(e)]
        if not mine or self.behind:
            return
        if len(self.pending) + len(mine) > self.capacity:
            self.behind = True  # the replay will bring these back
            self.pending.clear()
        else:
            self.pending.extend(mine)
        self.wake.set()

    def _wants(self, event: Event) -> bool:
        return event.kv.key.startswith(self.prefix) and event.kv.mod_revision >= self.start

    def refill(self, backlog: list[Event]) -> None:
        self.behind = False
        self.pending = deque(backlog)
        # Room for a full buffer of live events on top of the backlog being drained.
        self.capacity = len(backlog) + self.buffer

    def end(self) -> None:
        self.closed = True
        self.wake.set()


class WatchHub:
    """The live half of watches: the backend publishes each commit's events here."""

    def __init__(self, history: History, buffer: int = 10_000) -> None:
        self._history = history
        self._buffer = buffer
        self._watchers: set[_Watcher] = set()
        self._closed = False

    def publish(self, events: Sequence[Event]) -> None:
        if events:
            for watcher in self._watchers:
                watcher.offer(events)

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        return self._stream(prefix, start_revision)

    def close(self) -> None:
        self._closed = True
        for watcher in self._watchers:
            watcher.end()

    async def _stream(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        if self._closed:
            raise StoreError("the store is closed")
        watcher = _Watcher(prefix, start_revision, self._buffer)
        cursor = _Cursor(start_revision)
        self._watchers.add(watcher)
        try:
            while (event := await self._next(watcher, cursor)) is not None:
                yield event
        finally:
            self._watchers.discard(watcher)

    async def _next(self, watcher: _Watcher, cursor: _Cursor) -> Event | None:
        while not watcher.closed:
            if watcher.behind:
                # No await between reading history and going live again: see module doc.
                watcher.refill(cursor.unseen(self._history(watcher.prefix, cursor.revision)))
            elif watcher.pending:
                event = watcher.pending.popleft()
                cursor.advance(event)
                return event
            else:
                watcher.wake.clear()
                await watcher.wake.wait()
        return None

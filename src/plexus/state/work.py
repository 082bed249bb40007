"""What every reconciler shares: a work queue of object keys, retries, errors, progress.

A reconciler is told which objects changed (``enqueue``, from the informer's consumer, with the
revision of the change) and makes the kernel match the cache for each of them, level-triggered:
it reads the object's *current* desired state when it gets to it, so ten changes of one object
are one piece of work. Kernel events and the periodic pass enqueue objects the same way, with no
revision.

Progress. A request that committed revision R waits until every reconciler has *applied* R: no
object queued by a change at or before R is still waiting or in flight. ``applied`` is therefore
the smallest queued revision minus one, or the informer's revision when nothing is queued.
Retries (after a failure) and kernel-triggered work carry no revision, so they never hold a
request up.

Errors. A failed object is logged with its name, kept in ``errors`` (``plexus status`` shows
them) and retried with exponential backoff, while the others carry on. A request waiting for its
object sees the error and answers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from plexus.errors import DataplaneError, PlexusError
from plexus.histogram import Histogram

_HOLD = 0.004  # seconds a worker runs objects back to back before it lets the loop go

log = logging.getLogger("plexus.reconcile")

BACKOFF_MIN, BACKOFF_MAX = 0.2, 30.0
# Seconds: an object already right is ~10 µs, a veth pair a few ms, a whole-table batch 100+ ms.
RUN_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class ObjectError:
    key: str
    message: str
    attempts: int
    since: float  # wall-clock time of the first failure in a row

    def to_dict(self) -> dict[str, object]:
        return {"object": self.key, "error": self.message, "attempts": self.attempts,
                "since": self.since}


class Reconciler:
    """Subclasses implement ``reconcile(key)`` (or ``reconcile_batch`` for all-at-once work)."""

    name = "reconciler"
    workers = 1  # objects reconciled at once
    batch = False  # True: the worker takes queued keys together in ``reconcile_batch`` calls
    batch_max = 128  # keys per call at most
    refreshes = False  # True: ``refresh`` re-checks an object against the kernel
    prefixes: tuple[str, ...] = ("net:", "ep:")  # the objects of datastore changes it takes

    def __init__(self) -> None:
        self._dirty: dict[str, int | None] = {}  # key -> revision that queued it (None: retry)
        self._inflight: dict[str, int | None] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._retries: dict[str, asyncio.TimerHandle] = {}
        self.errors: dict[str, ObjectError] = {}
        self.on_progress: Callable[[], None] = lambda: None
        self.processed = 0
        # For the metrics (plain data, read at scrape time): seconds per ``_run`` (one object,
        # or one batch), and objects the kernel had drifted from (``invalidate``).
        self.durations = Histogram(RUN_BUCKETS)
        self.drifted = 0
        # refresh(): futures waiting for the next time a key is taken, and for the current one.
        self._refreshing: dict[str, list[asyncio.Future[None]]] = {}
        self._answering: dict[str, list[asyncio.Future[None]]] = {}

    # -- feeding -----------------------------------------------------------------------------

    def enqueue(self, keys: Iterable[str], revision: int | None = None) -> None:
        for key in keys:
            # An object already queued keeps its earlier revision: progress is held back by the
            # oldest change not applied yet.
            if self._dirty.get(key) is None:
                self._dirty[key] = revision
            timer = self._retries.pop(key, None)
            if timer is not None:
                timer.cancel()
        self._wake.set()

    def drop_queued(self) -> int:
        """Forget the queued objects that changes queued (not retries, not those a ``refresh``
        waits for): for a reconciler that has just rebuilt everything from the cache, which
        already holds every change that queued them. How many were dropped."""
        dropped = [k for k, revision in self._dirty.items()
                   if revision is not None and k not in self._refreshing]
        for key in dropped:
            del self._dirty[key]
        self.processed += len(dropped)
        return len(dropped)

    def invalidate(self, key: str) -> None:
        """Forget what was applied for ``key`` and do it again (a kernel event said it
        drifted): level-triggered, so this is just one more piece of work."""
        self.drifted += 1
        self.forget_applied(key)
        self.enqueue([key])

    async def refresh(self, key: str) -> None:
        """``invalidate`` and wait until ``key`` is done; raises the error it met."""
        self.drifted += 1
        self.forget_applied(key)
        await self.check(key)

    async def check(self, key: str) -> None:
        """Queue ``key`` and wait until it is done (a periodic check, on demand); raises the
        error it met."""
        done = asyncio.get_running_loop().create_future()
        self._refreshing.setdefault(key, []).append(done)
        self.enqueue([key])
        await done

    def _answer(self, key: str, error: Exception | None) -> None:
        for done in self._answering.pop(key, []):
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(DataplaneError(f"{self.name}: {self.errors[key].message}"))

    def applied(self, seen: int) -> int:
        """The revision every change handed to this reconciler is applied up to."""
        pending = [r for r in (*self._dirty.values(), *self._inflight.values()) if r is not None]
        return min(pending) - 1 if pending else seen

    @property
    def busy(self) -> bool:
        return bool(self._dirty or self._inflight)

    # -- running -----------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(1 if self.batch else self.workers):
            self._tasks.append(asyncio.create_task(self._work(), name=f"{self.name}-{i}"))

    async def close(self) -> None:
        for timer in self._retries.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _work(self) -> None:
        held_since = time.perf_counter()
        while True:
            taken = self._take()
            if not taken:
                self._wake.clear()
                await self._wake.wait()
                held_since = time.perf_counter()
                continue
            if time.perf_counter() - held_since > _HOLD:
                # Objects already right finish without suspending: a long queue (start-up,
                # a relist) would otherwise hold the loop for all of it.
                await asyncio.sleep(0)
                held_since = time.perf_counter()
            started = time.perf_counter()
            outcome = await self._run(list(taken))
            self.durations.observe(time.perf_counter() - started)
            for key in taken:
                self._inflight.pop(key, None)
            # A batch may report on objects nobody queued (DNS listeners, say): recorded too.
            for key in {*taken, *outcome}:
                self._record(key, outcome.get(key))
                self._answer(key, outcome.get(key))
            self.processed += len(taken)
            self.on_progress()

    def _take(self) -> dict[str, int | None]:
        if self.batch:  # bounded, so that one batch does not hold the loop for a whole relist
            free = (k for k in self._dirty if k not in self._inflight)
            ready = list(itertools.islice(free, self.batch_max))
        else:  # the first free key: O(workers), not O(queue), per take
            ready = list(itertools.islice((k for k in self._dirty if k not in self._inflight), 1))
        taken = {k: self._dirty.pop(k) for k in ready}
        self._inflight.update(taken)
        for key in taken:
            if key in self._refreshing:
                self._answering[key] = self._refreshing.pop(key)
        return taken

    async def _run(self, keys: list[str]) -> dict[str, Exception | None]:
        try:
            if self.batch:
                return await self.reconcile_batch(keys)
            await self.reconcile(keys[0])
            return {}
        except (PlexusError, OSError) as exc:
            return {k: exc for k in keys}
        except Exception as exc:  # a bug: say so, keep the others going
            log.exception("%s: reconciling %s failed unexpectedly", self.name, ", ".join(keys))
            return {k: exc for k in keys}

    def _record(self, key: str, error: Exception | None) -> None:
        if error is None:
            if self.errors.pop(key, None) is not None:
                log.info("%s: %s converged again", self.name, key)
            return
        old = self.errors.get(key)
        attempts = 1 if old is None else old.attempts + 1
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        self.errors[key] = ObjectError(key, message, attempts,
                                       time.time() if old is None else old.since)
        delay = min(BACKOFF_MIN * 2 ** (attempts - 1), BACKOFF_MAX)
        log.error("%s: %s failed (attempt %d, again in %.1fs): %s",
                  self.name, key, attempts, delay, message)
        loop = asyncio.get_running_loop()
        self._retries[key] = loop.call_later(delay, self._retry, key)

    def _retry(self, key: str) -> None:
        self._retries.pop(key, None)
        if key not in self._dirty:
            self._dirty[key] = None
            self._wake.set()

    # -- what subclasses do ------------------------------------------------------------------

    async def reconcile(self, key: str) -> None:
        raise NotImplementedError

    async def reconcile_batch(self, keys: list[str]) -> dict[str, Exception | None]:
        """Returns the keys that failed (and why); keys absent from the answer succeeded."""
        raise NotImplementedError

    def forget_applied(self, key: str) -> None:
        """Subclasses that remember what they applied drop it here."""

    def forget(self, key: str) -> None:
        """The object is gone and nobody will ask for it again: drop its error and retry."""
        self.errors.pop(key, None)
        timer = self._retries.pop(key, None)
        if timer is not None:
            timer.cancel()


"""Waiting until a transaction is working: "done means working" for synchronous front doors.

A service commits revision R and then waits here until (1) the informer has handed every change
up to R to the cache and the reconcilers, and (2) every reconciler has applied R (see
``reconcilers.base``). If a reconciler failed on one of the objects the request is about, the
wait raises that error, and the service undoes its transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence

from plexus.errors import DataplaneError, NotReady
from plexus.state.work import Reconciler
from plexus.store.informer import Informer

WAIT_TIMEOUT = 60.0


class Progress:
    def __init__(self, informer: Informer, reconcilers: Sequence[Reconciler]) -> None:
        self.informer = informer
        self.reconcilers = list(reconcilers)
        self._changed = asyncio.Event()
        for r in self.reconcilers:
            r.on_progress = self._changed.set

    def advanced(self, revision: int) -> None:
        """The informer's hook: it has handed out everything up to ``revision``."""
        self._changed.set()

    def applied(self) -> int:
        seen = self.informer.revision
        return min((r.applied(seen) for r in self.reconcilers), default=seen)

    async def wait(self, revision: int, objects: Iterable[str] = (),
                   timeout: float = WAIT_TIMEOUT) -> None:
        """Until every reconciler has applied ``revision``; raises the error a reconciler met on
        one of ``objects`` (reconciler keys such as ``ep:/plexus/endpoints/...``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.applied() < revision:
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise NotReady(f"the agent did not apply revision {revision} within {timeout:.0f}s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        self.check(objects)

    def check(self, objects: Iterable[str]) -> None:
        for key in objects:
            for r in self.reconcilers:
                error = r.errors.get(key)
                if error is not None:
                    raise DataplaneError(f"{r.name}: {error.message}")

    async def refresh(self, objects: Iterable[str]) -> None:
        """Check ``objects`` against the kernel now (and repair them), in the reconcilers that
        remember what they applied; raises what they met."""
        for key in objects:
            for r in self.reconcilers:
                if r.refreshes:
                    await r.refresh(key)

    def errors(self) -> list[dict[str, object]]:
        return [{"reconciler": r.name, **e.to_dict()}
                for r in self.reconcilers for e in r.errors.values()]

"""How long the event loop is held up: the agent's own measure of its latency.

A ticker asks to be woken every ``TICK`` seconds and records by how much it was late. A late
wake-up is time during which the loop ran something else without yielding: API requests, DNS
updates and CNI ADDs waited that long. ``plexus status`` shows the worst since start and the
worst of the last minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

TICK = 0.005
WINDOW = 60.0


class LoopMonitor:
    def __init__(self) -> None:
        self.worst = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (when, stall), stalls over 1 ms
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick(), name="loop-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK)
            now = time.monotonic()
            stall = now - before - TICK
            if stall > 0.001:
                self.worst = max(self.worst, stall)
                self._recent.append((now, stall))
            while self._recent and self._recent[0][0] < now - WINDOW:
                self._recent.popleft()

    def recent(self) -> float:
        return max((s for _, s in self._recent), default=0.0)

    def status(self) -> dict[str, float]:
        return {"loop_stall_max_ms": round(1000 * self.worst, 1),
                "loop_stall_recent_ms": round(1000 * self.recent(), 1)}

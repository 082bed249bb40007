"""A histogram as plain data (bucket counts, sum, count), shaped for Prometheus: what the DNS
server, the reconcilers and the request timers observe, read by ``observe`` at scrape time.
A leaf module, so that every layer may keep one."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

# Seconds. Local lookups upstream are well under a millisecond; a dead one shows as the timeout.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


@dataclass(slots=True)
class Histogram:
    """Cumulative-free bucket counts (``counts[i]`` observations <= ``bounds[i]``, the last one
    for +Inf) plus sum and count; ``to_dict`` gives Prometheus-style cumulative buckets."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def merge(self, other: dict[str, Any]) -> None:
        """Add a ``to_dict`` result (from a worker process) into this histogram."""
        running = 0
        for i, (_, cumulative) in enumerate(other["buckets"]):
            self.counts[i] += int(cumulative) - running
            running = int(cumulative)
        self.total += float(other["sum"])
        self.count += int(other["count"])

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-th quantile (0 when empty)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            if running >= rank:
                return bound
        return float("inf")

    def to_dict(self) -> dict[str, Any]:
        buckets: list[tuple[float | str, int]] = []
        running = 0
        bounds: tuple[float | str, ...] = (*self.bounds, "+Inf")
        for bound, n in zip(bounds, self.counts, strict=True):
            running += n
            buckets.append((bound, running))
        return {"buckets": buckets, "sum": round(self.total, 6), "count": self.count}

"""Counters and histograms as plain data, shaped so a Prometheus collector can read them later.

Label sets stay bounded: query types are the named ones or ``TYPEnnn`` (at most 65536, in
practice a handful), rcodes are at most 16, upstreams are configuration, never containers.
"""

from __future__ import annotations

import bisect
from collections import Counter
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


def nested(counter: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{(a, b): n} -> {a: {b: n}}, sorted, for JSON."""
    out: dict[str, dict[str, int]] = {}
    for (a, b), n in sorted(counter.items()):
        out.setdefault(a, {})[b] = n
    return out


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the ``stats()`` of several worker processes into one (numbers add, dicts merge,
    histograms merge, lists concatenate, other values: the first one wins)."""
    if not parts:
        return {}
    out: dict[str, Any] = {}
    for part in parts:
        _merge_into(out, part)
    return out


def _merge_into(out: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if key not in out:
            out[key] = _copy(value)
        elif isinstance(value, bool) or isinstance(out[key], bool):
            out[key] = out[key] and value
        elif isinstance(value, int | float) and isinstance(out[key], int | float):
            out[key] += value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            if "buckets" in value and "buckets" in out[key]:
                out[key] = _merge_histograms(out[key], value)
            else:
                _merge_into(out[key], value)
        elif isinstance(value, list) and isinstance(out[key], list):
            out[key] = out[key] + value


def _merge_histograms(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    h = Histogram()
    h.merge(a)
    h.merge(b)
    return h.to_dict()


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value

"""Counters and histograms as plain data, shaped so a Prometheus collector can read them later.

Label sets stay bounded: query types are the named ones or ``TYPEnnn`` (at most 65536, in
practice a handful), rcodes are at most 16, upstreams are configuration, never containers.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from plexus.histogram import LATENCY_BUCKETS as LATENCY_BUCKETS
from plexus.histogram import Histogram as Histogram

# Seconds, a query's time in the server: a local answer costs tens of microseconds (the fast
# path's ready-made ones a few), a forwarded one an upstream round trip, a dead upstream the
# forwarding timeout.
QUERY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
)


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
    h = Histogram(tuple(float(bound) for bound, _ in a["buckets"][:-1]))
    h.merge(a)
    h.merge(b)
    return h.to_dict()


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value

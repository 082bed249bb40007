"""The embedded DNS server's counters (``DnsServer.stats``, already plain data shaped for this)
as Prometheus families: queries by type and result with their latency, drops, and each
upstream's health, answers, failures and latency.

Labels: query types (the named ones, a handful in practice), rcodes (at most 16), outcomes and
upstreams (configuration): never clients or names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from plexus.observe.timing import histogram_family

Stats = Callable[[], Awaitable[dict[str, Any]]]


class DnsCollector:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._last: dict[str, Any] = {}

    async def refresh(self) -> None:
        self._last = await self.stats()

    def collect(self) -> Iterator[Metric]:
        s = self._last
        if not s:
            return
        yield _responses(s.get("responses", {}))
        yield histogram_family(
            "plexus_dns_query_duration_seconds",
            "Time from a query's arrival to its answer, by query type and response code "
            "(upstream time included when forwarded; answers served ready-made count in the "
            "lowest bucket).", ["type", "rcode"],
            (((qtype, rcode), h) for qtype, rcodes in sorted(s.get("latency", {}).items())
             for rcode, h in sorted(rcodes.items())))
        yield _by("plexus_dns_queries_total", "Queries received, by transport.", "transport",
                  {k: v for k, v in s.get("queries", {}).items() if k in ("udp", "tcp")})
        yield _by("plexus_dns_outcomes_total", "How queries were answered (local, forwarded, "
                  "cached, ...).", "outcome", s.get("outcomes", {}))
        yield _by("plexus_dns_dropped_total", "Queries dropped unanswered, by reason.",
                  "reason", s.get("dropped", {}))
        yield from _upstreams(s.get("upstreams", {}))


def _responses(responses: dict[str, dict[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily("plexus_dns_responses_total",
                                 "Answers sent, by query type and response code.",
                                 labels=["type", "rcode"])
    for qtype, rcodes in sorted(responses.items()):
        for rcode, n in sorted(rcodes.items()):
            family.add_metric([qtype, rcode], n)
    return family


def _by(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted(values.items()):
        family.add_metric([key], n)
    return family


def _upstreams(upstreams: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    up = GaugeMetricFamily("plexus_dns_upstream_up", "1 while the upstream answers, else 0.",
                           labels=["upstream"])
    queries = CounterMetricFamily("plexus_dns_upstream_queries_total",
                                  "Queries forwarded to the upstream.", labels=["upstream"])
    failures = CounterMetricFamily("plexus_dns_upstream_failures_total",
                                   "Forwards that failed, by kind.", labels=["upstream", "kind"])
    rows = []
    for name, u in sorted(upstreams.items()):
        up.add_metric([name], 1 if u.get("healthy") else 0)
        queries.add_metric([name], u.get("queries", 0))
        for kind, n in sorted(u.get("failures", {}).items()):
            failures.add_metric([name, kind], n)
        if "latency_seconds" in u:
            rows.append(((name,), u["latency_seconds"]))
    yield from (up, queries, failures)
    yield histogram_family("plexus_dns_upstream_latency_seconds",
                           "Time an upstream took to answer a forwarded query.", ["upstream"],
                           rows)

"""Drops by reason, from counters the kernel keeps: the firewall's named drop counters
(isolation between networks, internal networks, unpublished ports: ``render.DROP_COUNTERS``) and
each policy's counters (packets allowed, denied, audited), read with one ``list counters`` each
at scrape time.

Labels: a reason (a handful) and a policy ("Kind namespace/name"): bounded by the policies
applied, never by containers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, Metric

from plexus.dataplane.nft.render import DROP_COUNTERS


class DropCounters(Protocol):
    async def counters(self) -> dict[str, tuple[int, int]]:
        """Named counter -> (packets, bytes)."""
        ...


PolicyCounters = Callable[[], Awaitable[dict[str, dict[str, int]]]]


class DropCollector:
    """``plexus_dropped_packets_total{reason, policy}``, ``plexus_dropped_bytes_total{reason}``
    and ``plexus_policy_packets_total{policy, outcome}``."""

    def __init__(self, firewall: DropCounters, policies: PolicyCounters) -> None:
        self.firewall = firewall
        self.policies = policies
        self._firewall: dict[str, tuple[int, int]] = {}
        self._policies: dict[str, dict[str, int]] = {}

    async def refresh(self) -> None:
        self._firewall = await self.firewall.counters()
        self._policies = await self.policies()

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "plexus_dropped_packets_total",
            "Packets the firewall dropped, by reason (isolation, internal, unpublished, policy) "
            "and policy.", labels=["reason", "policy"])
        dropped_bytes = CounterMetricFamily(
            "plexus_dropped_bytes_total", "Bytes the firewall's own rules dropped, by reason.",
            labels=["reason"])
        for reason, name in DROP_COUNTERS.items():
            found = self._firewall.get(name)
            if found is not None:
                packets.add_metric([reason, ""], found[0])
                dropped_bytes.add_metric([reason], found[1])
        outcomes = CounterMetricFamily(
            "plexus_policy_packets_total",
            "Packets each policy allowed, denied, or would deny (audit).",
            labels=["policy", "outcome"])
        for policy, counts in sorted(self._policies.items()):
            packets.add_metric(["policy", policy], counts.get("deny", 0))
            for outcome, n in sorted(counts.items()):
                outcomes.add_metric([policy, outcome], n)
        yield from (packets, dropped_bytes, outcomes)

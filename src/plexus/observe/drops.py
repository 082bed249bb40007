"""Drops by reason, from counters the kernel keeps: the firewall's named drop counters
(isolation between networks, internal networks, unpublished ports: ``render.DROP_COUNTERS``),
each policy's counters (packets allowed, denied, audited), read with one ``list counters`` each
at scrape time, and the IP stack's own "no route" counters of the agent's namespace (a
container's packet the host cannot forward, a host packet it cannot send: ``InNoRoutes`` and
``OutNoRoutes`` of /proc/net/snmp, netstat and snmp6). Rate-limit drops join with QoS.

Labels: a reason (a handful) and a policy ("Kind namespace/name"): bounded by the policies
applied, never by containers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, Metric

from plexus.dataplane.nft.render import DROP_COUNTERS


class DropCounters(Protocol):
    async def counters(self) -> dict[str, tuple[int, int]]:
        """Named counter -> (packets, bytes)."""
        ...


PolicyCounters = Callable[[], Awaitable[dict[str, dict[str, int]]]]
PROC_NET = Path("/proc/net")
# (file, table prefix, field): the kernel's counters of packets dropped for want of a route.
NO_ROUTE = (("snmp", "Ip", "OutNoRoutes"), ("netstat", "IpExt", "InNoRoutes"),
            ("snmp6", "", "Ip6InNoRoutes"), ("snmp6", "", "Ip6OutNoRoutes"))


def no_route_packets(proc_net: Path = PROC_NET) -> int:
    """Packets this namespace dropped for want of a route, IPv4 and IPv6, in and out."""
    total = 0
    for name, table, field in NO_ROUTE:
        try:
            text = (proc_net / name).read_text()
        except OSError:
            continue  # no IPv6 in this kernel
        total += _counter(text, table, field)
    return total


def _counter(text: str, table: str, field: str) -> int:
    """A field of /proc/net/snmp's pairs of lines ("Ip: names" / "Ip: values"), or of snmp6's
    "name value" lines (``table`` empty)."""
    lines = text.splitlines()
    if not table:
        return next((int(v) for n, v in (ln.split()[:2] for ln in lines if ln.strip())
                     if n == field), 0)
    rows = [ln.split()[1:] for ln in lines if ln.startswith(f"{table}:")]
    for names, values in zip(rows[::2], rows[1::2], strict=False):
        if field in names:
            return int(values[names.index(field)])
    return 0


class DropCollector:
    """``plexus_dropped_packets_total{reason, policy}``, ``plexus_dropped_bytes_total{reason}``
    and ``plexus_policy_packets_total{policy, outcome}``."""

    def __init__(self, firewall: DropCounters, policies: PolicyCounters) -> None:
        self.firewall = firewall
        self.policies = policies
        self._firewall: dict[str, tuple[int, int]] = {}
        self._policies: dict[str, dict[str, int]] = {}
        self._no_route = 0

    async def refresh(self) -> None:
        self._firewall = await self.firewall.counters()
        self._policies = await self.policies()
        self._no_route = no_route_packets()

    def collect(self) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "plexus_dropped_packets_total",
            "Packets dropped, by reason (isolation, internal, unpublished, policy, no_route) "
            "and policy.", labels=["reason", "policy"])
        dropped_bytes = CounterMetricFamily(
            "plexus_dropped_bytes_total", "Bytes the firewall's own rules dropped, by reason.",
            labels=["reason"])
        for reason, name in DROP_COUNTERS.items():
            found = self._firewall.get(name)
            if found is not None:
                packets.add_metric([reason, ""], found[0])
                dropped_bytes.add_metric([reason], found[1])
        packets.add_metric(["no_route", ""], self._no_route)
        outcomes = CounterMetricFamily(
            "plexus_policy_packets_total",
            "Packets each policy allowed, denied, or would deny (audit).",
            labels=["policy", "outcome"])
        for policy, counts in sorted(self._policies.items()):
            packets.add_metric(["policy", policy], counts.get("deny", 0))
            for outcome, n in sorted(counts.items()):
                outcomes.add_metric([policy, outcome], n)
        yield from (packets, dropped_bytes, outcomes)

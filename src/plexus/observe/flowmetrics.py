"""The flow log's own health as Prometheus families: records made by verdict, records the rate
limit suppressed, records the kernel dropped before the agent read them, and the ring's fill.

Records lost: a netlink socket whose receive buffer is full makes the kernel drop the message
(``netlink_overrun``: the reader gets ENOBUFS once, and the socket's ``sk_drops`` grows by one per
message dropped). /proc/net/netlink lists every netlink socket of the namespace with its drops
and inode; the flow log's sockets are found there by their inodes. A conntrack event and a
logged packet are one message each, so the count is of records.

Labels: verdicts (three) and sources (two): fixed by code.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from plexus.observe.flows import VERDICTS, FlowLog

NETLINK = Path("/proc/self/net/netlink")


def netlink_drops(text: str, sockets: Mapping[str, int]) -> dict[str, int]:
    """Drops of each named socket (name -> inode) in /proc/net/netlink's ``text``; a socket
    not listed is left out."""
    lines = text.splitlines()
    if not lines:
        return {}
    header = lines[0].split()
    drops, inode = header.index("Drops"), header.index("Inode")
    by_inode: dict[int, int] = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) == len(header):
            by_inode[int(fields[inode])] = int(fields[drops])
    return {name: by_inode[ino] for name, ino in sockets.items() if ino in by_inode}


class FlowCollector:
    """``plexus_flow_records_total{verdict}``, ``plexus_flow_records_suppressed_total``,
    ``plexus_flow_records_lost_total{source}``, ``plexus_flow_follower_lagged_total``,
    ``plexus_flow_ring_*``, ``plexus_flow_followers``, ``plexus_flow_open_connections``."""

    def __init__(self, flows: FlowLog, netlink: Path = NETLINK) -> None:
        self.flows = flows
        self.netlink = netlink
        self._lost: dict[str, int] = {}

    async def refresh(self) -> None:
        sockets = dict(self.flows.sockets)
        self._lost = netlink_drops(self.netlink.read_text(), sockets) if sockets else {}

    def collect(self) -> Iterator[Metric]:
        log = self.flows
        records = CounterMetricFamily(
            "plexus_flow_records_total", "Flow records made, by verdict (forwarded, dropped, "
            "audit: a policy would have dropped it).", labels=["verdict"])
        for verdict in VERDICTS:
            records.add_metric([verdict], log.verdicts[verdict])
        lost = CounterMetricFamily(
            "plexus_flow_records_lost_total", "Kernel events (conntrack) and logged packets "
            "(nflog) the kernel dropped because the agent read them too slowly.",
            labels=["source"])
        for source, n in sorted(self._lost.items()):
            lost.add_metric([source], n)
        yield records
        yield lost
        yield CounterMetricFamily(
            "plexus_flow_records_suppressed_total",
            "Flow records not made: over the flow log's rate limit (--flow-rate).",
            value=log.stats["suppressed"])
        yield CounterMetricFamily(
            "plexus_flow_follower_lagged_total",
            "Records a follower (plexus flows --follow) missed: it read too slowly.",
            value=log.stats["lagged"])
        yield from _sizes(log.sizes())


def _sizes(sizes: Mapping[str, int]) -> Iterator[Metric]:
    yield GaugeMetricFamily("plexus_flow_ring_records", "Flow records the ring holds now.",
                            value=sizes["records"])
    yield GaugeMetricFamily("plexus_flow_ring_capacity", "Flow records the ring holds at most.",
                            value=sizes["capacity"])
    yield GaugeMetricFamily("plexus_flow_followers", "Clients following the flow log now.",
                            value=sizes["followers"])
    yield GaugeMetricFamily("plexus_flow_open_connections",
                            "Connections the flow log tracks as open (for their durations).",
                            value=sizes["open"])

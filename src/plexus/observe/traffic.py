"""Per-container bytes and packets, from the kernel's own counters of each host-side veth.

Why these counters: the kernel already counts every packet of every link (IFLA_STATS64) at no
extra cost, and one RTM_GETLINK dump (on a worker thread, at scrape time) reads all of them; no
packet passes through Python and no rule is added. The host end's receive is what the container
sent, its transmit what the container received; the families are named from the container's
side, like cAdvisor's ``container_network_*``.

Cardinality: one series per local endpoint and direction (labels: container name, namespace,
network), so the number of series is bounded by the number of containers on this host, which the
host's own resources already bound (thousands, not millions); a container that goes away takes its
series with it at the next scrape. No container ID, address or port is a label.

Endpoints without a host-side veth (macvlan, ipvlan, host networking) have no series: their
traffic never crosses a link of the host's namespace that is theirs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric

from plexus.dataplane import netns, rtnl
from plexus.state.cache import Cache

IFLA_STATS64 = 23
_STATS = struct.Struct("=QQQQ")  # rx_packets, tx_packets, rx_bytes, tx_bytes (then more)
_IFINFOMSG_SIZE = 16
_NLATTR = struct.Struct("=HH")
_RECV_SIZE = 65536
_TIMEOUT = 5.0  # seconds one dump may take (thousands of links: tens of ms)
_MAX_DATAGRAMS = 100_000  # bounds the read loop whatever the kernel sends


@dataclass(frozen=True, slots=True)
class LinkCounters:
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


def parse_link_stats(payload: memoryview) -> tuple[str, LinkCounters] | None:
    """(name, counters) of one RTM_NEWLINK payload; None without both attributes."""
    pos, end = _IFINFOMSG_SIZE, len(payload)
    name: str | None = None
    stats: LinkCounters | None = None
    while pos + 4 <= end and (name is None or stats is None):
        length, kind = _NLATTR.unpack_from(payload, pos)
        if length < 4 or pos + length > end:
            break
        kind &= rtnl.NLA_TYPE_MASK
        value = payload[pos + 4: pos + length]
        if kind == rtnl.IFLA_IFNAME:
            name = bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == IFLA_STATS64 and len(value) >= _STATS.size:
            stats = LinkCounters(*_STATS.unpack_from(value))
        pos += (length + 3) & ~3
    return None if name is None or stats is None else (name, stats)


def parse_dump(data: memoryview, seq: int, into: dict[str, LinkCounters]) -> bool:
    """One datagram of a link dump into ``into``; True when the dump is done."""
    for kind, _, msg_seq, payload in rtnl.messages(data):
        if msg_seq != seq:
            continue
        if kind in (rtnl.NLMSG_DONE, rtnl.NLMSG_ERROR):
            return True
        if kind == rtnl.RTM_NEWLINK:
            found = parse_link_stats(payload)
            if found is not None:
                into[found[0]] = found[1]
    return False


def dump_link_counters() -> dict[str, LinkCounters]:
    """Blocking: every link of the agent's namespace with its counters (a worker thread's job)."""
    sock = netns.netlink_socket(None)
    found: dict[str, LinkCounters] = {}
    with contextlib.closing(sock):
        sock.settimeout(_TIMEOUT)
        buf = bytearray(_RECV_SIZE)
        sock.send(rtnl.dump_request(1))
        for _ in range(_MAX_DATAGRAMS):
            size = sock.recv_into(buf)
            if parse_dump(memoryview(buf)[:size], 1, found):
                break
    return found


class TrafficCollector:
    """``plexus_container_network_{receive,transmit}_{bytes,packets}_total``."""

    def __init__(self, cache: Cache,
                 dump: Callable[[], dict[str, LinkCounters]] = dump_link_counters) -> None:
        self.cache = cache
        self.dump = dump  # blocking: run on a worker thread
        self._links: dict[str, LinkCounters] = {}

    async def refresh(self) -> None:
        self._links = await asyncio.to_thread(self.dump)

    def collect(self) -> Iterator[Metric]:
        labels = ["container", "namespace", "network"]

        def family(what: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"plexus_container_network_{what}_total", doc,
                                       labels=labels)

        rx_b = family("receive_bytes", "Bytes the container received, per network.")
        tx_b = family("transmit_bytes", "Bytes the container sent, per network.")
        rx_p = family("receive_packets", "Packets the container received, per network.")
        tx_p = family("transmit_packets", "Packets the container sent, per network.")
        for key, (rb, tb, rp, tp) in sorted(self.per_container().items()):
            rx_b.add_metric(list(key), rb)
            tx_b.add_metric(list(key), tb)
            rx_p.add_metric(list(key), rp)
            tx_p.add_metric(list(key), tp)
        yield from (rx_b, tx_b, rx_p, tx_p)

    def per_container(self) -> dict[tuple[str, str, str], tuple[int, int, int, int]]:
        """(container, namespace, network) -> the container's received and sent bytes, then
        packets. Summed per key: two interfaces of one container on one network are one series
        (Prometheus refuses a scrape with a repeated series)."""
        out: dict[tuple[str, str, str], tuple[int, int, int, int]] = {}
        for ep in self.cache.local_endpoints():
            c = self._links.get(ep.host_ifname)
            if c is None:
                continue
            key = (ep.name or ep.container_id[:12], ep.namespace, ep.network)
            # The host end's transmit is what the container received, and the other way round.
            now = (c.tx_bytes, c.rx_bytes, c.tx_packets, c.rx_packets)
            was = out.get(key, (0, 0, 0, 0))
            out[key] = (was[0] + now[0], was[1] + now[1], was[2] + now[2], was[3] + now[3])
        return out

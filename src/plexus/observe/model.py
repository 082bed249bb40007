"""The model as gauges, read from the agent's cache at scrape time: networks, this host's
endpoints by network and front door, and IPAM use per pool, so exhaustion shows before it hits.

Labels are networks, subnets, drivers and front doors: bounded by configuration, never by the
number of containers. IPAM counts every host's addresses (IPAM is cluster-wide), endpoints only
this host's (each agent reports its own, so a sum over hosts counts each endpoint once).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from plexus.ipam import allocator, hostblocks
from plexus.model.types import Endpoint, Network, Subnet
from plexus.state.cache import Cache


class ModelCollector:
    """``plexus_networks``, ``plexus_endpoints``, ``plexus_ipam_*``."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        yield self._networks()
        yield self._endpoints()
        yield from self._ipam()

    def _networks(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("plexus_networks", "Networks, by driver.", labels=["driver"])
        for driver, n in sorted(Counter(n.driver for n in self.cache.networks.values()).items()):
            family.add_metric([driver], n)
        return family

    def _endpoints(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "plexus_endpoints",
            "This host's endpoints, by network and front door (plexus, cni, cni-ipam, docker).",
            labels=["network", "front_door"])
        counts = Counter((ep.network, ep.owner) for ep in self.cache.local_endpoints())
        for (network, door), n in sorted(counts.items()):
            family.add_metric([network, door], n)
        return family

    def _ipam(self) -> Iterator[GaugeMetricFamily]:
        labels = ["network", "pool"]
        used = GaugeMetricFamily("plexus_ipam_addresses_used",
                                 "Addresses held by endpoints (every host's), per pool.",
                                 labels=labels)
        free = GaugeMetricFamily("plexus_ipam_addresses_free",
                                 "Addresses still free, per pool.", labels=labels)
        blocks_used = GaugeMetricFamily(
            "plexus_ipam_blocks_used", "Per-host address blocks held, per pool of a network "
            "that spans hosts.", labels=labels)
        blocks_free = GaugeMetricFamily(
            "plexus_ipam_blocks_free", "Per-host address blocks nobody holds yet.", labels=labels)
        taken = _taken(self.cache.endpoints.values())
        for net in sorted(self.cache.networks.values(), key=lambda n: n.name):
            for subnet in net.subnets:
                key = [net.name, str(subnet.pool)]
                n_used = _used(subnet, taken.get(net.name, []))
                used.add_metric(key, n_used)
                free.add_metric(key, max(capacity(subnet) - n_used, 0))
                if net.vni:
                    held, total = self._blocks(net, subnet)
                    blocks_used.add_metric(key, held)
                    blocks_free.add_metric(key, total - held)
        yield from (used, free, blocks_used, blocks_free)

    def _blocks(self, net: Network, subnet: Subnet) -> tuple[int, int]:
        prefix = hostblocks.block_prefix(net.block_size, subnet.version)
        total = 2 ** max(prefix - subnet.cidr.prefixlen, 0)
        return len(self.cache.blocks.get(subnet.cidr, {})), total


def capacity(subnet: Subnet) -> int:
    """Addresses an endpoint may get in ``subnet``'s pool: without the network address (and
    IPv4's broadcast) and the gateway."""
    pool = subnet.pool
    kept = {a for a in allocator.unusable(subnet.cidr) if a in pool}
    if subnet.gateway is not None and subnet.gateway in pool:
        kept.add(subnet.gateway)
    return pool.num_addresses - len(kept)


def _taken(endpoints: Iterable[Endpoint]) -> dict[str, list[Endpoint]]:
    out: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        if ep.addresses:
            out.setdefault(ep.network, []).append(ep)
    return out


def _used(subnet: Subnet, endpoints: Iterable[Endpoint]) -> int:
    pool = subnet.pool
    return sum(1 for ep in endpoints for a in ep.addresses if a.ip in pool)

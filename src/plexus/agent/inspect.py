"""What is wrong with an endpoint in the kernel, read from the drivers and the firewall: CNI
CHECK's question ("is this attachment still as ADD left it?"). A read; repairs are the
reconcilers' business."""

from __future__ import annotations

from collections.abc import Mapping

from plexus.dataplane.drivers import NetworkDriver
from plexus.dataplane.nft.firewall import Firewall
from plexus.dataplane.nft.state import endpoint_publications
from plexus.model.types import Endpoint
from plexus.state.cache import Cache


class Inspector:
    def __init__(self, drivers: Mapping[str, NetworkDriver], firewall: Firewall,
                 cache: Cache) -> None:
        self._drivers = drivers
        self._firewall = firewall
        self._cache = cache

    async def endpoint_problems(self, ep: Endpoint) -> list[str]:
        net = self._cache.network(ep.network)
        if net is None:
            return [f"network {ep.network} is missing"]
        problems = await self._drivers[net.driver].check_endpoint(net, ep)
        wanted = endpoint_publications(net, ep)
        if not wanted:
            return problems
        current = await self._firewall.current()
        if current is None:
            return [*problems, "plexus's nftables table is missing or damaged"]
        return problems + [f"published port {p.host_port}/{p.protocol} is not programmed"
                           for p in sorted(wanted - current.pubs, key=str)]

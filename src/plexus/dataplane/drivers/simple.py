"""The drivers with (almost) nothing to make: host, none, ipam."""

from __future__ import annotations

from collections.abc import Mapping

from plexus.dataplane.host import container_netlink, kernel_errors
from plexus.model.drivers import DRIVERS
from plexus.model.types import Endpoint, Network

LOOPBACK_INDEX = 1


class _Nothing:
    """Programs nothing in the kernel."""

    async def ensure_network(self, net: Network) -> None:
        return None

    async def delete_network(self, net: Network) -> None:
        return None

    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        return None

    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        return None

    async def check_endpoint(self, net: Network, ep: Endpoint) -> list[str]:
        return []

    def network_links(self, net: Network) -> Mapping[str, str]:
        return {}

    def endpoint_links(self, ep: Endpoint) -> Mapping[str, str]:
        return {}


class HostDriver(_Nothing):
    """The container shares the host's namespace: there is nothing to wire."""

    traits = DRIVERS["host"]


class IpamDriver(_Nothing):
    """Addresses only: another CNI plugin (the reference bridge) makes the interfaces."""

    traits = DRIVERS["ipam"]


class NoneDriver(_Nothing):
    """A namespace with only loopback, up (as Docker's and Podman's "none")."""

    traits = DRIVERS["none"]

    @kernel_errors
    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        async with container_netlink(ep.netns) as ctr:
            await ctr.link("set", index=LOOPBACK_INDEX, state="up")

"""Fakes of the kernel-side seams: network drivers that record what they would program, and a
host view. They implement the same protocols as the real ones (``NetworkDriver``,
``HostView``), so unit tests swap them in instead of monkeypatching."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from plexus.dataplane import links
from plexus.dataplane.drivers import NetworkDriver
from plexus.dataplane.drivers.bridge import endpoint_alias, network_alias
from plexus.errors import DataplaneError, InvalidArgument
from plexus.model.drivers import DRIVERS, DriverTraits
from plexus.model.types import Endpoint, IPAddress, IPNetwork, Network


@dataclass
class FakeKernel:
    """What the fake drivers "programmed", shared by all of them. ``links`` may hold other
    agents' links too (another ``owner`` in their alias): like the real host, the fake lists
    only this agent's (and legacy) ones."""

    links: dict[str, str] = field(default_factory=dict)  # host link name -> alias (tagged)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # store key -> programmed
    calls: list[tuple[str, str]] = field(default_factory=list)  # (verb, object)
    fail_endpoint: str = ""  # an endpoint's container_id whose programming fails
    owner: str = "node1@00000000"  # this agent's tag (links.tag)

    # -- LinkTable -----------------------------------------------------------------------------

    async def owned_links(self) -> dict[str, str]:
        return {name: alias for name, alias in self.links.items()
                if links.is_owned(alias, self.owner)}

    async def delete_link(self, name: str, wait: bool = True, why: str = "") -> None:
        self.calls.append(("delete_link", name))
        self.links.pop(name, None)

    async def close(self) -> None:
        return None


class FakeDriver:
    def __init__(self, traits: DriverTraits, kernel: FakeKernel) -> None:
        self.traits = traits
        self.kernel = kernel

    def network_links(self, net: Network) -> Mapping[str, str]:
        alias = links.tag(self.kernel.owner, network_alias(net))
        return {net.bridge: alias} if self.traits.links else {}

    def endpoint_links(self, ep: Endpoint) -> Mapping[str, str]:
        alias = links.tag(self.kernel.owner, endpoint_alias(ep))
        return {ep.host_ifname: alias} if self.traits.links else {}

    async def ensure_network(self, net: Network) -> None:
        self.kernel.calls.append(("ensure_network", net.name))
        self.kernel.links.update(self.network_links(net))

    async def delete_network(self, net: Network) -> None:
        self.kernel.calls.append(("delete_network", net.name))
        for name in self.network_links(net):
            self.kernel.links.pop(name, None)

    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        self.kernel.calls.append(("ensure_endpoint", ep.key))
        if self.kernel.fail_endpoint and ep.container_id == self.kernel.fail_endpoint:
            raise DataplaneError("fake: endpoint programming failed")
        self.kernel.links.update(self.endpoint_links(ep))
        self.kernel.endpoints[ep.store_key] = ep

    async def check_endpoint(self, net: Network, ep: Endpoint) -> list[str]:
        if not self.traits.links or self.kernel.endpoints.get(ep.store_key) is not None:
            return []
        return [f"{ep.key} is not programmed"]

    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        self.kernel.calls.append(("delete_endpoint", ep.key))
        for name in self.endpoint_links(ep):
            self.kernel.links.pop(name, None)
        self.kernel.endpoints.pop(ep.store_key, None)


def fake_drivers(kernel: FakeKernel) -> dict[str, NetworkDriver]:
    return {name: FakeDriver(t, kernel) for name, t in DRIVERS.items()}


@dataclass
class FakeHost:
    """``HostView`` with made-up routes and namespaces that exist when listed (or always)."""

    prefixes: list[tuple[IPNetwork, str]] = field(default_factory=list)
    namespaces: set[str] | None = None  # None: every path is a namespace
    addresses: set[str] | None = None  # None: every address is the host's

    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]:
        return list(self.prefixes)

    async def has_address(self, ip: IPAddress) -> bool:
        return self.addresses is None or str(ip) in self.addresses

    def check_netns(self, path: str) -> None:
        if self.namespaces is not None and path not in self.namespaces:
            raise InvalidArgument("netns", path, "no such network namespace")

"""Network drivers: how each kind of network is made in the kernel. One registry, one protocol.

A driver programs the links, addresses and routes of one kind of network and of the endpoints
on it; the firewall and DNS are other reconcilers' business. Every verb is idempotent: ``ensure``
creates or confirms, ``delete`` tolerates "not found". A driver also says, purely, which links
it makes in the host's namespace for a network or an endpoint (``network_links``,
``endpoint_links``: name -> the alias it writes, ``links.tag``), so the periodic pass can tell a
missing link from an orphan without asking each driver to look.

A driver of networks that span hosts (``SpanningDriver``: the overlay) also follows the
network's other hosts, for the overlay reconciler.

The kinds and their traits are in ``plexus.model.drivers``; ``build_drivers`` makes one
implementation per kind, the only place that chooses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from plexus.dataplane.host import HostNetlink
from plexus.model.drivers import DRIVERS, DriverTraits
from plexus.model.types import Endpoint, Network

if TYPE_CHECKING:
    from plexus.dataplane.drivers.overlay import OverlayPeers


class NetworkDriver(Protocol):
    traits: DriverTraits

    async def ensure_network(self, net: Network) -> None: ...

    async def delete_network(self, net: Network) -> None: ...

    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        """Programs the endpoint's links, addresses and routes (the container's end is born in
        its namespace, or left in the host's for a runtime that moves it: ``peer_in_host``)."""
        ...

    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        """``wait=False``: return once the deletion is under way; an ensure of the same endpoint
        waits for it to finish."""
        ...

    async def check_endpoint(self, net: Network, ep: Endpoint) -> list[str]:
        """What is wrong with the endpoint in the kernel (a read, for CNI CHECK): [] if
        nothing."""
        ...

    def network_links(self, net: Network) -> Mapping[str, str]: ...

    def endpoint_links(self, ep: Endpoint) -> Mapping[str, str]: ...


@runtime_checkable
class SpanningDriver(NetworkDriver, Protocol):
    """A driver of networks that span hosts: it also follows the network's other hosts."""

    async def sync_peers(self, name: str) -> None:
        """Bring network ``name``'s entries for the other hosts in step with desired state."""
        ...

    def forget_peers(self, name: str) -> None:
        """Forget what was applied: the next ``sync_peers`` compares with the kernel."""
        ...


@runtime_checkable
class Closing(Protocol):
    async def close(self) -> None: ...


def build_drivers(host: HostNetlink, owner: str, peers: OverlayPeers) -> dict[str, NetworkDriver]:
    """One driver per kind of network the model knows; ``owner`` tags the links they make,
    ``peers`` is the overlay's read view of the other hosts (the cache's)."""
    from plexus.dataplane.drivers.bridge import BridgeDriver
    from plexus.dataplane.drivers.overlay import OverlayDriver
    from plexus.dataplane.drivers.simple import HostDriver, IpamDriver, NoneDriver

    made: dict[str, NetworkDriver] = {
        "bridge": BridgeDriver(host, owner),
        "overlay": OverlayDriver(host, owner, peers),
        "host": HostDriver(),
        "none": NoneDriver(),
        "ipam": IpamDriver(),
    }
    missing = set(DRIVERS) ^ set(made)
    if missing:  # a kind added to the model without an implementation, or the reverse
        raise RuntimeError(f"network drivers out of step with the model: {sorted(missing)}")
    return made


async def close_drivers(drivers: Mapping[str, NetworkDriver]) -> None:
    """Release what drivers hold (the overlay's netlink socket and thread)."""
    for driver in drivers.values():
        if isinstance(driver, Closing):
            await driver.close()

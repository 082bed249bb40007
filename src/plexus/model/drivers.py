"""The kinds of network plexus knows, and what each kind means to the rest of the model.

A driver's *traits* are what services, the firewall and DNS need to know of a network without
asking which driver it is: does it hand out addresses, does it need the container's namespace, can
it publish ports, does plexus filter it. The kernel side of each kind lives in
``plexus.dataplane.drivers`` (one implementation per name here; the wiring checks they agree).
New kinds (vxlan, macvlan, ipvlan) add a line here and a module there, and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from plexus.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class DriverTraits:
    name: str
    allocates: bool  # plexus hands out addresses from the network's subnets
    subnets: bool  # takes --subnet (and gets automatic ones)
    needs_netns: bool  # the endpoint is a container's network namespace plexus wires
    links: bool  # plexus makes interfaces (a veth with a host end)
    publishes: bool  # host ports can be published to endpoints (DNAT)
    filtered: bool  # plexus's firewall isolates and masquerades it
    dns: bool  # the embedded DNS server listens on its gateways
    routes: bool  # endpoints get default routes via the subnets' gateways
    foreign_links: bool = False  # serves only another plugin's endpoints (CNI IPAM mode)
    spans_hosts: bool = False  # one network across the cluster's hosts: per-host blocks, a VNI
    description: str = ""


DRIVERS: dict[str, DriverTraits] = {
    t.name: t
    for t in (
        DriverTraits(
            "bridge", allocates=True, subnets=True, needs_netns=True, links=True,
            publishes=True, filtered=True, dns=True, routes=True,
            description="a Linux bridge per network, a veth per container, NAT to the outside",
        ),
        DriverTraits(
            "overlay", allocates=True, subnets=True, needs_netns=True, links=True,
            publishes=True, filtered=True, dns=True, routes=True, spans_hosts=True,
            description="one network across hosts: a bridge per host, VXLAN between them",
        ),
        DriverTraits(
            "host", allocates=False, subnets=False, needs_netns=False, links=False,
            publishes=False, filtered=False, dns=False, routes=False,
            description="the host's own network namespace",
        ),
        DriverTraits(
            "none", allocates=False, subnets=False, needs_netns=True, links=False,
            publishes=False, filtered=False, dns=False, routes=False,
            description="only loopback in the container's namespace",
        ),
        DriverTraits(
            "ipam", allocates=True, subnets=True, needs_netns=False, links=False,
            publishes=False, filtered=False, dns=False, routes=True, foreign_links=True,
            description="addresses only, for another CNI plugin that makes the interfaces",
        ),
    )
}


def traits(name: str) -> DriverTraits:
    found = DRIVERS.get(name)
    if found is None:
        raise InvalidArgument("driver", name, f"one of {', '.join(DRIVERS)}")
    return found


# An overlay network's option (-o): tx checksum offload of its VXLAN devices, "on" or "off"
# (the default; dataplane/overlay/render.py says why).
OFFLOAD_OPTION = "vxlan-offload"

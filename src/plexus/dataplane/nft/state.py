"""What the firewall must hold, as plain values: the input of the renderers.

``firewall_state`` turns model objects into a ``FirewallState``; ``NftFirewall.current`` reads one
back from the kernel. Both return the *canonical* form (sorted, deduplicated, flags that cannot
matter cleared), so a reconciler can compare the two with ``==``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from plexus.dataplane.overlay.model import device_name
from plexus.errors import InvalidArgument
from plexus.model.drivers import traits
from plexus.model.types import Endpoint, IPAddress, IPNetwork, Network, PortMapping, Protocol

# Docker's network option, and our own shorter spelling; both default to "true".
MASQUERADE_OPTIONS = ("com.docker.network.bridge.enable_ip_masquerade", "masquerade")


@dataclass(frozen=True, slots=True)
class NetRule:
    """One bridge network as the firewall sees it. ``tunnel``: the network's other link on
    this host, if it has one (an overlay's VXLAN device, which carries its traffic to and from
    the other hosts): part of the network for isolation and masquerade, as the bridge is.
    ``clients``: the addresses that this host's containers attached to this network hold on
    their *other* networks (a multi-homed container's VIP connection leaves through its
    default route's network, with that network's address; it is a member of this one all the
    same: ``vip_clients4``/``vip_clients6`` in ``render``)."""

    bridge: str
    subnets: tuple[IPNetwork, ...]
    internal: bool = False
    masquerade: bool = True
    tunnel: str = ""
    clients: tuple[IPAddress, ...] = ()

    def canonical(self) -> NetRule:
        # An internal network never reaches the outside, and a network without subnets has
        # nothing to masquerade: the flag cannot be observed (nor read back), so clear it.
        masq = self.masquerade and not self.internal and bool(self.subnets)
        clients = tuple(sorted(set(self.clients), key=lambda a: (a.version, a)))
        return NetRule(self.bridge, _sorted_nets(self.subnets), self.internal, masq, self.tunnel,
                       clients)


@dataclass(frozen=True, slots=True)
class Publication:
    """One published (host port → container port) pair of one address family.

    ``host_ip`` None means every local address of ``container_ip``'s family.
    """

    protocol: Protocol
    host_ip: IPAddress | None
    host_port: int
    container_ip: IPAddress
    container_port: int

    def __post_init__(self) -> None:
        # The two would land in one family's map with the other family's key: the kernel
        # would refuse the whole batch, so refuse the one value here.
        if self.host_ip is not None and self.host_ip.version != self.container_ip.version:
            raise InvalidArgument("host_ip", str(self.host_ip), "not the container's family")

    @property
    def version(self) -> int:
        return self.container_ip.version

    @property
    def key(self) -> PublicationKey:
        """What the kernel looks up: two publications with one key cannot both be installed."""
        return _key(self)


@dataclass(frozen=True, slots=True)
class FirewallState:
    nets: tuple[NetRule, ...] = ()
    pubs: frozenset[Publication] = frozenset()
    # Set only by canonical() (not an __init__ argument, so dataclasses.replace() drops it):
    # lets update() skip an O(publications) pass on states that came from firewall_state() or
    # current(). Not part of equality.
    _canonical: bool = field(default=False, init=False, compare=False, repr=False)

    def canonical(self) -> FirewallState:
        if self._canonical:
            return self
        nets = {n.bridge: n.canonical() for n in self.nets}
        state = FirewallState(tuple(nets[b] for b in sorted(nets)), unique_by_key(self.pubs))
        object.__setattr__(state, "_canonical", True)
        return state


PublicationKey = tuple[IPAddress | None, Protocol, int, int]  # host ip, proto, port, version
# attrgetter: this runs for every publication of every update, and a property costs twice as much
_key = operator.attrgetter("host_ip", "protocol", "host_port", "container_ip.version")


def unique_by_key(pubs: Iterable[Publication]) -> frozenset[Publication]:
    """Keep one publication per kernel key; the smallest (deterministic) wins.

    The kernel refuses a second map element with the same key, so a conflict that slipped past
    validation must not make the whole batch fail. Without conflicts the input set itself is
    returned (building a new one would re-hash every publication).
    """
    pubs = pubs if isinstance(pubs, frozenset) else frozenset(pubs)
    chosen: dict[PublicationKey, Publication] = {}
    for pub in pubs:
        other = chosen.setdefault(_key(pub), pub)
        if other is not pub and _pub_order(pub) < _pub_order(other):
            chosen[_key(pub)] = pub
    return pubs if len(chosen) == len(pubs) else frozenset(chosen.values())


def firewall_state(networks: Iterable[Network], endpoints: Iterable[Endpoint]) -> FirewallState:
    """The firewall for these networks and (this host's) endpoints, in canonical form.

    Only networks whose driver plexus filters (``DriverTraits.filtered``, the bridge) are; only
    those that publish have publications, and none on internal networks (which never receive
    outside traffic).
    """
    filtered = {n.name: n for n in networks if traits(n.driver).filtered}
    endpoints = list(endpoints)
    by_container: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        by_container.setdefault(ep.container_id, []).append(ep)
    clients: dict[str, set[IPAddress]] = {}
    for eps in by_container.values():
        for name, addresses in vip_clients(eps).items():
            clients.setdefault(name, set()).update(addresses)
    nets = tuple(net_rule(n, clients.get(n.name, ())) for n in filtered.values())
    pubs: list[Publication] = []
    for ep in endpoints:
        pubs.extend(endpoint_publications(filtered.get(ep.network), ep))
    return FirewallState(nets, frozenset(pubs)).canonical()


def vip_clients(endpoints: Iterable[Endpoint]) -> dict[str, frozenset[IPAddress]]:
    """One container's endpoints (on one host) → network name → the addresses the container
    holds on its other networks (``NetRule.clients``); empty for a container on one network,
    so that only multi-homed containers cost anything."""
    eps = list(endpoints)
    if len({ep.network for ep in eps}) < 2:
        return {}
    out: dict[str, frozenset[IPAddress]] = {}
    for ep in eps:
        others = frozenset(a.ip for o in eps if o.network != ep.network for a in o.addresses)
        if others:
            out[ep.network] = others
    return out


def endpoint_publications(net: Network | None, ep: Endpoint) -> frozenset[Publication]:
    """What one endpoint publishes, given its network (None: unknown, so nothing)."""
    if net is None or net.internal or not traits(net.driver).publishes:
        return frozenset()
    return frozenset(publications(ep))


def publications(ep: Endpoint) -> Iterator[Publication]:
    """Every (port pair, address family) of an endpoint's port mappings."""
    for pm in ep.ports:
        for version in (4, 6):
            container_ip = ep.address_of(version)
            if container_ip is not None and _serves_family(pm, version):
                host_ip = None if pm.host_ip is None or pm.host_ip.is_unspecified else pm.host_ip
                for host_port, container_port in pm.pairs():
                    yield Publication(pm.protocol, host_ip, host_port, container_ip, container_port)


def _serves_family(pm: PortMapping, version: int) -> bool:
    # A host address (including 0.0.0.0 or ::, "every address of that family") pins the family.
    return pm.host_ip is None or pm.host_ip.version == version


def net_rule(net: Network, clients: Iterable[IPAddress] = ()) -> NetRule:
    masq = all(net.options.get(k, "true").lower() != "false" for k in MASQUERADE_OPTIONS)
    tunnel = device_name(net.id) if traits(net.driver).spans_hosts else ""
    return NetRule(net.bridge, tuple(s.cidr for s in net.subnets), net.internal, masq, tunnel,
                   tuple(clients))


def _sorted_nets(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(set(nets), key=lambda n: (n.version, n)))


def _pub_order(p: Publication) -> tuple[int, int, str, int, int, int]:
    host = -1 if p.host_ip is None else int(p.host_ip)
    return (p.version, host, p.protocol, p.host_port, int(p.container_ip), p.container_port)


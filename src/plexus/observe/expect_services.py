"""What the model promises of services (pure, like ``observe.expect``, over the same snapshot):
which local containers must reach which VIP ports, which must not, and which must be refused.

The rules are those of ``table inet plexus_services`` (``dataplane/nft/lb.py``) and the
firewall after it:

- A service port with ready endpoints: a client on the service's network reaches VIP:port (the
  VIP is DNATed to one of them), unless network policy denies it the endpoints (policy judges
  the endpoint after DNAT: every endpoint's verdict is computed, and a port some allow and
  others deny cannot be decided by one probe). A client on another network does not: isolation
  between networks applies to a VIP's traffic as to its endpoints'.
- A service port without a ready endpoint refuses: a TCP reset (a UDP port: ICMP port
  unreachable), answered by the host before any routing.

Clients: this host's containers whose default route (of the VIP's family) leaves by an
endpoint on a filtered network (a VIP is no neighbour: the packet goes to the gateway), at
most ``MAX_CLIENTS`` per side per service, by name; a service's own endpoints are no clients
(a connection drawn to its own source needs hairpin on the bridge port, a link-layer matter
verified elsewhere). A container with an endpoint on the service's network whose default route
leaves by another network is left out: which network its packet is judged on is not the
service's rule to say. Only TCP probes of a port with endpoints: an empty UDP datagram draws no
answer from a listening endpoint, so its silence says nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from plexus.lb.members import target_of
from plexus.lb.spec import Service, ServicePort
from plexus.model.types import Endpoint, IPAddress, Network
from plexus.observe.expect import (
    PROTOCOLS,
    Expectation,
    Model,
    Served,
    apart,
    because,
    expectations,
    filtered,
    flow,
    sources,
)
from plexus.policy.evaluate import Evaluator

MAX_CLIENTS = 2  # per service, on its network and on others: a VIP is one rule, not N pairs


def expected(model: Model, network: str | None = None) -> list[Expectation]:
    """Every probe of this host: the containers' pairs and publications, and the VIPs."""
    return [*expectations(model, network), *vips(model, network)]


def vips(model: Model, network: str | None = None) -> list[Expectation]:
    """The VIP probes of this host; ``network``: those whose client or service is on it."""
    nets = filtered(model)
    by_container = sources(model, (e for e in model.endpoints if e.network in nets
                                   and e.addresses))
    ev = Evaluator(model.policies, model.namespaces)
    out: list[Expectation] = []
    for served in model.services:
        svc = served.service
        if svc.network not in nets:
            continue
        for vip in svc.vips:
            same, other = clients(nets, by_container, served, vip.version)
            if network not in (None, svc.network):
                same = [c for c in same if c.network == network]
                other = [c for c in other if c.network == network]
            for port in svc.ports:
                if port.protocol in PROTOCOLS:
                    out.extend(_port(ev, nets, served, vip, port, same, other))
    return out


def clients(nets: Mapping[str, Network], by_container: Mapping[str, list[Endpoint]],
            served: Served, version: int) -> tuple[list[Endpoint], list[Endpoint]]:
    """The endpoints a VIP probe leaves by: of clients on the service's network, and of
    clients with no endpoint on it."""
    svc, backs = served.service, {(e.node, e.container_id) for e in served.ready}
    same: list[Endpoint] = []
    other: list[Endpoint] = []
    for eps in sorted(by_container.values(), key=lambda x: (x[0].name, x[0].container_id)):
        out = _routed(eps, version)
        if out is None or (out.node, out.container_id) in backs or nets[out.network].internal:
            continue
        if out.network == svc.network:
            same.append(out)
        elif all(e.network != svc.network for e in eps):
            other.append(out)
    return same[:MAX_CLIENTS], other[:MAX_CLIENTS]


def _routed(eps: list[Endpoint], version: int) -> Endpoint | None:
    """The endpoint holding the container's default route of ``version``."""
    return next((e for e in eps if e.address_of(version) is not None
                 and any(g.version == version for g in e.gateways)), None)


def _port(ev: Evaluator, nets: Mapping[str, Network], served: Served, vip: IPAddress,
          port: ServicePort, same: list[Endpoint], other: list[Endpoint]
          ) -> Iterator[Expectation]:
    svc = served.service
    backends = tuple((ep, t) for ep in served.ready
                     if ep.address_of(vip.version) is not None
                     and (t := target_of(port, ep)) is not None)
    if not backends:
        why = f"service {svc.ref} has no ready endpoint for {port}: refused"
        for c in same:
            yield Expectation(c, None, vip, port.port, port.protocol, False, why,
                              service=svc, refused=True)
        return
    if port.protocol != "tcp":
        return
    for c in same:
        yield _through(ev, c, svc, vip, port, backends)
    for c in other:
        why = f"{apart(nets[c.network], nets[svc.network])} (service {svc.ref}'s VIP)"
        yield Expectation(c, None, vip, port.port, port.protocol, False, why, service=svc,
                          backends=backends)


def _through(ev: Evaluator, src: Endpoint, svc: Service, vip: IPAddress, port: ServicePort,
             backends: tuple[tuple[Endpoint, int], ...]) -> Expectation:
    """A client on the service's network: reachable unless policy denies every endpoint."""
    verdicts = []
    for ep, target in backends:
        address = ep.address_of(vip.version)
        assert address is not None
        verdicts.append(ev.verdict(flow(src, ep, address, target, port.protocol)))
    allowed = {v.allowed for v in verdicts}
    why = f"service {svc.ref} ({len(backends)} ready); {because(verdicts[0])}"
    undecided = "" if len(allowed) == 1 else \
        "policy allows some of its endpoints and denies others (one probe reaches one)"
    return Expectation(src, None, vip, port.port, port.protocol, True in allowed, why,
                       decidable=undecided, service=svc, backends=backends)

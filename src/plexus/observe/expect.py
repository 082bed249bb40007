"""What the model promises: which local containers must reach which endpoints on which ports,
and which must not, each with the reason (pure: a ``Model`` snapshot in, ``Expectation`` out).

The rules are those the dataplane enforces (``dataplane/nft/render.py``, ``policy.evaluate``):

- Two containers that share a network reach each other over it (within one host, or across
  hosts on a network that spans them), unless network policy denies the connection: the verdict
  of ``policy.evaluate`` for (source, destination, port, protocol) decides, with its rules.
- A container reaches no other network's containers: isolation between networks, or an
  internal network (which nothing outside it reaches and which reaches nothing outside it).
- A published port (host port -> container port) reaches its container from another container
  (through the host address its packets leave by, its default gateway) or from the host itself,
  unless policy denies the source the container's port. Publications on internal networks are
  never installed, and a publication on 127.0.0.1 only serves the host's own loopback: both are
  left out.

Which ports: the default probe port (80/tcp), the target's exposed ports (``--expose``), its
published container ports and every port policies name (a range: its two ends), at most
``MAX_PORTS`` per target. Only endpoints of filtered networks (bridge, overlay) whose container
lives on this host are sources: a network namespace is only reachable on its own host, so each
host verifies the pairs whose source it holds. Services (load-balanced VIPs) are another
generator over the same snapshot: ``observe.expect_services``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from plexus.lb.spec import Service
from plexus.model.drivers import traits
from plexus.model.types import Endpoint, IPAddress, Network, PortMapping
from plexus.observe.services import ready
from plexus.policy.evaluate import Evaluator, Flow, Party, Verdict
from plexus.policy.model import Direction, Policy
from plexus.services.explain import workload
from plexus.state.cache import Cache

DEFAULT_PORT = (80, "tcp")
MAX_PORTS = 8  # per target: bounds the probes a target with many exposed ports costs
MAX_PUBLISHED = 4  # host ports probed of one published range
PROTOCOLS = ("tcp", "udp")  # what a socket can probe without the application's help


@dataclass(frozen=True, slots=True)
class Served:
    """A service with a VIP, and its ready endpoints (every host's) as the load balancer has
    them (``lb.members.serving``)."""

    service: Service
    ready: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Model:
    """What verify reads of the cache, copied on the event loop so that the computation can run
    on another thread while the cache moves on."""

    node: str
    networks: Mapping[str, Network]
    endpoints: tuple[Endpoint, ...]  # every node's, ready
    policies: tuple[Policy, ...] = ()
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    services: tuple[Served, ...] = ()

    @staticmethod
    def of(cache: Cache) -> Model:
        eps = tuple(e for e in cache.endpoints.values() if e.state == "ready")
        served = tuple(Served(svc, tuple(ready(cache, key, svc)))
                       for key, svc in sorted(cache.services.items())
                       if svc.vips and not svc.headless)
        return Model(cache.node, dict(cache.networks), eps, tuple(cache.policies.values()),
                     {n: ns.all_labels for n, ns in cache.namespaces.items()}, served)


@dataclass(frozen=True, slots=True)
class Expectation:
    """One probe and what the model says of it. ``src`` is None for a probe from the host
    itself; ``port`` is what the packet asks for (the host port of a publication); ``dst`` is
    None for a probe of a service's VIP (``service`` says which)."""

    src: Endpoint | None
    dst: Endpoint | None
    address: IPAddress
    port: int
    protocol: str
    reachable: bool
    reason: str
    container_port: int = 0  # a publication's: the port the container serves
    decidable: str = ""  # why not, when known before probing ("" if it is)
    service: Service | None = None  # the service whose VIP ``address`` is
    # A VIP's ready endpoints for this port, with the container port each serves it on.
    backends: tuple[tuple[Endpoint, int], ...] = ()
    refused: bool = False  # the model expects a reset (a service without ready endpoints)

    @property
    def published(self) -> bool:
        return self.container_port != 0

    @property
    def target(self) -> Endpoint:
        """The container probed (not for a VIP: ``service``, ``backends``)."""
        assert self.dst is not None
        return self.dst


def expectations(model: Model, network: str | None = None) -> list[Expectation]:
    """Every probe this host can make, and its expected outcome; ``network``: only those whose
    source or destination is on it."""
    nets = filtered(model)
    eps = [e for e in model.endpoints if e.network in nets and e.addresses]
    by_container = sources(model, eps)
    ev = Evaluator(model.policies, model.namespaces)
    ports = policy_ports(model.policies)
    out: list[Expectation] = []
    for mine in by_container.values():
        for dst in eps:
            if dst.container_id == mine[0].container_id and dst.node == model.node:
                continue
            if not _wanted(network, mine, dst) or not _comparable(model.node, nets, mine, dst):
                continue
            out.extend(_pair(ev, nets, mine, dst, ports))
    for dst in eps:
        if dst.node == model.node and dst.ports and not nets[dst.network].internal \
                and network in (None, dst.network):
            out.extend(_published(ev, nets, by_container, dst))
    return out


def filtered(model: Model) -> dict[str, Network]:
    """The networks whose traffic the firewall judges (bridge, overlay): the only ones
    verified."""
    return {n: net for n, net in model.networks.items() if traits(net.driver).filtered}


def sources(model: Model, eps: Iterable[Endpoint]) -> dict[str, list[Endpoint]]:
    """This host's containers among ``eps`` (by container ID): the probes' sources."""
    by_container: dict[str, list[Endpoint]] = {}
    for e in eps:
        if e.node == model.node and e.netns:
            by_container.setdefault(e.container_id, []).append(e)
    return by_container


def _wanted(network: str | None, mine: list[Endpoint], dst: Endpoint) -> bool:
    return network is None or dst.network == network or any(e.network == network for e in mine)


def _comparable(node: str, nets: Mapping[str, Network], mine: list[Endpoint],
                dst: Endpoint) -> bool:
    """Another host's endpoint only on a network that spans hosts: a bridge network of the same
    name there is another segment, which nothing here routes to."""
    return dst.node == node or traits(nets[dst.network].driver).spans_hosts


def policy_ports(policies: Iterable[Policy]) -> list[tuple[int, str]]:
    """Every numbered port a policy rule names, with its protocol (a range: both ends)."""
    found: set[tuple[int, str]] = set()
    for p in policies:
        for d in Direction:
            for rule in p.rules(d):
                for m in rule.ports:
                    protos = [m.protocol] if m.protocol else list(PROTOCOLS)
                    for proto in (x for x in protos if x in PROTOCOLS and m.port):
                        found.update((n, proto) for n in {m.port, m.end or m.port})
    return sorted(found)


def target_ports(dst: Endpoint, policy: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The ports to probe on ``dst``, the default first, at most MAX_PORTS."""
    wanted = [DEFAULT_PORT, *((x.port, x.protocol) for x in dst.exposes),
              *((p.container_port, p.protocol) for p in dst.ports), *policy]
    out: list[tuple[int, str]] = []
    for item in wanted:
        if item[1] in PROTOCOLS and item not in out:
            out.append(item)
    return out[:MAX_PORTS]


def _pair(ev: Evaluator, nets: Mapping[str, Network], mine: list[Endpoint], dst: Endpoint,
          ports: list[tuple[int, str]]) -> Iterator[Expectation]:
    for version in (4, 6):
        address = dst.address_of(version)
        src = _leaving(mine, dst.network, version)
        if address is None or src is None:
            continue
        for port, proto in target_ports(dst, ports):
            if src.network == dst.network:
                verdict = ev.verdict(flow(src, dst, address, port, proto))
                ok, why = verdict.allowed, f"network {dst.network}; {because(verdict)}"
            else:
                ok, why = False, apart(nets[src.network], nets[dst.network])
            out = Expectation(src, dst, address, port, proto, ok, why)
            if proto == "udp" and dst.node != src.node:
                out = _undecidable(out, "UDP to another host's container (its sockets unseen)")
            yield out


def _undecidable(e: Expectation, why: str) -> Expectation:
    return replace(e, decidable=why)


def _leaving(mine: list[Endpoint], network: str, version: int) -> Endpoint | None:
    """The endpoint a packet to ``network`` leaves by: the one on it, else the one holding the
    default route of that family, else any with an address of it (no route: it goes nowhere)."""
    having = [e for e in mine if e.address_of(version) is not None]
    on = [e for e in having if e.network == network]
    if on:
        return on[0]
    routed = [e for e in having if any(g.version == version for g in e.gateways)]
    return next(iter(routed or having), None)


def apart(src: Network, dst: Network) -> str:
    if dst.internal:
        return f"internal network {dst.name}"
    if src.internal:
        return f"internal network {src.name}"
    return f"isolation: networks {src.name} and {dst.name}"


def flow(src: Endpoint, dst: Endpoint, address: IPAddress, port: int, proto: str) -> Flow:
    src_ip = src.address_of(address.version)
    assert src_ip is not None
    return Flow(Party(src_ip, workload(src)), Party(address, workload(dst)), proto, port)


def because(verdict: Verdict) -> str:
    """The rules that decided, as a reader says them: "policy x/a ingress[0] denies"."""
    if not verdict.steps:
        return "no policy selects either end"
    parts = []
    for s in verdict.steps:
        what = {"allow": "allows", "pass": "passes"}.get(s.effect.value, "denies")
        name = f"policy {s.policy}" if s.policy else "default"
        parts.append(f"{name} {s.rule} {what} ({s.direction.value})")
    return "; ".join(parts)


def _published(ev: Evaluator, nets: Mapping[str, Network],
               by_container: Mapping[str, list[Endpoint]], dst: Endpoint) -> Iterator[Expectation]:
    for mapping in dst.ports:
        address = dst.address_of(4 if mapping.host_ip is None else mapping.host_ip.version)
        if address is None or (mapping.host_ip is not None and mapping.host_ip.is_loopback):
            continue
        src = _client(nets, by_container, dst, address.version)
        for host_port, port in mapping.pairs()[:MAX_PUBLISHED]:
            yield _publication(ev, nets, src, dst, mapping, host_port, port)


def _publication(ev: Evaluator, nets: Mapping[str, Network], src: Endpoint | None,
                 dst: Endpoint, mapping: PortMapping, host_port: int,
                 port: int) -> Expectation:
    container = dst.address_of(4 if mapping.host_ip is None else mapping.host_ip.version)
    assert container is not None
    target = mapping.host_ip or _host_address(nets, src, dst, container.version)
    why = f"published port {host_port} -> {dst.name or dst.container_id[:12]}:{port}"
    if target is None:
        return Expectation(src, dst, container, host_port, mapping.protocol, True, why, port,
                           "no host address to call it on")
    ok = True
    if src is not None:
        verdict = ev.verdict(flow(src, dst, container, port, mapping.protocol))
        ok, why = verdict.allowed, f"{why}; {because(verdict)}"
    out = Expectation(src, dst, target, host_port, mapping.protocol, ok, why, port)
    if mapping.protocol != "tcp":
        out = _undecidable(out, "a published UDP port answers like the host's own closed port")
    return out


def _client(nets: Mapping[str, Network], by_container: Mapping[str, list[Endpoint]],
            dst: Endpoint, version: int) -> Endpoint | None:
    """A local container to call a publication from: one with a default route of the family on
    a network that is not internal, on another network than ``dst``'s if any (the path an
    outside client takes: DNAT, then forward); None: the host calls it itself."""
    found = [e for eps in by_container.values() if eps[0].container_id != dst.container_id
             for e in eps if any(g.version == version for g in e.gateways)
             and not nets[e.network].internal]
    others = [e for e in found if e.network != dst.network]
    return next(iter(others or found), None)


def _host_address(nets: Mapping[str, Network], src: Endpoint | None, dst: Endpoint,
                  version: int) -> IPAddress | None:
    """An address of this host that ``src`` reaches: its gateway (the host's end of its
    network); for the host itself, the gateway of ``dst``'s network."""
    if src is not None:
        return next((g for g in src.gateways if g.version == version), None)
    return next((s.gateway for s in nets[dst.network].subnets_of(version)
                 if s.gateway is not None), None)

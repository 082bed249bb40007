"""The policies in force as set and map elements (docs/policy.md): pure, from plain inputs.

For every identity of this host's endpoints (the *local* identities) and each direction a
policy selects it in, every identity of the cluster and of the outside (the *peers*) gets its
decision per protocol and port range, computed by the evaluator (``evaluate``, the one meaning
of the model) for one representative port of each range the rules cut. Each decision becomes
the fewest elements that reproduce it under the lookup order of the compiled chains: exact port,
port range, protocol, any protocol, then the local identity's default (deny when it is isolated).
A cell equal to what the later lookups already give adds nothing.

Element keys put the source identity first: egress rows are (local, peer, ...), ingress rows
(peer, local, ...). Verdicts name a chain per policy and outcome (``targets``), which counts
and then allows (``return``), drops, or, for an audit policy, logs and allows.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from plexus.model.types import Endpoint, IPAddress, IPNetwork
from plexus.policy import identity
from plexus.policy.evaluate import Decision, Evaluator, Flow, Party
from plexus.policy.identity import Key, Numbers
from plexus.policy.model import Direction, Policy, Tier

PORT_PROTOCOLS = ("tcp", "udp", "sctp")
OTHER = "icmp"  # stands for every protocol without ports
ALLOW_DEFAULT = Decision(True)
RETURN = "return"  # the target of "allowed, and no policy to count it"
MAPS = ("port", "range", "proto", "any", "default")


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int


@dataclass(frozen=True)
class Inputs:
    policies: Sequence[Policy]
    namespaces: Mapping[str, Mapping[str, str]]  # name -> labels
    endpoints: Sequence[Endpoint]  # every host's
    node: str
    hosts: Sequence[IPAddress] = ()  # the other hosts' addresses


@dataclass
class Compiled:
    ids: dict[IPAddress, int] = field(default_factory=dict)  # endpoints' and hosts' addresses
    world: dict[IPNetwork, int] = field(default_factory=dict)  # the rest of the address space
    policed: dict[Direction, set[IPAddress]] = field(
        default_factory=lambda: {d: set() for d in Direction})
    # (direction, map) -> {key: target}; map in MAPS
    cells: dict[tuple[Direction, str], dict[tuple[object, ...], str]] = field(
        default_factory=lambda: {(d, m): {} for d in Direction for m in MAPS})
    chains: dict[str, str] = field(default_factory=dict)  # chain base -> "Kind ref"


def chain_base(policy: str) -> str:
    """A policy's chains' common name: short, stable, and safe in nft."""
    return "p" + hashlib.sha1(policy.encode()).hexdigest()[:10]


def target(decision: Decision, chains: dict[str, str]) -> str:
    if not decision.policy:
        return RETURN
    base = chain_base(decision.policy)
    chains[base] = decision.policy
    outcome = "audit" if decision.audit else "allow" if decision.allowed else "deny"
    return f"{base}-{outcome}"


class Compiler:
    """Compiles whole states; keeps identity numbers stable from one state to the next."""

    def __init__(self) -> None:
        self.numbers = Numbers()

    def compile(self, inputs: Inputs) -> Compiled:
        out = Compiled()
        peers = identity.cidr_peers(inputs.policies)
        cuts = {v: identity.cut(peers, v) for v in (4, 6)}
        reps: dict[Key, Party] = {}
        local: dict[Key, list[IPAddress]] = {}
        for ep in inputs.endpoints:
            for iface in ep.addresses:
                key = identity.endpoint_key(ep, iface.ip, peers, cuts)
                out.ids[iface.ip] = self.numbers.number(key)
                reps.setdefault(key, identity.representative(key, iface.ip))
                if ep.node == inputs.node:
                    local.setdefault(key, []).append(iface.ip)
        for address in inputs.hosts:
            out.ids.setdefault(address, identity.RESERVED[identity.REMOTE_HOST])
            reps.setdefault(identity.REMOTE_HOST,
                            identity.representative(identity.REMOTE_HOST, address))
        for version, c in cuts.items():
            for piece in c.pieces:
                key = identity.world_key(piece)
                number = self.numbers.number(key)
                for prefix in identity.prefixes(piece, version):
                    out.world[prefix] = number
                first = identity.prefixes(piece, version)[0].network_address
                reps.setdefault(key, identity.representative(key, first))
        self.numbers.retain(reps)
        ev = Evaluator(inputs.policies, inputs.namespaces)
        for key, addresses in local.items():
            for direction in Direction:
                _row(ev, out, direction, reps[key], self.numbers.number(key), addresses,
                     {self.numbers.number(k): p for k, p in reps.items()})
        return out


def _row(ev: Evaluator, out: Compiled, direction: Direction, me: Party, my_id: int,
         addresses: list[IPAddress], peers: dict[int, Party]) -> None:
    assert me.workload is not None
    mine = [p for p in ev.policies if ev.selects(p, me.workload)
            and (p.rules(direction) or direction in p.isolates)]
    if not mine:
        return
    out.policed[direction].update(addresses)
    default = _default(mine, direction)
    if default is not None:
        out.cells[(direction, "default")][(my_id,)] = target(default, out.chains)
    bounds = _bounds(mine, direction)
    for peer_id, peer in peers.items():
        key = (my_id, peer_id) if direction is Direction.EGRESS else (peer_id, my_id)
        named = _named(peer if direction is Direction.EGRESS else me, mine, direction)
        _cell(ev, out, direction, me, peer, key, default, bounds, named)


def _default(mine: list[Policy], direction: Direction) -> Decision | None:
    """What an isolated local identity gets when nothing matches: the first isolating
    policy's deny (an audit policy's audit, if only audit policies isolate it)."""
    isolating = [p for p in mine if p.tier is Tier.NAMESPACED and direction in p.isolates]
    enforcing = [p for p in isolating if not p.audit]
    if enforcing:
        return Decision(False, f"{enforcing[0].kind} {enforcing[0].ref}")
    if isolating:
        return Decision(True, f"{isolating[0].kind} {isolating[0].ref}", True)
    return None


def _bounds(mine: list[Policy], direction: Direction) -> dict[str, set[int]]:
    """Where the rules' numeric ports cut each protocol's port space."""
    out: dict[str, set[int]] = {p: set() for p in PORT_PROTOCOLS}
    for policy in mine:
        for rule in policy.rules(direction):
            for m in rule.ports:
                if m.port and not m.name:
                    for proto in ([m.protocol] if m.protocol else PORT_PROTOCOLS):
                        out[proto].update((m.port, (m.end or m.port) + 1))
    return out


def _named(dst: Party, mine: list[Policy], direction: Direction) -> dict[str, set[int]]:
    """The destination's named ports that the rules use, as cuts."""
    out: dict[str, set[int]] = {p: set() for p in PORT_PROTOCOLS}
    if dst.workload is None:
        return out
    names = {m.name for p in mine for r in p.rules(direction) for m in r.ports if m.name}
    for (name, proto), number in dst.workload.ports.items():
        if name in names and proto in out:
            out[proto].update((number, number + 1))
    return out


def _cell(ev: Evaluator, out: Compiled, direction: Direction, me: Party, peer: Party,
          key: tuple[int, int], default: Decision | None, bounds: dict[str, set[int]],
          named: dict[str, set[int]]) -> None:
    def decide(proto: str, port: int) -> Decision | None:
        src, dst = (me, peer) if direction is Direction.EGRESS else (peer, me)
        assert me.workload is not None
        d = ev.decide(direction, me.workload, peer, Flow(src, dst, proto, port))
        return None if d == ALLOW_DEFAULT else d

    fallback = default
    other = decide(OTHER, 0)
    if other != fallback:
        out.cells[(direction, "any")][key] = _target(other, out)
        fallback = other
    for proto in PORT_PROTOCOLS:
        segments = _segments(bounds[proto] | named[proto])
        verdicts = [(a, b, decide(proto, a)) for a, b in segments]
        common = Counter(v for _, _, v in verdicts).most_common(1)[0][0]
        level = fallback
        if common != fallback:
            out.cells[(direction, "proto")][(*key, proto)] = _target(common, out)
            level = common
        for a, b, v in verdicts:
            if v == level:
                continue
            if a == b:
                out.cells[(direction, "port")][(*key, proto, a)] = _target(v, out)
            else:
                out.cells[(direction, "range")][(*key, proto, PortRange(a, b))] = _target(v, out)


def _target(decision: Decision | None, out: Compiled) -> str:
    return RETURN if decision is None else target(decision, out.chains)


def _segments(cuts: Iterable[int]) -> list[tuple[int, int]]:
    points = sorted({1, 65536, *(c for c in cuts if 1 <= c <= 65536)})
    return [(a, b - 1) for a, b in itertools.pairwise(points)]

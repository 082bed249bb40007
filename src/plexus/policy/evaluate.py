"""The verdict on one connection, and every policy and rule that decided it, in evaluation order:
the meaning of the policy model written once, plainly. ``plexus policy explain`` prints it; the
compiled nftables form must agree with it (tests compare the two against real traffic).

A connection is allowed iff its source side allows it (egress, where the source lives, when the
source is an endpoint) and its destination side does (ingress). Each side goes through the tiers
(``model``): admin policies by priority, first matching rule deciding (Pass: on to the next
tier); namespaced policies of the subject's namespace, deny rules first, then, if any of them
isolates the subject that way, the union of their allows, else on; the baseline policy's first
matching rule; allowed when nothing decided. Audit policies are evaluated too, but only to say
what they would have dropped: the verdict is what the enforcing policies decide.

The host's own traffic to its local endpoints is always allowed (health checks), as in most CNIs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from plexus.model.types import IPAddress
from plexus.policy.model import (
    NS_NAME_LABEL,
    Action,
    CidrPeer,
    Direction,
    EndpointSelector,
    Entity,
    EntityPeer,
    Peer,
    Policy,
    PortMatch,
    Rule,
    Tier,
)

ISOLATED = "isolated, no rule allows"


@dataclass(frozen=True, slots=True)
class Workload:
    """An endpoint as policy sees it: where it lives, its labels and its named ports."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (name, protocol)


@dataclass(frozen=True, slots=True)
class Party:
    """One end of a connection: its address, and the endpoint or host it belongs to."""

    address: IPAddress
    workload: Workload | None = None
    host: bool = False  # an address of a host of the cluster
    local_host: bool = False  # of the host that evaluates (the one the endpoint lives on)

    def describe(self) -> str:
        if self.workload is not None:
            return f"{self.workload.namespace}/{self.workload.name} ({self.address})"
        return f"{'host' if self.host else 'world'} {self.address}"


@dataclass(frozen=True, slots=True)
class Flow:
    src: Party
    dst: Party
    protocol: str  # "tcp", "udp", "sctp", "icmp"...
    port: int = 0  # the destination port after any DNAT; 0 for port-less protocols


@dataclass(frozen=True, slots=True)
class Step:
    direction: Direction
    tier: Tier
    policy: str  # "Kind ref", or "" for a default
    rule: str  # the rule's name, or what happened ("isolated", "no rule matched")
    effect: Action
    audit: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    steps: tuple[Step, ...]  # what decided, egress side first
    audit_drops: tuple[Step, ...] = ()  # what audit policies would have dropped


@dataclass(frozen=True, slots=True)
class Decision:
    """One side's answer, as the compiled form needs it: allowed or not, by which policy
    (``policy``: "Kind ref", "" when nothing decided and the default allowed), and whether
    only an audit policy objected (``audit``: allowed, but counted and logged as its drop)."""

    allowed: bool
    policy: str = ""
    audit: bool = False


class Evaluator:
    """Policies and namespaces' labels, evaluated for a flow at a time."""

    def __init__(self, policies: Sequence[Policy],
                 namespaces: Mapping[str, Mapping[str, str]]) -> None:
        self._policies = sorted(policies, key=lambda p: (p.tier, p.priority, p.ref))
        self._namespaces = namespaces
        self._ns_labels: dict[str, Mapping[str, str]] = {}
        self._memo: dict[int, bool] | None = None

    @property
    def policies(self) -> list[Policy]:
        """In evaluation order: tier, priority, reference."""
        return self._policies

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        found = self._ns_labels.get(name)
        if found is None:
            found = self._ns_labels[name] = {**self._namespaces.get(name, {}), NS_NAME_LABEL: name}
        return found

    def verdict(self, flow: Flow) -> Verdict:
        if flow.src.local_host and flow.dst.workload is not None:
            step = Step(Direction.INGRESS, Tier.NAMESPACED, "", "host traffic", Action.ALLOW)
            return Verdict(True, (step,))
        enforced, steps = self._sides(flow, audit=False)
        full, full_steps = self._sides(flow, audit=True)
        drops = tuple(s for s in full_steps if s.effect is Action.DENY) if enforced and not full \
            else ()
        return Verdict(enforced, steps, drops)

    def _sides(self, flow: Flow, audit: bool) -> tuple[bool, tuple[Step, ...]]:
        steps: list[Step] = []
        allowed = True
        for direction, subject, peer in ((Direction.EGRESS, flow.src, flow.dst),
                                         (Direction.INGRESS, flow.dst, flow.src)):
            if allowed and subject.workload is not None:
                mine = [p for p in self._policies if (audit or not p.audit)
                        and self.selects(p, subject.workload)]
                allowed = self._side(direction, mine, peer, flow, steps)
        return allowed, tuple(steps)

    def decide(self, direction: Direction, subject: Workload, peer: Party, flow: Flow,
               selecting: Sequence[Policy] | None = None,
               memo: dict[int, bool] | None = None) -> Decision:
        """The ``direction`` side of ``flow`` for ``subject`` (its source for egress, its
        destination for ingress), ``peer`` being the other end. The compiler, which asks for
        one subject and peer many times, passes the policies that select the subject
        (``selecting``, in evaluation order) and a ``memo`` of which rules' peers match."""
        mine = list(selecting) if selecting is not None else \
            [p for p in self._policies if self.selects(p, subject)]
        steps: list[Step] = []
        enforcing = [p for p in mine if not p.audit]
        allowed = self._side(direction, enforcing, peer, flow, steps, memo)
        if allowed and len(enforcing) < len(mine):
            audit_steps: list[Step] = []
            if not self._side(direction, mine, peer, flow, audit_steps, memo):
                return Decision(True, audit_steps[-1].policy if audit_steps else "", True)
        return Decision(allowed, _decider(steps))

    def _side(self, direction: Direction, mine: list[Policy], peer: Party, flow: Flow,
              steps: list[Step], memo: dict[int, bool] | None = None) -> bool:
        """One side through the tiers, ``mine`` being the policies that select its subject."""
        self._memo = memo
        decided = self._first_match(Tier.ADMIN, mine, direction, peer, flow, steps)
        if decided is not None:
            return decided
        decided = self._namespaced(mine, direction, peer, flow, steps)
        if decided is not None:
            return decided
        decided = self._first_match(Tier.BASELINE, mine, direction, peer, flow, steps)
        return True if decided is None else decided

    def _first_match(self, tier: Tier, mine: list[Policy], direction: Direction, peer: Party,
                     flow: Flow, steps: list[Step]) -> bool | None:
        for policy in (p for p in mine if p.tier is tier):
            for rule in policy.rules(direction):
                if self.rule_matches(rule, peer, flow):
                    steps.append(_step(direction, policy, rule.name, rule.action))
                    if rule.action is Action.PASS:
                        return None
                    return rule.action is Action.ALLOW
        return None

    def _namespaced(self, mine: list[Policy], direction: Direction, peer: Party, flow: Flow,
                    steps: list[Step]) -> bool | None:
        ours = [p for p in mine if p.tier is Tier.NAMESPACED]
        for policy in ours:
            for rule in policy.rules(direction):
                if rule.action is Action.DENY and self.rule_matches(rule, peer, flow):
                    steps.append(_step(direction, policy, rule.name, Action.DENY))
                    return False
        isolating = [p for p in ours if direction in p.isolates]
        if not isolating:
            return None
        for policy in ours:
            for rule in policy.rules(direction):
                if rule.action is Action.ALLOW and self.rule_matches(rule, peer, flow):
                    steps.append(_step(direction, policy, rule.name, Action.ALLOW))
                    return True
        for policy in isolating:
            steps.append(_step(direction, policy, ISOLATED, Action.DENY))
        return False

    def selects(self, policy: Policy, workload: Workload) -> bool:
        if policy.namespace and policy.namespace != workload.namespace:
            return False
        return self.selector_matches(policy.subject, workload)

    def selector_matches(self, sel: EndpointSelector, workload: Workload) -> bool:
        if sel.namespaces is not None:
            if not sel.namespaces.matches(self.namespace_labels(workload.namespace)):
                return False
        elif sel.namespace and sel.namespace != workload.namespace:
            return False
        return sel.pods.matches(workload.labels)

    def rule_matches(self, rule: Rule, peer: Party, flow: Flow) -> bool:
        memo = self._memo
        if memo is None:
            peers_ok = not rule.peers or any(self.peer_matches(p, peer) for p in rule.peers)
        else:
            found = memo.get(id(rule))
            if found is None:
                found = not rule.peers or any(self.peer_matches(p, peer) for p in rule.peers)
                memo[id(rule)] = found
            peers_ok = found
        return peers_ok and (not rule.ports or any(_port_matches(m, flow) for m in rule.ports))

    def peer_matches(self, peer: Peer, party: Party) -> bool:
        if isinstance(peer, EndpointSelector):
            return party.workload is not None and self.selector_matches(peer, party.workload)
        if isinstance(peer, CidrPeer):
            in_cluster = party.workload is not None or party.host
            return (peer.endpoints or not in_cluster) and peer.contains(party.address)
        return _entity_matches(peer, party)


def _entity_matches(peer: EntityPeer, party: Party) -> bool:
    in_cluster = party.workload is not None or party.host
    return {Entity.WORLD: not in_cluster, Entity.HOST: party.local_host,
            Entity.CLUSTER: in_cluster, Entity.ALL: True}[peer.entity]


def _port_matches(match: PortMatch, flow: Flow) -> bool:
    if match.protocol and match.protocol != flow.protocol:
        return False
    if match.name:
        dst = flow.dst.workload
        return dst is not None and dst.ports.get((match.name, flow.protocol)) == flow.port
    if not match.port:
        return True
    return match.port <= flow.port <= (match.end or match.port)


def _decider(steps: list[Step]) -> str:
    """The policy that decided: the matching rule's, or the first isolating one's."""
    if not steps:
        return ""
    isolated = [s for s in steps if s.rule == ISOLATED]
    return isolated[0].policy if isolated else steps[-1].policy


def _step(direction: Direction, policy: Policy, rule: str, effect: Action) -> Step:
    return Step(direction, policy.tier, f"{policy.kind} {policy.ref}", rule, effect, policy.audit)

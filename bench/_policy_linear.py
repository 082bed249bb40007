"""The same policies as one linear rule per (rule, peer, port) expansion, the way iptables-based
implementations program them (with an ipset per address set): bench/policy.py loads this
instead of plexus's table to compare connect latency and throughput.

    table inet plexus_linear
      forward (hook forward, priority -5): ct state new: jump egress, then jump ingress
      egress:  ip saddr @SUBJECTS ip daddr @PEERS tcp dport P return   (one per expansion)
               ip saddr @ISOLATED_EGRESS drop
      ingress: ip daddr @SUBJECTS ip saddr @PEERS tcp dport P return
               ip daddr @ISOLATED_INGRESS drop

A new connection walks the rules in order until one matches: the measured pair's policy is
written last, the worst case of a chain (an implementation dispatching per pod first walks
fewer). Address sets are named and shared (one per distinct set of addresses), as ipsets are.
Only allow rules of endpoint selectors and ipBlocks are rendered (what bench/_policy_gen.py
writes); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from plexus.model.types import IPAddress
from plexus.policy.evaluate import Evaluator, Workload
from plexus.policy.model import Action, CidrPeer, Direction, EndpointSelector, Policy, PortMatch

TABLE = "plexus_linear"


@dataclass
class Linear:
    sets: dict[frozenset[IPAddress], str] = field(default_factory=dict)
    rules: dict[Direction, list[str]] = field(
        default_factory=lambda: {d: [] for d in Direction})
    isolated: dict[Direction, set[IPAddress]] = field(
        default_factory=lambda: {d: set() for d in Direction})

    def ref(self, addresses: frozenset[IPAddress]) -> str:
        if addresses not in self.sets:
            self.sets[addresses] = f"s{len(self.sets)}"
        return "@" + self.sets[addresses]


def _ports(m: PortMatch, dst: Workload | None) -> list[str]:
    protos = [m.protocol] if m.protocol else ["tcp", "udp"]
    if m.name:
        found = [dst.ports.get((m.name, p)) for p in protos] if dst else []
        numbers = {n for n in found if n}
        if not numbers:
            return []
        return [f"{p} dport {n}" for p in protos for n in sorted(numbers)]
    if not m.port:
        return [f"meta l4proto {p}" for p in protos]
    what = f"{m.port}-{m.end}" if m.end else str(m.port)
    return [f"{p} dport {what}" for p in protos]


def _peer_matches(ev: Evaluator, peer: object, workloads: Mapping[IPAddress, Workload],
                  out: Linear, side: str) -> list[str]:
    if isinstance(peer, EndpointSelector):
        found = frozenset(a for a, w in workloads.items() if ev.selector_matches(peer, w))
        return [f"ip {side} {out.ref(found)}"] if found else []
    if isinstance(peer, CidrPeer):
        excepts = "".join(f" ip {side} != {e}" for e in peer.excepts)
        return [f"ip {side} {peer.cidr}{excepts}"]
    raise ValueError(f"peer {peer!r}: the linear form renders selectors and ipBlocks only")


def _policy(ev: Evaluator, p: Policy, workloads: Mapping[IPAddress, Workload],
            out: Linear) -> None:
    subjects = {a: w for a, w in workloads.items() if ev.selects(p, w)}
    if not subjects:
        return
    mine = out.ref(frozenset(subjects))
    some = next(iter(subjects.values()))  # the generator's endpoints share named ports
    for d in Direction:
        own, other = ("saddr", "daddr") if d is Direction.EGRESS else ("daddr", "saddr")
        if d in p.isolates:
            out.isolated[d].update(subjects)
        for rule in p.rules(d):
            if rule.action is not Action.ALLOW:
                raise ValueError(f"{p.ref} {rule.name}: the linear form renders allows only")
            peers = [m for peer in rule.peers
                     for m in _peer_matches(ev, peer, workloads, out, other)] \
                if rule.peers else [""]
            ports = [x for m in rule.ports for x in _ports(m, some if d is Direction.INGRESS
                                                             else None)] or [""]
            for peer_match in peers:
                for port in ports:
                    out.rules[d].append(f"ip {own} {mine} {peer_match} {port} return")


def render(policies: Sequence[Policy], namespaces: Mapping[str, Mapping[str, str]],
           workloads: Mapping[IPAddress, Workload]) -> tuple[str, int]:
    """The table as an ``nft -f`` script, and its number of rules."""
    ev = Evaluator([], namespaces)
    out = Linear()
    for p in policies:
        _policy(ev, p, workloads, out)
    lines = [f"table inet {TABLE} {{"]
    for addresses, name in out.sets.items():
        elements = ", ".join(str(a) for a in sorted(addresses))
        lines.append(f"  set {name} {{ type ipv4_addr; elements = {{ {elements} }} }}")
    for d in Direction:
        if out.isolated[d]:
            name = f"isolated_{d.value}"
            elements = ", ".join(str(a) for a in sorted(out.isolated[d]))
            lines.append(f"  set {name} {{ type ipv4_addr; elements = {{ {elements} }} }}")
    lines.append("  chain forward { type filter hook forward priority -5; policy accept;")
    lines.append("    ct state new jump egress")
    lines.append("    ct state new jump ingress")
    lines.append("  }")
    count = 0
    for d in Direction:
        lines.append(f"  chain {d.value} {{")
        lines += [f"    {r}" for r in out.rules[d]]
        count += len(out.rules[d])
        if out.isolated[d]:
            side = "saddr" if d is Direction.EGRESS else "daddr"
            lines.append(f"    ip {side} @isolated_{d.value} drop")
            count += 1
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n", count

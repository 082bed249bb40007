"""One row's decisions as elements (pure): what a peer that no rule's peers match gets (the
row's *wildcard*), and what a peer some rule's peers do match gets where it differs from that.

Lookup order of the compiled chains, first hit decides: the peer's exact port, port range,
protocol, any protocol (keyed by both identities), then the row's wildcard exact port, port
range, protocol (keyed by the local identity only), then the row's default (its wildcard for
every protocol without ports, merged with the isolation default). So a row whose rules name a
few peers holds elements for those peers only, whatever the number of identities, and a rule
that allows every peer on a port ("ports only") is one wildcard element, not one per peer.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from plexus.policy.evaluate import Decision, Evaluator, Flow, Party
from plexus.policy.model import Direction, Policy

PORT_PROTOCOLS = ("tcp", "udp", "sctp")
OTHER = "icmp"  # stands for every protocol without ports
ALLOW_DEFAULT = Decision(True)

Segment = tuple[int, int, Decision | None]
Cell = tuple[str, tuple[object, ...], Decision | None]  # (map kind, key, decision)


@dataclass(frozen=True)
class Decisions:
    """A peer's decisions: for protocols without ports, and per port range of each protocol.
    None: allowed, with no policy to count it."""

    other: Decision | None
    ports: dict[str, list[Segment]]

    def at(self, proto: str, port: int) -> Decision | None:
        segs = self.ports[proto]
        i = bisect.bisect_right([a for a, _, _ in segs], port) - 1
        return segs[i][2]


def decisions(ev: Evaluator, direction: Direction, me: Party, peer: Party,
              policies: Sequence[Policy], cuts: dict[str, set[int]],
              memo: dict[int, bool]) -> Decisions:
    assert me.workload is not None
    workload = me.workload
    src, dst = (me, peer) if direction is Direction.EGRESS else (peer, me)

    def decide(proto: str, port: int) -> Decision | None:
        d = ev.decide(direction, workload, peer, Flow(src, dst, proto, port), policies, memo)
        return None if d == ALLOW_DEFAULT else d

    return Decisions(decide(OTHER, 0), {
        proto: [(a, b, decide(proto, a)) for a, b in segments(cuts[proto])]
        for proto in PORT_PROTOCOLS})


def segments(cuts: Iterable[int]) -> list[tuple[int, int]]:
    points = sorted({1, 65536, *(c for c in cuts if 1 <= c <= 65536)})
    return [(a, b - 1) for a, b in itertools.pairwise(points)]


def wildcard(mine: tuple[object, ...], w: Decisions, default: Decision | None) -> list[Cell]:
    """The row's own elements: keyed by the local identity (``mine``)."""
    out: list[Cell] = []
    level = w.other
    if level is not None or default is not None:
        out.append(("default", mine, level))
    for proto, segs in w.ports.items():
        out += _levels(mine, proto, segs, level, "wproto", "wport", "wrange")
    return out


def specific(ids: tuple[object, ...], v: Decisions, w: Decisions) -> list[Cell]:
    """A peer's elements: where ``v`` (its decisions) differs from the wildcard ``w``."""
    out: list[Cell] = []
    if v.other != w.other:  # its "any" element shadows the wildcard for every protocol
        out.append(("any", ids, v.other))
        for proto, segs in v.ports.items():
            out += _levels(ids, proto, segs, v.other, "proto", "port", "range")
        return out
    for proto, segs in v.ports.items():
        # Its cuts include the wildcard's (the same rules, and perhaps its named ports), so
        # each of its ranges lies within one of the wildcard's.
        differ = [(a, b, d) for a, b, d in segs if d != w.at(proto, a)]
        if not differ:
            continue
        if len({d for _, _, d in segs}) == 1:  # one decision for the whole protocol
            out.append(("proto", (*ids, proto), segs[0][2]))
            continue
        for a, b, d in differ:
            out.append(("port" if a == b else "range", (*ids, proto, _port(a, b)), d))
    return out


def _levels(ids: tuple[object, ...], proto: str, segs: list[Segment],
            fallback: Decision | None, proto_kind: str, port_kind: str,
            range_kind: str) -> list[Cell]:
    """``segs`` against what later lookups give (``fallback``): the most common decision as
    the protocol's element if it differs, then every range that differs from that."""
    out: list[Cell] = []
    common = Counter(d for _, _, d in segs).most_common(1)[0][0]
    level = fallback
    if common != fallback:
        out.append((proto_kind, (*ids, proto), common))
        level = common
    for a, b, d in segs:
        if d != level:
            out.append((port_kind if a == b else range_kind, (*ids, proto, _port(a, b)), d))
    return out


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int


def _port(a: int, b: int) -> int | PortRange:
    return a if a == b else PortRange(a, b)

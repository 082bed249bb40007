"""Identities: what the compiled policy keys its verdicts by, instead of addresses.

Two addresses that no policy can tell apart share an identity: endpoints with the same
namespace, labels and named ports whose address lies in the same CIDR peers (NetworkPolicy's
ipBlock matches endpoints too); outside the cluster, the addresses lying in the same CIDR peers
(the address space is cut at every CIDR and ``except`` boundary, and each piece labelled by the
peers covering it: Cilium's CIDR identities); the cluster's hosts. A packet's cost is then one
lookup to find each end's identity, whatever the number of endpoints, and a verdict map keyed by
identities holds a row per identity that policies tell apart, not per address.

Numbers are this host's own (``Numbers``): every host compiles its own maps, so they need not
agree across hosts, only stay stable while an identity lives (a change is then a few elements).
The CIDR cut is a sweep over the boundaries, O(peers log peers).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from plexus.model.types import Endpoint, IPAddress, IPNetwork
from plexus.policy.evaluate import Party, Workload
from plexus.policy.model import CidrPeer, Policy


@dataclass(frozen=True, slots=True)
class Key:
    """What an identity is: ``kind`` "ep" (an endpoint's namespace, labels, named ports and
    covering CIDR peers), "world" (the CIDR peers covering it), "host" or "remote-host"."""

    kind: str
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, str, int], ...] = ()  # (name, protocol, number)
    cidrs: frozenset[int] = frozenset()
    # Keys are dict keys on every compile path (numbers, match sets, rows' cells): hashing the
    # nested tuples each time was a tenth of a change's compile time, so the hash is kept.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.kind, self.namespace, self.labels,
                                                self.ports, self.cidrs)))

    def __hash__(self) -> int:
        return self._hash


LOCAL_HOST, REMOTE_HOST = Key("host"), Key("remote-host")
RESERVED = {LOCAL_HOST: 1, REMOTE_HOST: 2}
FIRST = 16


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of addresses ``[first, last]`` covered by the same CIDR peers (their indexes)."""

    first: int
    last: int
    peers: frozenset[int]


@dataclass
class Cut:
    """One family's address space cut at the CIDR peers' boundaries."""

    version: int
    pieces: list[Piece]
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = [p.first for p in self.pieces]

    def peers_of(self, address: IPAddress) -> frozenset[int]:
        i = bisect.bisect_right(self.starts, int(address)) - 1
        return self.pieces[i].peers


def cidr_peers(policies: Iterable[Policy]) -> list[CidrPeer]:
    """Every distinct CIDR peer of the policies, in a stable order."""
    found: dict[CidrPeer, None] = {}
    for p in policies:
        for rule in (*p.ingress, *p.egress):
            for peer in rule.peers:
                if isinstance(peer, CidrPeer):
                    found.setdefault(peer, None)
    return sorted(found, key=lambda c: (c.cidr.version, c.cidr, c.excepts, c.endpoints))


def cut(peers: Sequence[CidrPeer], version: int) -> Cut:
    top = 2 ** (32 if version == 4 else 128)
    events: dict[int, list[tuple[int, int]]] = {0: []}  # position -> [(+1/-1, peer)]
    for i, peer in enumerate(peers):
        if peer.cidr.version != version:
            continue
        for first, last in _runs(peer):
            events.setdefault(first, []).append((1, i))
            events.setdefault(last + 1, []).append((-1, i))
    active: set[int] = set()
    pieces: list[Piece] = []
    positions = sorted(p for p in events if p < top)
    for n, pos in enumerate(positions):
        for sign, i in events[pos]:
            (active.add if sign > 0 else active.discard)(i)
        end = (positions[n + 1] if n + 1 < len(positions) else top) - 1
        here = frozenset(active)
        if pieces and pieces[-1].peers == here:
            pieces[-1] = Piece(pieces[-1].first, end, here)
        else:
            pieces.append(Piece(pos, end, here))
    return Cut(version, pieces)


def _runs(peer: CidrPeer) -> list[tuple[int, int]]:
    """The CIDR less its excepts, as runs of addresses."""
    first, last = int(peer.cidr.network_address), int(peer.cidr.broadcast_address)
    out = []
    for e in sorted(peer.excepts):
        e_first, e_last = int(e.network_address), int(e.broadcast_address)
        if e_first > first:
            out.append((first, e_first - 1))
        first = max(first, e_last + 1)
    if first <= last:
        out.append((first, last))
    return out


def prefixes(piece: Piece, version: int) -> list[IPNetwork]:
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    return list(ipaddress.summarize_address_range(cls(piece.first), cls(piece.last)))


def endpoint_key(ep: Endpoint, address: IPAddress, peers: Sequence[CidrPeer],
                 cuts: dict[int, Cut]) -> Key:
    covering = frozenset(i for i in cuts[address.version].peers_of(address)
                         if peers[i].endpoints)
    ports = tuple(sorted((x.name, x.protocol, x.port) for x in ep.exposes if x.name))
    return Key("ep", ep.policy_namespace, tuple(sorted(ep.labels.items())), ports, covering)


def world_key(piece: Piece) -> Key:
    return Key("world", cidrs=piece.peers)


def representative(key: Key, address: IPAddress) -> Party:
    """A Party the evaluator can judge for every address of the identity."""
    if key.kind == "ep":
        named = {(n, p): num for n, p, num in key.ports}
        return Party(address, Workload(f"identity of {address}", key.namespace,
                                       dict(key.labels), named))
    if key in (LOCAL_HOST, REMOTE_HOST):
        return Party(address, host=True, local_host=key == LOCAL_HOST)
    return Party(address)


class Numbers:
    """This host's identity numbers: stable while an identity is in use, reused after."""

    def __init__(self) -> None:
        self._of: dict[Key, int] = dict(RESERVED)
        self._free: list[int] = []
        self._next = FIRST

    def number(self, key: Key) -> int:
        found = self._of.get(key)
        if found is None:
            found = self._free.pop() if self._free else self._take()
            self._of[key] = found
        return found

    def _take(self) -> int:
        self._next += 1
        return self._next - 1

    def release(self, key: Key) -> None:
        """``key`` is gone: its number may be given again."""
        if key not in RESERVED and key in self._of:
            self._free.append(self._of.pop(key))

    def retain(self, keys: Iterable[Key]) -> None:
        """Forget every identity not in ``keys`` (its number may be given again)."""
        keep = set(keys) | set(RESERVED)
        for key in [k for k in self._of if k not in keep]:
            self._free.append(self._of.pop(key))

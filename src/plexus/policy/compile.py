"""The policies in force as set and map elements (docs/policy.md), kept up to date change by
change: ``Compiler`` holds the compiled state and answers each change with the element delta
it makes (``Delta``), so that a change costs what it touches, not the whole cluster.

For every identity of this host's endpoints (the *local* identities) and each direction a
policy selects it in, there is a *row*: for every identity of the cluster and of the outside
(the *peers*), the decision per protocol and port range, computed by the evaluator
(``evaluate``, the one meaning of the model) for one representative port of each range the
rules cut, and written as the fewest elements that reproduce it under the lookup order of the
compiled chains: exact port, port range, protocol, any protocol, then the row's default (deny
when the identity is isolated). Element keys put the source identity first: egress rows are
(local, peer, ...), ingress rows (peer, local, ...). Verdicts name a chain per policy and
outcome (``targets``).

What a change costs:
- an endpoint: its addresses' identity elements; if it brings a new identity, one cell per row
  for it (and its own rows if it is the first local one); if it takes the last address of one
  away, that identity's cells;
- a policy: the rows of the local identities it selects, before or after (a change of the
  policies' CIDRs, which re-cuts the address space, rebuilds everything);
- a namespace's labels or the hosts: everything (rare, and every row may depend on them).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from plexus.model.types import Endpoint, IPAddress
from plexus.policy import identity
from plexus.policy.evaluate import Decision, Evaluator, Flow, Party
from plexus.policy.identity import Key, Numbers
from plexus.policy.model import Direction, Policy, Tier

PORT_PROTOCOLS = ("tcp", "udp", "sctp")
OTHER = "icmp"  # stands for every protocol without ports
ALLOW_DEFAULT = Decision(True)
RETURN = "return"  # the target of "allowed, and no policy to count it"
MAPS = ("port", "range", "proto", "any", "default")
PREFIX = {Direction.EGRESS: "eg", Direction.INGRESS: "in"}


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int


@dataclass(frozen=True)
class Inputs:
    policies: Sequence[Policy]
    namespaces: Mapping[str, Mapping[str, str]]  # name -> labels
    endpoints: Mapping[str, Endpoint]  # every host's, by store key
    node: str
    hosts: Sequence[IPAddress] = ()  # the other hosts' addresses


Elem = tuple[object, ...] | object
Sets = dict[str, dict[object, object]]  # set name -> element -> data (None for a plain set)


@dataclass
class Delta:
    removed: Sets = field(default_factory=dict)
    added: Sets = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.removed.values()) or any(self.added.values())


def chain_base(policy: str) -> str:
    """A policy's chains' common name: short, stable, and safe in nft."""
    return "p" + hashlib.sha1(policy.encode()).hexdigest()[:10]


def target(decision: Decision | None) -> str:
    if decision is None or not decision.policy:
        return RETURN
    outcome = "audit" if decision.audit else "allow" if decision.allowed else "deny"
    return f"{chain_base(decision.policy)}-{outcome}"


def set_names() -> list[str]:
    names = [f"{kind}{v}" for v in (4, 6) for kind in ("ep", "world", "eg", "in")]
    return names + [f"{PREFIX[d]}_{m}" for d in Direction for m in MAPS]


Cell = tuple[str, tuple[object, ...], str]  # (set name, key, target)


@dataclass
class Row:
    """One local identity's verdicts in one direction."""

    policies: list[Policy]
    default: Decision | None
    bounds: dict[str, set[int]]
    cells: dict[Key, list[Cell]] = field(default_factory=dict)


class Compiler:
    def __init__(self) -> None:
        self.numbers = Numbers()
        self.sets: Sets = {name: {} for name in set_names()}
        self.chains: dict[str, str] = {}  # chain base -> "Kind ref", for every policy
        self._inputs = Inputs([], {}, {}, "")
        self._reset_state()

    def _reset_state(self) -> None:
        self._ev = Evaluator(self._inputs.policies, self._inputs.namespaces)
        self._peers = identity.cidr_peers(self._inputs.policies)
        self._cuts = {v: identity.cut(self._peers, v) for v in (4, 6)}
        self._addrs: dict[str, list[tuple[IPAddress, Key]]] = {}
        self._count: Counter[Key] = Counter()
        self._reps: dict[Key, Party] = {}
        self._local: dict[Key, set[IPAddress]] = {}
        self._rows: dict[tuple[Key, Direction], Row] = {}
        self._local_eps: set[str] = set()  # store keys of this host's endpoints
        self._delta = Delta()

    # -- whole states ----------------------------------------------------------------------

    def compile(self, inputs: Inputs) -> Delta:
        """Everything again, from ``inputs``: the delta from what was compiled before."""
        old = {n: dict(s) for n, s in self.sets.items()}
        self._inputs = inputs
        self._reset_state()
        self.sets = {name: {} for name in set_names()}
        self.chains = _chains(inputs.policies)
        for version, c in self._cuts.items():
            for piece in c.pieces:
                self._world_piece(version, piece)
        for address in inputs.hosts:
            self._add_address(address, identity.REMOTE_HOST, local=False)
        for key, ep in inputs.endpoints.items():
            self._set_endpoint(key, ep)
        self._delta = Delta()
        self.numbers.retain(self._count)
        return _diff(old, self.sets)

    @property
    def hosts(self) -> list[IPAddress]:
        """The other hosts' addresses it was compiled with."""
        return list(self._inputs.hosts)

    # -- changes ---------------------------------------------------------------------------

    def endpoint(self, key: str, ep: Endpoint | None) -> Delta:
        """An endpoint added, changed or removed."""
        self._delta = Delta()
        self._set_endpoint(key, ep)
        return self._take()

    def policies(self, policies: Sequence[Policy]) -> Delta:
        """The policies in force changed: only the rows they select are compiled again."""
        old = {(p.kind, p.namespace, p.name): p for p in self._inputs.policies}
        new = {(p.kind, p.namespace, p.name): p for p in policies}
        inputs = Inputs(list(policies), self._inputs.namespaces, self._inputs.endpoints,
                        self._inputs.node, self._inputs.hosts)
        if identity.cidr_peers(policies) != self._peers:
            return self.compile(inputs)  # the address space is cut anew: every identity moves
        changed = [p for k, p in old.items() if new.get(k) != p] + \
                  [p for k, p in new.items() if old.get(k) != p]
        self._inputs = inputs
        self._ev = Evaluator(inputs.policies, inputs.namespaces)
        self.chains = _chains(policies)
        self._delta = Delta()
        for key in self._local:
            rep = self._reps[key]
            assert rep.workload is not None
            if any(self._ev.selects(p, rep.workload) for p in changed):
                for direction in Direction:
                    self._drop_row(key, direction)
                    self._make_row(key, direction)
        return self._take()

    # -- endpoints and identities ----------------------------------------------------------

    def _set_endpoint(self, key: str, ep: Endpoint | None) -> None:
        old = self._addrs.pop(key, [])
        new: list[tuple[IPAddress, Key]] = []
        if ep is not None:
            new = [(i.ip, identity.endpoint_key(ep, i.ip, self._peers, self._cuts))
                   for i in ep.addresses]
        local = ep is not None and ep.node == self._inputs.node
        was_local = key in self._local_eps
        for address, k in old:
            if (address, k) not in new:
                self._remove_address(address, k, was_local)
        for address, k in new:
            if (address, k) not in old:
                self._add_address(address, k, local, ep)
        self._local_eps.discard(key)
        if new:
            self._addrs[key] = new
            if local:
                self._local_eps.add(key)

    def _add_address(self, address: IPAddress, key: Key, local: bool,
                     ep: Endpoint | None = None) -> None:
        self._put(f"ep{address.version}", address, self.numbers.number(key))
        self._count[key] += 1
        if self._count[key] == 1:
            self._reps[key] = identity.representative(key, address)
            self._add_column(key)
        if local:
            mine = self._local.setdefault(key, set())
            mine.add(address)
            if len(mine) == 1:
                for direction in Direction:
                    self._make_row(key, direction)
            else:
                for direction in Direction:
                    if (key, direction) in self._rows:
                        self._put(f"{PREFIX[direction]}{address.version}", address, None)

    def _remove_address(self, address: IPAddress, key: Key, local: bool) -> None:
        self._drop(f"ep{address.version}", address)
        if local and key in self._local:
            mine = self._local[key]
            mine.discard(address)
            for direction in Direction:
                self._drop(f"{PREFIX[direction]}{address.version}", address)
            if not mine:
                del self._local[key]
                for direction in Direction:
                    self._drop_row(key, direction)
        self._count[key] -= 1
        if self._count[key] <= 0:
            del self._count[key]
            self._drop_column(key)
            del self._reps[key]
            self.numbers.release(key)

    def _world_piece(self, version: int, piece: identity.Piece) -> None:
        key = identity.world_key(piece)
        prefixes = identity.prefixes(piece, version)
        for prefix in prefixes:
            self._put(f"world{version}", prefix, self.numbers.number(key))
        self._count[key] += 1
        if self._count[key] == 1:
            self._reps[key] = identity.representative(key, prefixes[0].network_address)
            self._add_column(key)

    # -- rows and cells --------------------------------------------------------------------

    def _make_row(self, key: Key, direction: Direction) -> None:
        rep = self._reps[key]
        assert rep.workload is not None
        mine = [p for p in self._ev.policies if self._ev.selects(p, rep.workload)
                and (p.rules(direction) or direction in p.isolates)]
        if not mine:
            return
        row = Row(mine, _default(mine, direction), _bounds(mine, direction))
        self._rows[(key, direction)] = row
        for address in self._local.get(key, ()):
            self._put(f"{PREFIX[direction]}{address.version}", address, None)
        if row.default is not None:
            self._put(f"{PREFIX[direction]}_default", self.numbers.number(key),
                      target(row.default))
        for peer in self._reps:
            self._make_cell(key, direction, row, peer)

    def _drop_row(self, key: Key, direction: Direction) -> None:
        row = self._rows.pop((key, direction), None)
        if row is None:
            return
        for address in self._local.get(key, ()):
            self._drop(f"{PREFIX[direction]}{address.version}", address)
        self._drop(f"{PREFIX[direction]}_default", self.numbers.number(key))
        for cells in row.cells.values():
            for name, elem, _ in cells:
                self._drop(name, elem)

    def _add_column(self, peer: Key) -> None:
        for (key, direction), row in self._rows.items():
            self._make_cell(key, direction, row, peer)

    def _drop_column(self, peer: Key) -> None:
        for row in self._rows.values():
            for name, elem, _ in row.cells.pop(peer, []):
                self._drop(name, elem)

    def _make_cell(self, key: Key, direction: Direction, row: Row, peer: Key) -> None:
        me, other = self._reps[key], self._reps[peer]
        mine, theirs = self.numbers.number(key), self.numbers.number(peer)
        ids = (mine, theirs) if direction is Direction.EGRESS else (theirs, mine)
        named = _named(other if direction is Direction.EGRESS else me, row.policies, direction)
        cells = _cells(self._ev, direction, me, other, ids, row, named)
        row.cells[peer] = cells
        for name, elem, verdict in cells:
            self._put(name, elem, verdict)

    # -- the element journal ---------------------------------------------------------------

    def _put(self, name: str, elem: object, data: object) -> None:
        s = self.sets[name]
        if elem in s:
            if s[elem] == data:
                return
            self._drop(name, elem)
        s[elem] = data
        removed = self._delta.removed.get(name, {})
        if removed.get(elem, _MISSING) == data:
            del removed[elem]  # put back as it was: no change at all
        else:
            self._delta.added.setdefault(name, {})[elem] = data

    def _drop(self, name: str, elem: object) -> None:
        s = self.sets[name]
        if elem not in s:
            return
        data = s.pop(elem)
        added = self._delta.added.get(name, {})
        if elem in added:
            del added[elem]  # added in this same change: it never reached the kernel
        else:
            self._delta.removed.setdefault(name, {})[elem] = data

    def _take(self) -> Delta:
        delta, self._delta = self._delta, Delta()
        return delta


_MISSING = object()


def _chains(policies: Iterable[Policy]) -> dict[str, str]:
    return {chain_base(f"{p.kind} {p.ref}"): f"{p.kind} {p.ref}" for p in policies}


def _diff(old: Sets, new: Sets) -> Delta:
    delta = Delta()
    for name in set(old) | set(new):
        a, b = old.get(name, {}), new.get(name, {})
        gone = {k: v for k, v in a.items() if b.get(k, _MISSING) != v}
        came = {k: v for k, v in b.items() if a.get(k, _MISSING) != v}
        if gone:
            delta.removed[name] = gone
        if came:
            delta.added[name] = came
    return delta


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


def _cells(ev: Evaluator, direction: Direction, me: Party, peer: Party, ids: tuple[int, int],
           row: Row, named: dict[str, set[int]]) -> list[Cell]:
    assert me.workload is not None
    workload = me.workload
    src, dst = (me, peer) if direction is Direction.EGRESS else (peer, me)
    p = PREFIX[direction]

    memo: dict[int, bool] = {}  # which rules' peers match this peer: the same for every port

    def decide(proto: str, port: int) -> Decision | None:
        d = ev.decide(direction, workload, peer, Flow(src, dst, proto, port), row.policies, memo)
        return None if d == ALLOW_DEFAULT else d

    out: list[Cell] = []
    fallback = row.default
    other = decide(OTHER, 0)
    if other != fallback:
        out.append((f"{p}_any", ids, target(other)))
        fallback = other
    for proto in PORT_PROTOCOLS:
        verdicts = [(a, b, decide(proto, a)) for a, b in _segments(row.bounds[proto]
                                                                   | named[proto])]
        common = Counter(v for _, _, v in verdicts).most_common(1)[0][0]
        level = fallback
        if common != fallback:
            out.append((f"{p}_proto", (*ids, proto), target(common)))
            level = common
        for a, b, v in verdicts:
            if v == level:
                continue
            if a == b:
                out.append((f"{p}_port", (*ids, proto, a), target(v)))
            else:
                out.append((f"{p}_range", (*ids, proto, PortRange(a, b)), target(v)))
    return out


def _segments(cuts: Iterable[int]) -> list[tuple[int, int]]:
    points = sorted({1, 65536, *(c for c in cuts if 1 <= c <= 65536)})
    return [(a, b - 1) for a, b in itertools.pairwise(points)]

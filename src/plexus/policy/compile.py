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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from plexus.model.types import Endpoint, IPAddress
from plexus.policy import cells, identity
from plexus.policy.cells import PORT_PROTOCOLS, Decisions
from plexus.policy.evaluate import Decision, Evaluator, Party, Workload
from plexus.policy.identity import Key, Numbers
from plexus.policy.journal import Delta, Journal, diff
from plexus.policy.matches import Matches
from plexus.policy.model import Direction, Entity, EntityPeer, Policy, Rule, Tier

RETURN = "return"  # the target of "allowed, and no policy to count it"
# The verdict maps in lookup order (``cells``): per (source, destination) identities, then per
# local identity.
MAPS = ("port", "range", "proto", "any", "wport", "wrange", "wproto", "default")
PREFIX = {Direction.EGRESS: "eg", Direction.INGRESS: "in"}
OUTCOMES = "outcomes"  # the map from a verdict's number to the verdict (``Outcomes``)
OUTCOME_CODES = {"allow": 1, "deny": 2, "audit": 3}


@dataclass(frozen=True)
class Inputs:
    policies: Sequence[Policy]
    namespaces: Mapping[str, Mapping[str, str]]  # name -> labels
    endpoints: Mapping[str, Endpoint]  # every host's, by store key
    node: str
    hosts: Sequence[IPAddress] = ()  # the other hosts' addresses


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
    return names + [f"{PREFIX[d]}_{m}" for d in Direction for m in MAPS] + [OUTCOMES]


class Outcomes:
    """Numbers for verdicts: the verdict maps hold a number, and the one ``outcomes`` map turns
    it into the verdict (a policy's chain, or return). Why not the verdicts themselves: the
    kernel checks the whole table for loops at the commit of any element that jumps to a chain
    (5-15 ms with 60,000 elements, measured), so only this map, which changes only when a
    policy comes or goes, holds jumps. A policy keeps its numbers while it lives."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}  # chain base -> slot
        self._bases: dict[int, str] = {}  # slot -> chain base
        self._free: list[int] = []
        self._next = 1

    def base_of(self, number: int) -> str | None:
        """The chain base a decision's number belongs to (None: return, or unknown)."""
        return self._bases.get(number // 4)

    def number(self, verdict: str) -> int:
        if verdict == RETURN:
            return 0
        base, outcome = verdict.rsplit("-", 1)
        return self._slots[base] * 4 + OUTCOME_CODES[outcome]

    def elements(self, base: str) -> dict[int, str]:
        slot = self._slots[base]
        return {slot * 4 + code: f"{base}-{o}" for o, code in OUTCOME_CODES.items()}

    def add(self, base: str) -> None:
        if base not in self._slots:
            self._slots[base] = self._free.pop() if self._free else self._take()
            self._bases[self._slots[base]] = base

    def remove(self, base: str) -> None:
        slot = self._slots.pop(base, None)
        if slot is not None:
            del self._bases[slot]
            self._free.append(slot)

    def _take(self) -> int:
        self._next += 1
        return self._next - 1


Cell = tuple[str, object, int]  # (set name, key, outcome number)


@dataclass
class Row:
    """One local identity's verdicts in one direction: its own elements (the wildcard and
    default), and those of the peers that some rule's peers match."""

    policies: list[Policy]
    default: Decision | None
    cuts: dict[str, set[int]]
    peered: list[Rule]  # rules whose peers must be asked, in evaluation order
    everyone: list[Rule]  # rules whose peers match every identity (entity all)
    names: frozenset[str]  # egress: port names the rules use (a peer's named ports matter)
    wild: Decisions | None = None
    own: list[Cell] = field(default_factory=list)
    cells: dict[Key, list[Cell]] = field(default_factory=dict)
    patterns: dict[tuple[int, tuple[object, ...]], list[tuple[str, tuple[object, ...], int]]] = \
        field(default_factory=dict)  # (which rules' peers match, named ports) -> key tails


class Compiler(Journal):
    def __init__(self) -> None:
        super().__init__(set_names())
        self.numbers = Numbers()
        self.chains: dict[str, str] = {}  # chain base -> "Kind ref", for every policy
        self.outcomes = Outcomes()
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
        self._matches = Matches(self._ev)
        self._local_eps: set[str] = set()  # store keys of this host's endpoints
        self._deferring = False  # compile: rows are made once every identity is known
        self._delta = Delta()

    # -- whole states ----------------------------------------------------------------------

    def compile(self, inputs: Inputs) -> Delta:
        """Everything again, from ``inputs``: the delta from what was compiled before."""
        old = {n: dict(s) for n, s in self.sets.items()}
        self._inputs = inputs
        self._reset_state()
        self.sets = {name: {} for name in set_names()}
        self._set_chains(_chains(inputs.policies))
        for version, c in self._cuts.items():
            for piece in c.pieces:
                self._world_piece(version, piece)
        # Every identity first, then the rows: a row then asks only for the peers its rules
        # match, where rows made first would each be offered every identity that comes after.
        self._deferring = True
        for address in inputs.hosts:
            self._add_address(address, identity.REMOTE_HOST, local=False)
        for key, ep in inputs.endpoints.items():
            self._set_endpoint(key, ep)
        self._deferring = False
        for ident in self._local:
            for direction in Direction:
                self._make_row(ident, direction)
        self._delta = Delta()
        self.numbers.retain(self._count)
        return diff(old, self.sets)

    def judged(self, delta: Delta) -> dict[Direction, set[IPAddress]]:
        """The local addresses whose verdicts ``delta`` changes, by the direction they are
        judged in (egress: as sources, ingress: as destinations)."""
        of: dict[object, Key] = {self.numbers.number(k): k for k in self._local}
        out: dict[Direction, set[IPAddress]] = {d: set() for d in Direction}
        for part in (delta.removed, delta.added):
            for name, elems in part.items():
                direction = next((d for d in Direction if name.startswith(PREFIX[d] + "_")),
                                 None)
                if direction is None:
                    continue
                for elem in elems:
                    key = of.get(_local_id(name, direction, elem))
                    if key is not None:
                        out[direction] |= self._local.get(key, set())
        return out

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
        self._matches.evaluator = self._ev
        self._delta = Delta()
        self._set_chains(_chains(policies))
        for key in self._local:
            rep = self._reps[key]
            assert rep.workload is not None
            if any(self._ev.selects(p, rep.workload) for p in changed):
                for direction in Direction:
                    self._drop_row(key, direction)
                    self._make_row(key, direction)
        return self._take()

    def _set_chains(self, chains: dict[str, str]) -> None:
        """The policies' chains and their outcome numbers: the ``outcomes`` elements of the
        gone dropped, of the new put (the verdict "return" is always there)."""
        for base in self.chains:
            if base not in chains:
                for n in self.outcomes.elements(base):
                    self._drop(OUTCOMES, n)
                self.outcomes.remove(base)
        self.chains = chains
        self._put(OUTCOMES, 0, RETURN)
        for base in chains:
            self.outcomes.add(base)
            for n, verdict in self.outcomes.elements(base).items():
                self._put(OUTCOMES, n, verdict)

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
            if self._deferring:
                return
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
        me = self._reps[key]
        assert me.workload is not None
        mine = [p for p in self._ev.policies if self._ev.selects(p, me.workload)
                and (p.rules(direction) or direction in p.isolates)]
        if not mine:
            return
        rules = [r for p in mine for r in p.rules(direction) if r.peers]
        everyone = [r for r in rules if EntityPeer(Entity.ALL) in r.peers]
        names = frozenset(m.name for p in mine for r in p.rules(direction) for m in r.ports
                          if m.name) if direction is Direction.EGRESS else frozenset()
        cuts = _bounds(mine, direction)
        if direction is Direction.INGRESS:
            for proto, more in _named(me, mine, direction).items():
                cuts[proto] |= more
        row = Row(mine, _default(mine, direction), cuts,
                  [r for r in rules if r not in everyone], everyone, names)
        memo = {**{id(r): False for r in row.peered}, **{id(r): True for r in everyone}}
        row.wild = cells.decisions(self._ev, direction, me, Party(me.address), mine, cuts, memo)
        self._rows[(key, direction)] = row
        mine_id = self.numbers.number(key)
        for address in self._local.get(key, ()):
            self._put(f"{PREFIX[direction]}{address.version}", address, None)
        row.own = [(f"{PREFIX[direction]}_{kind}", k, self.outcomes.number(target(d)))
                   for kind, k, d in cells.wildcard((mine_id,), row.wild, row.default)]
        for name, elem, verdict in row.own:
            self._put(name, _flat(elem), verdict)
        for peer, sig in self._signatures(row).items():
            self._make_cell(key, direction, row, peer, sig)

    def _signatures(self, row: Row) -> dict[Key, int]:
        """The peers some rule of ``row`` matches (or whose named ports it uses), each with the
        bit mask of the rules whose peers match it: one pass over the match sets."""
        sigs: dict[Key, int] = {}
        for i, rule in enumerate(row.peered):
            bit = 1 << i
            for peer in rule.peers:
                for k in self._matches.of(peer):
                    sigs[k] = sigs.get(k, 0) | bit
        for k in self._matches.named(row.names):
            sigs.setdefault(k, 0)
        return sigs

    def _signature(self, row: Row, peer: Key) -> int:
        sig = 0
        for i, rule in enumerate(row.peered):
            if any(peer in self._matches.of(p) for p in rule.peers):
                sig |= 1 << i
        return sig

    def _drop_row(self, key: Key, direction: Direction) -> None:
        row = self._rows.pop((key, direction), None)
        if row is None:
            return
        for address in self._local.get(key, ()):
            self._drop(f"{PREFIX[direction]}{address.version}", address)
        for name, elem, _ in row.own:
            self._drop(name, _flat(elem))
        for found in row.cells.values():
            for name, elem, _ in found:
                self._drop(name, elem)

    def _add_column(self, peer: Key) -> None:
        self._matches.add(peer, self._reps[peer])
        for (key, direction), row in self._rows.items():
            self._make_cell(key, direction, row, peer, self._signature(row, peer))

    def _drop_column(self, peer: Key) -> None:
        self._matches.remove(peer)
        for row in self._rows.values():
            for name, elem, _ in row.cells.pop(peer, []):
                self._drop(name, elem)

    def _make_cell(self, key: Key, direction: Direction, row: Row, peer: Key, sig: int) -> None:
        """The peer's elements in ``row``, from the row's cache of patterns: what a peer gets
        depends only on which rules' peers match it (``sig``, a bit per rule of
        ``row.peered``) and, egress, its named ports."""
        ports = tuple(sorted(x for x in peer.ports if x[0] in row.names)) if row.names else ()
        if not sig and not ports:
            return
        pattern = row.patterns.get((sig, ports))
        if pattern is None:
            pattern = row.patterns[(sig, ports)] = self._pattern(key, direction, row, sig, ports)
        mine, theirs = self.numbers.number(key), self.numbers.number(peer)
        ids = (mine, theirs) if direction is Direction.EGRESS else (theirs, mine)
        found: list[Cell] = [(name, (*ids, *rest), verdict) for name, rest, verdict in pattern]
        row.cells[peer] = found
        for name, elem, verdict in found:
            self._put(name, elem, verdict)

    def _pattern(self, key: Key, direction: Direction, row: Row, sig: int,
                 ports: tuple[tuple[str, str, int], ...]) -> list[tuple[str, tuple[object, ...],
                                                                    int]]:
        me = self._reps[key]
        memo = {**{id(r): bool(sig >> i & 1) for i, r in enumerate(row.peered)},
                **{id(r): True for r in row.everyone}}
        named = {(n, proto): num for n, proto, num in ports}
        peer = Party(me.address, Workload("peer", "", {}, named))
        cuts = {proto: set(c) for proto, c in row.cuts.items()}
        for _, proto, num in ports:
            cuts[proto] |= {num, num + 1}
        v = cells.decisions(self._ev, direction, me, peer, row.policies, cuts, memo)
        assert row.wild is not None
        return [(f"{PREFIX[direction]}_{kind}", k[2:], self.outcomes.number(target(d)))
                for kind, k, d in cells.specific((0, 0), v, row.wild)]

def _chains(policies: Iterable[Policy]) -> dict[str, str]:
    return {chain_base(f"{p.kind} {p.ref}"): f"{p.kind} {p.ref}" for p in policies}


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


def _flat(elem: object) -> object:
    """A one-field key as the kernel has it (not a 1-tuple)."""
    return elem[0] if isinstance(elem, tuple) and len(elem) == 1 else elem


def _local_id(name: str, direction: Direction, elem: object) -> object:
    """The local identity an element of a verdict map is about: the source of an egress pair,
    the destination of an ingress pair, or the only identity of a row's own elements."""
    if not isinstance(elem, tuple):
        return elem  # a row's default
    if name.endswith(("_wport", "_wrange", "_wproto")):
        return elem[0]
    return elem[0] if direction is Direction.EGRESS else elem[1]

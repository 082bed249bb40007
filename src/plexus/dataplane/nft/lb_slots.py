"""Where each frontend sits in ``table inet plexus_services``: its id, affinity class and the
backend numbers in draw order (the layout is explained in ``nft.lb``). Pure: ``Placement``
plans a change as element deltas and takes it on only once the kernel has accepted it.

A change keeps what it can: a backend that stays keeps its number and its slot, so a client's
affinity entry still leads to it and the batch holds only what differs. A backend that leaves
frees its slot; a newcomer takes the first free one, else the last backends move down into the
holes, so the slots stay 0..N-1 for the draw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from plexus.dataplane.nft import lb
from plexus.dataplane.nft.setelem import Change as ElementChange
from plexus.errors import DataplaneError
from plexus.lb.model import Backend, Change, Frontend
from plexus.model.types import IPAddress

FrontendKey = tuple[IPAddress, str, int]


@dataclass(frozen=True, slots=True)
class Placed:
    frontend: Frontend
    fid: int
    klass: int  # affinity class (0: none)
    slots: tuple[tuple[int, Backend], ...]  # (backend number, backend) in draw order

    @property
    def mark(self) -> int:
        return lb.frontend_mark(self.fid, self.klass, len(self.slots)) if self.slots else 0

    @property
    def pick(self) -> tuple[int, int] | None:
        """(N, affinity timeout) of the shared chain this frontend draws in."""
        return (len(self.slots), self.frontend.affinity) if self.slots else None

    def elements(self) -> lb.Elements:
        return lb.elements(self.frontend, self.fid,
                           ((b, lb.packed(x.address), x.port) for b, x in self.slots), self.mark)


@dataclass
class Plan:
    """What one change does: element deltas (deletes first), the pick chains it needs, and the
    backend numbers that die (affinity entries that lead to them are then deleted)."""

    placed: dict[FrontendKey, Placed]
    removed: list[FrontendKey]
    elements: list[ElementChange]
    chains: list[tuple[int, int]]
    dead: set[int]
    next_backend: int
    next_id: int
    free_ids: list[int]
    classes: dict[int, int]
    picks: dict[int, str] = field(default_factory=dict)  # new ``pick`` elements


@dataclass
class Placement:
    held: dict[FrontendKey, Placed] = field(default_factory=dict)
    chains: set[tuple[int, int]] = field(default_factory=set)  # pick chains in the kernel
    picks: set[int] = field(default_factory=set)  # keys of ``pick`` in the kernel
    classes: dict[int, int] = field(default_factory=dict)  # affinity timeout -> class
    next_backend: int = 1
    next_id: int = 0
    free_ids: list[int] = field(default_factory=list)

    def plan(self, change: Change) -> Plan:
        """The deltas that turn what is held into what is held + ``change``."""
        plan = Plan({}, [], [], [], set(), self.next_backend, self.next_id,
                    list(self.free_ids), dict(self.classes))
        for f in change.removed:
            if f.key in self.held:
                plan.removed.append(f.key)
        for f in change.changed:
            plan.placed[f.key] = self._place(self.held.get(f.key), f, plan)
        old = lb.merge(self.held[k].elements() for k in (*plan.removed, *plan.placed)
                       if k in self.held)
        new = lb.merge(p.elements() for p in plan.placed.values())
        dead = {b for k in (*plan.removed, *plan.placed) if k in self.held
                for b, _ in self.held[k].slots}
        plan.dead = dead - {b for p in plan.placed.values() for b, _ in p.slots}
        for k in plan.removed:
            plan.free_ids.append(self.held[k].fid)
        plan.elements = _deltas(lb.minus(old, new), lb.minus(new, old) if old else new)
        plan.chains, plan.picks = self._picks(plan.placed.values())
        if plan.picks:
            picks: dict[object, object] = dict(plan.picks.items())
            plan.elements.append(ElementChange("pick", lb.SETS["pick"], True, picks))
        return plan

    def commit(self, plan: Plan) -> None:
        for k in plan.removed:
            self.held.pop(k, None)
        self.held.update(plan.placed)
        self.chains.update(plan.chains)
        self.picks.update(plan.picks)
        self.next_backend, self.next_id = plan.next_backend, plan.next_id
        self.free_ids, self.classes = plan.free_ids, plan.classes

    def keys(self) -> dict[str, int]:
        """The elements each map of frontend keys (``lb.SIZED``) holds, by the frontends held:
        a VIP and each published address, a key each; a port published everywhere, one."""
        out = dict.fromkeys(lb.SIZED, 0)
        for p in self.held.values():
            f, v = p.frontend, p.frontend.vip.version
            keyed, anywhere = (f"vips{v}", f"ports{v}") if p.slots else (f"noep{v}",
                                                                        f"noports{v}")
            out[keyed] += 1 + sum(1 for x in f.published
                                  if x.address is not None and x.address.version == v)
            out[anywhere] += sum(1 for x in f.published if x.address is None)
        return out

    def everything(self, frontends: Iterable[Frontend]) -> Plan:
        """A fresh placement of ``frontends`` (the caller starts from an empty ``Placement``):
        every element to add."""
        return self.plan(Change((), tuple(frontends)))

    def _place(self, old: Placed | None, f: Frontend, plan: Plan) -> Placed:
        wanted = f.backends[:lb.MAX_BACKENDS]  # sorted and distinct (``Frontend``)
        klass = _class(f.affinity, plan)
        if old is None:  # the fast path of a full sync: no set of anything
            first = plan.next_backend
            plan.next_backend += len(wanted)
            return Placed(f, _new_id(plan), klass, tuple(zip(range(first, plan.next_backend),
                                                                   wanted, strict=True)))
        keep = set(wanted)
        slots: list[tuple[int, Backend] | None] = [s if s[1] in keep else None
                                                   for s in old.slots]
        have = {s[1] for s in slots if s is not None}
        fresh = [b for b in wanted if b not in have]
        for i, s in enumerate(slots):  # newcomers into the holes first
            if s is None and fresh:
                slots[i] = (plan.next_backend, fresh.pop(0))
                plan.next_backend += 1
        for b in fresh:
            slots.append((plan.next_backend, b))
            plan.next_backend += 1
        return Placed(f, old.fid, klass, _compact(slots))

    def _picks(self, placed: Iterable[Placed]) -> tuple[list[tuple[int, int]], dict[int, str]]:
        chains: list[tuple[int, int]] = []
        picks: dict[int, str] = {}
        for p in placed:
            shape = p.pick
            if shape is None:
                continue
            if shape not in self.chains and shape not in chains:
                chains.append(shape)
            key = p.mark & lb.PICK_MASK
            if key not in self.picks:
                picks[key] = lb.pick_chain(*shape)
        return chains, picks


def _compact(slots: list[tuple[int, Backend] | None]) -> tuple[tuple[int, Backend], ...]:
    """Holes filled by the last backends, so that the slots are 0..N-1."""
    out = list(slots)
    i = 0
    while i < len(out):
        if out[i] is None:
            last = out.pop()
            if i < len(out):
                out[i] = last  # perhaps a hole too: looked at again
            continue
        i += 1
    return tuple(s for s in out if s is not None)


def _new_id(plan: Plan) -> int:
    if plan.free_ids:
        return plan.free_ids.pop()
    if plan.next_id > lb.MAX_ID:
        raise DataplaneError(f"services table: more than {lb.MAX_ID} service ports")
    plan.next_id += 1
    return plan.next_id - 1


def _class(timeout: int, plan: Plan) -> int:
    if not timeout:
        return 0
    if timeout not in plan.classes:
        if len(plan.classes) >= lb.MAX_CLASSES:
            raise DataplaneError(f"services table: more than {lb.MAX_CLASSES} distinct "
                                 "affinity timeouts")
        plan.classes[timeout] = len(plan.classes) + 1
    return plan.classes[timeout]


def _deltas(gone: lb.Elements, added: lb.Elements) -> list[ElementChange]:
    """Deletes before adds: an element whose data changes is deleted and added again."""
    out = [ElementChange(n, lb.SETS[n], False, e) for n, e in sorted(gone.items())]
    return out + [ElementChange(n, lb.SETS[n], True, e) for n, e in sorted(added.items())]

"""Host-port claims: which endpoint publishes which host port, as plans for one transaction.

One key per (node, protocol, port) holds every host address that port is published on:
``{"*": endpoint}`` (every address) or ``{"127.0.0.1": a, "10.0.0.5": b}``. A compare-and-swap
on that one key guards all of them at once, so two requests racing for ``*:8080`` and
``127.0.0.1:8080`` cannot both win, while ``127.0.0.1:8080`` and ``10.0.0.5:8080`` coexist (as
with Docker). Reads per claim: one per host port, whatever the number of containers.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from plexus.errors import Conflict
from plexus.ipam.plans import Plan
from plexus.model import keys
from plexus.model.types import PortMapping
from plexus.store.base import Compare, Datastore, Delete, Put

ANY = "*"


def _clashes(mine: str, theirs: str) -> bool:
    return mine == theirs or ANY in (mine, theirs)


def _describe(protocol: str, port: int, where: str) -> str:
    host = "" if where == ANY else (f"[{where}]:" if ":" in where else f"{where}:")
    return f"{host}{port}/{protocol}"


@dataclass(frozen=True)
class PortChange:
    """``owner`` (an endpoint's store key, on ``node``) moves from ``old`` to ``new``."""

    node: str
    owner: str
    old: Sequence[PortMapping] = ()
    new: Sequence[PortMapping] = ()


Slots = dict[str, list[tuple[str, str, str, int]]]  # port key -> (owner, slot, proto, port)


def _slots(changes: Sequence[PortChange], gone: bool) -> Slots:
    out: Slots = defaultdict(list)
    for c in changes:
        for pm in c.old if gone else c.new:
            for host_port, _ in pm.pairs():
                key = keys.port(c.node, pm.protocol, host_port)
                out[key].append((c.owner, pm.host_slot, pm.protocol, host_port))
    return out


async def plan_ports(store: Datastore, changes: Sequence[PortChange],
                     who: Callable[[str], str] = str) -> Plan:
    """Move each owner from the host ports of its ``old`` mappings to those of its ``new``:
    one read and one conditional write per port key, whatever the number of owners. A port
    held by someone else raises Conflict naming the port and the holder (``who(store key)``).
    A slot an owner no longer holds (a stale endpoint) is left alone."""
    plan = Plan()
    gone, wanted = _slots(changes, True), _slots(changes, False)
    await _not_a_service_port(store, wanted, plan)
    for key in sorted(set(gone) | set(wanted)):
        kv = await store.get(key)
        held: dict[str, str] = json.loads(kv.value) if kv else {}
        before = dict(held)
        for owner, where, _, _ in gone.get(key, ()):
            if held.get(where) == owner:
                del held[where]
        for owner, where, protocol, port in wanted.get(key, ()):
            for other, holder in held.items():
                if holder != owner and _clashes(where, other):
                    raise Conflict(f"host port {_describe(protocol, port, where)} is already "
                                   f"published by {who(holder)} "
                                   f"({_describe(protocol, port, other)})")
            held[where] = owner
        if held == before:
            continue
        plan.compares.append(Compare.unchanged(kv, key))
        plan.ops.append(Put(key, json.dumps(held, sort_keys=True)) if held else Delete(key))
    return plan


async def _not_a_service_port(store: Datastore, wanted: Slots, plan: Plan) -> None:
    """A port a service publishes (on every host: ``--publish``, a NodePort) is not free for a
    container: the services table would take its connections first. The key's absence is part
    of the transaction, so a service claiming it meanwhile fails one of the two."""
    for protocol, port in sorted({(p, n) for slots in wanted.values() for _, _, p, n in slots}):
        key = keys.service_port(protocol, port)
        kv = await store.get(key)
        if kv is not None:
            raise Conflict(f"host port {port}/{protocol} is published by service {kv.value}")
        plan.compares.append(Compare.absent(key))


def owners(value: str) -> list[str]:
    """The endpoints a port key's value names (for garbage collection)."""
    return sorted(set(json.loads(value).values()))

"""The compiled policy form, looked up the way the nftables chains look it up (pure), so that
unit tests can hold it against the evaluator and against hand-written truth tables."""

from __future__ import annotations

from typing import Any

from plexus.model.types import IPAddress
from plexus.policy.cells import PORT_PROTOCOLS, PortRange
from plexus.policy.compile import OUTCOMES, PREFIX, RETURN
from plexus.policy.journal import Sets
from plexus.policy.model import Direction


def identity_of(sets: Sets, address: IPAddress) -> Any:
    v = address.version
    if address in sets[f"ep{v}"]:
        return sets[f"ep{v}"][address]
    return next(n for prefix, n in sets[f"world{v}"].items()
                if address in prefix)  # type: ignore[operator]


def lookup(sets: Sets, direction: Direction, src: Any, dst: Any, proto: str, port: int) -> str:
    p, key = PREFIX[direction], (src, dst)
    if proto in PORT_PROTOCOLS:
        found = sets[f"{p}_port"].get((*key, proto, port))
        if found is not None:
            return _verdict(sets, found)
        for k, t in sets[f"{p}_range"].items():
            assert isinstance(k, tuple)
            rng = k[3]
            assert isinstance(rng, PortRange)
            if k[:3] == (*key, proto) and rng.first <= port <= rng.last:
                return _verdict(sets, t)
        found = sets[f"{p}_proto"].get((*key, proto))
        if found is not None:
            return _verdict(sets, found)
    found = sets[f"{p}_any"].get(key)
    if found is not None:
        return _verdict(sets, found)
    mine = src if direction is Direction.EGRESS else dst
    if proto in PORT_PROTOCOLS:
        found = sets[f"{p}_wport"].get((mine, proto, port))
        if found is not None:
            return _verdict(sets, found)
        for k, t in sets[f"{p}_wrange"].items():
            assert isinstance(k, tuple)
            rng = k[2]
            assert isinstance(rng, PortRange)
            if k[:2] == (mine, proto) and rng.first <= port <= rng.last:
                return _verdict(sets, t)
        found = sets[f"{p}_wproto"].get((mine, proto))
        if found is not None:
            return _verdict(sets, found)
    found = sets[f"{p}_default"].get(mine)
    return RETURN if found is None else _verdict(sets, found)


def _verdict(sets: Sets, number: object) -> str:
    """The verdict a decision's number stands for (the ``outcomes`` map)."""
    return str(sets[OUTCOMES][number])


def passes(sets: Sets, src: IPAddress, dst: IPAddress, proto: str, port: int) -> bool:
    """What one host's forward hook does with a new connection."""
    sid, did = identity_of(sets, src), identity_of(sets, dst)
    for direction, end in ((Direction.EGRESS, src), (Direction.INGRESS, dst)):
        policed = sets[f"{PREFIX[direction]}{end.version}"]
        if end in policed and lookup(sets, direction, sid, did, proto, port).endswith("-deny"):
            return False
    return True

"""The compiled policy form, looked up the way the nftables chains look it up (pure), so that
unit tests can hold it against the evaluator and against hand-written truth tables."""

from __future__ import annotations

from plexus.model.types import IPAddress
from plexus.policy.compile import PORT_PROTOCOLS, RETURN, Compiled, PortRange
from plexus.policy.model import Direction


def identity_of(c: Compiled, address: IPAddress) -> int:
    if address in c.ids:
        return c.ids[address]
    return next(n for prefix, n in c.world.items() if address in prefix)


def lookup(c: Compiled, direction: Direction, src: int, dst: int, proto: str,
           port: int) -> str:
    key = (src, dst)
    if proto in PORT_PROTOCOLS:
        found = c.cells[(direction, "port")].get((*key, proto, port))
        if found:
            return found
        for k, t in c.cells[(direction, "range")].items():
            rng = k[3]
            assert isinstance(rng, PortRange)
            if k[:3] == (*key, proto) and rng.first <= port <= rng.last:
                return t
        found = c.cells[(direction, "proto")].get((*key, proto))
        if found:
            return found
    found = c.cells[(direction, "any")].get(key)
    if found:
        return found
    mine = src if direction is Direction.EGRESS else dst
    return c.cells[(direction, "default")].get((mine,), RETURN)


def passes(c: Compiled, src: IPAddress, dst: IPAddress, proto: str, port: int) -> bool:
    """What one host's forward hook does with a new connection."""
    sid, did = identity_of(c, src), identity_of(c, dst)
    for direction, end in ((Direction.EGRESS, src), (Direction.INGRESS, dst)):
        if end in c.policed[direction] and lookup(c, direction, sid, did, proto,
                                                  port).endswith("-deny"):
            return False
    return True

"""Parse ``list table inet plexus`` (JSON) back into a ``FirewallState``; pure.

The elements of the sets and maps are the whole state (the rules never change), so reading them
back is enough for a reconciler to compare the kernel with what it wants. A table that does not
have exactly our sets, maps, chains and number of rules per chain (an older plexus, a flushed
chain, a rule added by hand) reads as ``None``: "unknown, replace it". A rule edited in place
is not noticed: the kernel lists rules in a normalised form that differs from what we send.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

from plexus.dataplane.nft._json import Json
from plexus.dataplane.nft.render import PUB_MAPS, SPECS, render_table
from plexus.dataplane.nft.state import FirewallState, NetRule, Publication
from plexus.model.types import IPAddress, IPNetwork, Protocol


def parse_table(listing: Json) -> FirewallState | None:
    """The state held by a listed table, or None if it is absent or not in our shape."""
    objs = [o for o in listing.get("nftables", []) if "metainfo" not in o]
    if not _has_our_shape(objs):
        return None
    elems = {body["name"]: _elements(body) for o in objs for _, body in _sets(o)}
    try:
        return FirewallState(_nets(elems), frozenset(_pubs(elems))).canonical()
    except (ValueError, KeyError, TypeError, OSError):  # elements we never write (a hand edit)
        return None


# -- shape ---------------------------------------------------------------------------------------


def _has_our_shape(objs: list[Json]) -> bool:
    if not any("table" in o for o in objs):
        return False
    return _shape(objs) == _expected_shape()


def _shape(objs: Iterable[Json]) -> tuple[frozenset[tuple[str, str]], Mapping[str, int]]:
    """(set/map declarations, rules per chain), without handles and elements."""
    decls: set[tuple[str, str]] = set()
    rules: dict[str, int] = defaultdict(int)
    for o in objs:
        for kind, body in _sets(o):
            decls.add((kind, repr(_decl(body))))
        if "chain" in o:
            rules.setdefault(o["chain"]["name"], 0)
        if "rule" in o:
            rules[o["rule"]["chain"]] += 1
    return frozenset(decls), dict(rules)


@functools.cache
def _expected_shape() -> tuple[frozenset[tuple[str, str]], Mapping[str, int]]:
    """What render_table creates, described the way the kernel lists it."""
    cmds = render_table(FirewallState())
    return _shape(c["add"] for c in cmds if "add" in c)


def _sets(o: Json) -> Iterator[tuple[str, Json]]:
    for kind in ("set", "map"):
        if kind in o and o[kind].get("name") in SPECS:
            yield kind, o[kind]


def _decl(body: Json) -> tuple[Any, ...]:
    def norm(t: Any) -> Any:
        return tuple(t) if isinstance(t, list) else t

    return (body["name"], norm(body["type"]), body.get("map"), tuple(body.get("flags", ())))


# -- elements ------------------------------------------------------------------------------------


def _elements(body: Json) -> list[Any]:
    # An element with attributes (timeout, comment, counter) is listed as {"elem": {"val": x}}.
    out = []
    for e in body.get("elem", []):
        if isinstance(e, list):  # a map element: [key, data]
            out.append([_unwrap(e[0]), e[1]])
        else:
            out.append(_unwrap(e))
    return out


def _unwrap(e: Any) -> Any:
    return e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e


def _concat(e: Any) -> list[Any]:
    return cast(list[Any], e["concat"]) if isinstance(e, dict) and "concat" in e else [e]


def _network(e: Any) -> IPNetwork:
    # A /32 or /128 in an interval set is listed as a bare address.
    if isinstance(e, dict) and "prefix" in e:
        return ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}")
    return ipaddress.ip_network(e)


def _port(e: Any) -> int:
    return e if isinstance(e, int) else socket.getservbyname(str(e))


def _protocol(e: Any) -> Protocol:
    name = {6: "tcp", 17: "udp"}.get(e, e)
    if name not in ("tcp", "udp"):
        raise ValueError(f"unexpected protocol {e!r}")
    return cast(Protocol, name)


# -- state ---------------------------------------------------------------------------------------


def _nets(elems: Mapping[str, list[Any]]) -> tuple[NetRule, ...]:
    subnets: dict[str, list[IPNetwork]] = defaultdict(list)
    for version in (4, 6):
        for e in elems.get(f"bridge_nets{version}", []):
            ifname, net = _concat(e)
            subnets[ifname].append(_network(net))
    masq = [_network(e) for v in (4, 6) for e in elems.get(f"masq{v}", [])]
    internal = set(elems.get("internal", []))
    tunnels = _tunnels(elems)
    clients: dict[str, list[IPAddress]] = defaultdict(list)
    for version in (4, 6):
        for e in elems.get(f"vip_clients{version}", []):
            ifname, address = _concat(e)
            clients[ifname].append(ipaddress.ip_address(address))
    return tuple(
        NetRule(b, tuple(subnets[b]), b in internal, _masqueraded(subnets[b], masq),
                tunnels.get(b, ""), tuple(clients[b]))
        for b in elems.get("bridges", [])
        if b not in tunnels.values()
    )


def _tunnels(elems: Mapping[str, list[Any]]) -> dict[str, str]:
    """bridge -> its network's tunnel: the other end of a pair in ``intra`` whose first link
    is a bridge (paired with itself too)."""
    pairs = {(a, b) for a, b in (_concat(e) for e in elems.get("intra", []))}
    return {a: b for a, b in pairs if a != b and (a, a) in pairs}


def _masqueraded(subnets: list[IPNetwork], masq: list[IPNetwork]) -> bool:
    return any(
        s.version == m.version and s.subnet_of(m)  # type: ignore[arg-type]
        for s in subnets for m in masq
    )


def _pubs(elems: Mapping[str, list[Any]]) -> Iterator[Publication]:
    for spec in PUB_MAPS:
        if not spec.name.endswith("_addr"):
            continue
        prefix = spec.name.removesuffix("_addr")
        ports = {_key(k): p for k, p in elems.get(f"{prefix}_port", [])}
        for k, addr in elems.get(spec.name, []):
            key = _key(k)
            if key in ports:  # half an element pair is no publication: the diff will show it
                yield _publication(key, ipaddress.ip_address(addr), _port(ports[key]))


def _key(e: Any) -> tuple[IPAddress | None, Protocol, int]:
    parts = _concat(e)
    host = ipaddress.ip_address(parts[0]) if len(parts) == 3 else None
    return host, _protocol(parts[-2]), _port(parts[-1])


def _publication(key: tuple[IPAddress | None, Protocol, int], addr: IPAddress, port: int) -> (
    Publication
):
    host_ip, protocol, host_port = key
    return Publication(protocol, host_ip, host_port, addr, port)



"""Builders for libnftables JSON (see ``man libnftables-json``), so renderers read like nft rules.

Only what plexus uses is here. Values are encoded from plain Python values: ``str`` and ``int``
as themselves, addresses as strings, networks as prefixes, tuples as concatenations.
"""

from __future__ import annotations

import ipaddress
from typing import Any, TypeAlias

Json: TypeAlias = dict[str, Any]
Value: TypeAlias = (
    str | int | ipaddress.IPv4Address | ipaddress.IPv6Address
    | ipaddress.IPv4Network | ipaddress.IPv6Network | tuple["Value", ...]
)

FAMILY = "inet"
TABLE = "plexus"


def encode(value: Value) -> Any:
    """A Python value as an nft JSON expression (element key, element data or match operand)."""
    # Dispatch on the exact type: this runs for every element of a 10,000-element batch, and
    # isinstance() against unions of ipaddress classes was most of the renderer's time.
    kind = type(value)
    if kind is str or kind is int:
        return value
    if kind is tuple:
        return {"concat": [encode(v) for v in value]}  # type: ignore[union-attr]
    if kind is ipaddress.IPv4Address or kind is ipaddress.IPv6Address:
        return str(value)
    if kind is ipaddress.IPv4Network or kind is ipaddress.IPv6Network:
        return _prefix(value)  # type: ignore[arg-type]
    raise TypeError(f"cannot encode {value!r} for nft")


def _prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def obj(kind: str, **fields: Any) -> Json:
    """A table object (``set``, ``map``, ``chain``, ``rule``, ``element``) of our table."""
    head = {"family": FAMILY, "table": TABLE} if kind != "table" else {"family": FAMILY}
    return {kind: {**head, **fields}}


def cmd(verb: str, thing: Json) -> Json:
    return {verb: thing}


# -- expressions ---------------------------------------------------------------------------------


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def ct(key: str) -> Json:
    return {"ct": {"key": key}}


def fib_daddr_type() -> Json:
    return {"fib": {"result": "type", "flags": ["daddr"]}}


def concat(*exprs: Json) -> Json:
    return {"concat": list(exprs)}


def anon_set(*values: Value) -> Json:
    return {"set": [encode(v) for v in values]}


def ref(set_name: str) -> str:
    return f"@{set_name}"


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def flags_in(left: Json, *flags: str) -> Json:
    """``ct state established,related``: a bitmask test, op ``in`` in nft's JSON."""
    return match(left, list(flags) if len(flags) > 1 else flags[0], op="in")


def verdict(name: str) -> Json:
    return {name: None}


def masquerade() -> Json:
    return {"masquerade": None}


def dnat_maps(family: str, key: Json, prefix: str) -> Json:
    """``dnat <family> to <key> map @<prefix>_addr : <key> map @<prefix>_port``."""
    def lookup(part: str) -> Json:
        return {"map": {"key": key, "data": ref(f"{prefix}_{part}")}}

    return {"dnat": {"family": family, "addr": lookup("addr"), "port": lookup("port")}}

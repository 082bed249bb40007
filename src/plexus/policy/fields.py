"""Fields that every kind of policy shares (protocols, ports, CIDRs, lists), checked as the
API servers check them."""

from __future__ import annotations

import ipaddress
from typing import Any

from plexus.errors import InvalidArgument
from plexus.model import parse
from plexus.model.types import IPNetwork
from plexus.policy.model import PROTOCOLS, CidrPeer, PortMatch


def protocol(field: str, raw: Any, default: str = "TCP", allow_any: bool = False) -> str:
    """"tcp", "udp" or "sctp" from the document's TCP/UDP/SCTP ("" for Cilium's ANY)."""
    value = default if raw is None else raw
    if allow_any and value == "ANY":
        return ""
    if not isinstance(value, str) or value.lower() not in PROTOCOLS or value != value.upper():
        choices = "TCP, UDP, SCTP" + (" or ANY" if allow_any else "")
        raise InvalidArgument(field, raw, f"a protocol: {choices}")
    return value.lower()


def number(field: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise InvalidArgument(field, raw, "a port number, 1 to 65535")
    return raw


def port_name(field: str, raw: str) -> str:
    return parse.port_name(field, raw)


def k8s_port(field: str, raw: Any) -> PortMatch:
    """A NetworkPolicyPort: protocol (TCP by default), port (number or name), endPort."""
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "a port entry is a mapping (protocol, port, endPort)")
    proto = protocol(f"{field}.protocol", raw.get("protocol"))
    return port_match(field, proto, raw.get("port"), raw.get("endPort"))


def port_match(field: str, proto: str, port: Any, end: Any) -> PortMatch:
    """A port entry's port (None: every port; a number; a name) and ``end`` (None: none),
    checked as NetworkPolicy's and Cilium's validation check them."""
    if isinstance(port, str) and not port.isdigit():
        if end is not None:
            raise InvalidArgument(f"{field}.endPort", end, "not allowed with a named port")
        return PortMatch(proto, name=port_name(f"{field}.port", port))
    if port is None:
        if end is not None:
            raise InvalidArgument(f"{field}.endPort", end, "needs a numeric port")
        return PortMatch(proto)
    first = number(f"{field}.port", int(port) if isinstance(port, str) else port)
    if end is None:
        return PortMatch(proto, first)
    last = number(f"{field}.endPort", end)
    if last < first:
        raise InvalidArgument(f"{field}.endPort", end, f"below port {first}")
    return PortMatch(proto, first, last if last > first else 0)


def cidr_block(field: str, raw: Any, endpoints: bool, missing: str = "required") -> CidrPeer:
    """An ipBlock / CIDRSet: ``{cidr, except}``, every except strictly inside the cidr."""
    if not isinstance(raw, dict) or "cidr" not in raw:
        raise InvalidArgument(f"{field}.cidr", None, missing)
    outer = cidr(f"{field}.cidr", raw["cidr"])
    excepts = tuple(cidr_except(f"{field}.except[{i}]", e, outer)
                    for i, e in enumerate(listof(f"{field}.except", raw.get("except"))))
    return CidrPeer(outer, excepts, endpoints=endpoints)


def cidr(field: str, raw: Any) -> IPNetwork:
    if not isinstance(raw, str):
        raise InvalidArgument(field, raw, "a CIDR such as 10.0.0.0/8")
    try:
        return ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise InvalidArgument(field, raw, "not a CIDR") from None


def cidr_except(field: str, raw: Any, outer: IPNetwork) -> IPNetwork:
    inner = cidr(field, raw)
    if inner.version != outer.version or not inner.subnet_of(outer) or inner == outer:  # type: ignore[arg-type]
        raise InvalidArgument(field, raw, f"not strictly inside {outer}")
    return inner


def known_fields(field: str, raw: dict[str, Any], known: set[str]) -> None:
    """Unknown fields are refused, as ``kubectl apply`` (strict validation) does: a misspelt
    ``egress`` must not silently apply a policy without its rules."""
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidArgument(f"{field}.{unknown[0]}", raw[unknown[0]], "unknown field")


def listof(field: str, raw: Any) -> list[Any]:
    """A list field of a document; absent is empty."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument(field, raw, "a list")
    return raw

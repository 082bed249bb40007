"""Parse and validate user input. Every failure is one InvalidArgument naming field and value."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import cast

from plexus.errors import InvalidArgument
from plexus.model.drivers import traits
from plexus.model.types import Driver, ExposedPort, IPAddress, IPNetwork, PortMapping, Protocol

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
_PORT_RE = re.compile(
    r"^(?:(?P<ip>\[[0-9a-fA-F:.]+\]|[0-9.]+):)?"
    r"(?P<h1>\d+)(?:-(?P<h2>\d+))?:(?P<c1>\d+)(?:-(?P<c2>\d+))?(?:/(?P<proto>[a-z]+))?$"
)
MAX_PORT_RANGE = 1024
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")  # RFC 1123 host names
# Kubernetes: a namespace is an RFC 1123 label; a label's name (and value) 63 characters of
# [A-Za-z0-9_.-] that start and end alphanumeric; a key may have a DNS-subdomain prefix and "/".
NAMESPACE_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def name(field: str, value: str, max_len: int = 64) -> str:
    if not value or len(value) > max_len or not NAME_RE.match(value):
        raise InvalidArgument(
            field, value, f"must match {NAME_RE.pattern} and be at most {max_len} characters"
        )
    return value


def ifname(value: str) -> str:
    if value in (".", "..") or not IFNAME_RE.match(value):
        raise InvalidArgument("ifname", value, "1-15 characters, no '/', ':' or whitespace")
    return value


def alias(value: str) -> str:
    """A DNS name other containers will find this one by."""
    if len(value) > 253 or not DNS_NAME_RE.match(value):
        raise InvalidArgument("alias", value, "must be a DNS name: letters, digits, '-' and "
                              "'.' between labels of at most 63 characters")
    return value


def namespace(value: str) -> str:
    """A policy namespace, as Kubernetes names them ("" is no namespace)."""
    if value and not NAMESPACE_RE.match(value):
        raise InvalidArgument("namespace", value, "must be a lower-case RFC 1123 label "
                              "(a-z, 0-9 and '-', at most 63 characters)")
    return value


def label(key: str, value: str) -> tuple[str, str]:
    """A label as Kubernetes has them: [PREFIX/]NAME=VALUE."""
    prefix, slash, label_name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not DNS_NAME_RE.match(prefix)):
        raise InvalidArgument("label", key, "the prefix before '/' must be a DNS subdomain")
    if not LABEL_NAME_RE.match(label_name):
        raise InvalidArgument("label", key, "the name must be at most 63 characters of "
                              "[A-Za-z0-9_.-], starting and ending alphanumeric")
    if value and not LABEL_NAME_RE.match(value):
        raise InvalidArgument("label", f"{key}={value}", "the value must be empty or at most 63 "
                              "characters of [A-Za-z0-9_.-], starting and ending alphanumeric")
    return key, value


def driver(value: str) -> Driver:
    return traits(value).name


def cidr(field: str, value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise InvalidArgument(field, value, _cidr_reason(value)) from None


def _cidr_reason(value: str) -> str:
    """Why ``value`` is not a network, in words that do not repeat it (the standard library's
    do: "'x' does not appear to be an IPv4 or IPv6 network")."""
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "not an IPv4 or IPv6 network (expected ADDRESS/PREFIXLEN)"
    return f"host bits set (the network is {loose})"


# The smallest subnet a pool may be cut into: 8 addresses, so that after the network address,
# the gateway and (IPv4) the broadcast address a few containers still fit.
MIN_POOL_SUBNET_BITS = 3


def pool(field: str, value: str, version: int | None = None) -> tuple[IPNetwork, int]:
    """``CIDR:PREFIXLEN``, a pool that automatic subnets (of ``/PREFIXLEN``) are cut from,
    e.g. ``10.89.0.0/16:24``; ``version`` (4 or 6) if the pool must be of that family."""
    net_text, _, length = value.rpartition(":")
    if "/" not in net_text or not length.isdigit():
        example = "fd89:7c00::/48:64" if version == 6 else "10.89.0.0/16:24"
        raise InvalidArgument(field, value, f"expected CIDR:PREFIXLEN, e.g. {example}")
    try:
        net = ipaddress.ip_network(net_text, strict=True)
    except ValueError:
        raise InvalidArgument(field, value, _cidr_reason(net_text)) from None
    if version is not None and net.version != version:
        raise InvalidArgument(field, value, f"expected an IPv{version} network")
    prefix, longest = int(length), net.max_prefixlen - MIN_POOL_SUBNET_BITS
    if not net.prefixlen <= prefix <= longest:
        raise InvalidArgument(field, value, f"the subnets' prefix length must be between "
                              f"/{net.prefixlen} (the pool's) and /{longest} (8 addresses)")
    return net, prefix


def address(field: str, value: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidArgument(field, value, "not an IP address") from None


def mtu(value: int) -> int:
    if not 68 <= value <= 65535:
        raise InvalidArgument("mtu", value, "must be between 68 and 65535")
    return value


def labels(items: Iterable[str], field: str = "label") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(field, item, "expected KEY=VALUE")
        out[key] = val
        if field == "label":
            label(key, val)
    return out


def _port(field: str, spec: str, text: str | None) -> int:
    if text is None:
        return 0
    value = int(text)
    if not 1 <= value <= 65535:
        raise InvalidArgument(field, spec, f"port {value} is outside 1-65535")
    return value


def port_mapping(spec: str) -> PortMapping:
    """``[HOSTIP:]HPORT[-HPORT2]:CPORT[-CPORT2][/tcp|udp]``; IPv6 host addresses in brackets."""
    m = _PORT_RE.match(spec)
    if m is None:
        raise InvalidArgument("publish", spec, "expected [HOSTIP:]HPORT[-HPORT2]:CPORT[/tcp|udp]")
    proto = m["proto"] or "tcp"
    if proto not in ("tcp", "udp"):
        raise InvalidArgument("publish", spec, f"protocol {proto!r} is not tcp or udp")
    host_ip = None
    if m["ip"]:
        try:
            host_ip = ipaddress.ip_address(m["ip"].strip("[]"))
        except ValueError:
            raise InvalidArgument("publish", spec, "host address is not an IP") from None
        if host_ip.is_unspecified:
            host_ip = None
    h1, h2 = _port("publish", spec, m["h1"]), _port("publish", spec, m["h2"])
    c1, c2 = _port("publish", spec, m["c1"]), _port("publish", spec, m["c2"])
    if (h2 and h2 < h1) or (c2 and c2 < c1):
        raise InvalidArgument("publish", spec, "a range must go from low to high")
    if h2 - h1 >= MAX_PORT_RANGE:
        raise InvalidArgument("publish", spec, f"ranges are limited to {MAX_PORT_RANGE} ports")
    if c2 and c2 - c1 != (h2 or h1) - h1:
        raise InvalidArgument("publish", spec, "host and container ranges differ in length")
    return PortMapping(
        host_port=h1,
        container_port=c1,
        protocol=cast(Protocol, proto),
        host_ip=host_ip,
        host_port_end=h2 if h2 != h1 else 0,
        container_port_end=c2 if c2 != c1 else 0,
    )


def port_overlap(a: PortMapping, b: PortMapping) -> bool:
    """Would the two mappings claim the same host port?"""
    if a.protocol != b.protocol:
        return False
    if a.host_ip is not None and b.host_ip is not None and a.host_ip != b.host_ip:
        return False
    if a.host_ip is not None and b.host_ip is not None and a.host_ip.version != b.host_ip.version:
        return False
    return a.host_port <= b.host_last and b.host_port <= a.host_last


EXPOSE_PROTOCOLS = ("tcp", "udp", "sctp")


def port_name(field: str, value: str) -> str:
    """An IANA service name, as a containerPort's name: 1 to 15 lowercase letters, digits and
    dashes, at least one letter, no dash at either end or twice in a row."""
    ok = (1 <= len(value) <= 15 and all(c.islower() or c.isdigit() or c == "-" for c in value)
          and any(c.isalpha() for c in value) and value[0] != "-" and value[-1] != "-"
          and "--" not in value)
    if not ok:
        raise InvalidArgument(field, value, "a port name is 1-15 lowercase letters, digits and "
                                            "dashes, with a letter")
    return value


def expose(spec: str) -> ExposedPort:
    """``[NAME=]PORT[/tcp|udp|sctp]``: a port the container serves, named for policies."""
    name, eq, rest = spec.rpartition("=")
    port_text, slash, proto = rest.partition("/")
    proto = proto or "tcp"
    if slash and proto not in EXPOSE_PROTOCOLS:
        raise InvalidArgument("expose", spec, f"protocol {proto!r} is not tcp, udp or sctp")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument("expose", spec, "expected [NAME=]PORT[/tcp|udp|sctp], "
                                              "PORT 1 to 65535")
    return ExposedPort(int(port_text), proto, port_name("expose", name) if eq else "")


def exposes(specs: Iterable[str]) -> tuple[ExposedPort, ...]:
    """Several ``--expose``; a name given twice for one protocol is refused."""
    out = tuple(expose(s) for s in specs)
    seen: set[tuple[str, str]] = set()
    for x in out:
        if x.name and (x.name, x.protocol) in seen:
            raise InvalidArgument("expose", str(x), f"port name {x.name} is given twice")
        seen.add((x.name, x.protocol))
    return out


def label_changes(items: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """``K=V`` sets a label, ``K-`` removes one (as ``kubectl label``): (to set, to remove)."""
    put: dict[str, str] = {}
    drop: list[str] = []
    for item in items:
        if "=" not in item and item.endswith("-") and len(item) > 1:
            key = item[:-1]
            label(key, "")
            drop.append(key)
            continue
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise InvalidArgument("label", item, "expected KEY=VALUE or KEY- (to remove it)")
        put[key] = label(key, val)[1]
    both = set(put) & set(drop)
    if both:
        raise InvalidArgument("label", sorted(both)[0], "both set and removed")
    if not put and not drop:
        raise InvalidArgument("label", "", "nothing to change: give KEY=VALUE or KEY-")
    return put, drop

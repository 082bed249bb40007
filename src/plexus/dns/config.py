"""DNS settings: the agent-wide ones, the per-network options, upstream addresses.

Per network (``Network.options``, set with ``plexus network create --opt`` or the flags below):

    dns=false                   no DNS server on this network's gateway (default: on for networks
                                that have a gateway)
    dns_upstreams=IP[:PORT],..  this network's upstream resolvers (``--dns-upstream``, repeatable),
                                instead of the agent's

Agent-wide (``DnsSettings``): the domain names are also published under, the record TTL, and the
default upstreams (``plexus agent --dns-upstream``, else the host's /etc/resolv.conf).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from plexus.errors import InvalidArgument
from plexus.model.types import IPAddress, Network

OPTION_DNS = "dns"
OPTION_UPSTREAMS = "dns_upstreams"
DEFAULT_DOMAIN = "plexus.internal"  # .internal is reserved for private use (ICANN, 2024)
# Small, because containers are recreated with new addresses all the time; large enough that a
# burst of lookups from one process is served from its own cache.
DEFAULT_TTL = 5
DNS_PORT = 53


@dataclass(frozen=True, slots=True, order=True)
class Upstream:
    host: IPAddress
    port: int = DNS_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DnsSettings:
    domain: str = DEFAULT_DOMAIN  # "" publishes no domain-qualified names
    ttl: int = DEFAULT_TTL
    upstreams: tuple[Upstream, ...] = ()  # agent-wide default

    def __post_init__(self) -> None:
        if not 0 <= self.ttl <= 86400:
            raise InvalidArgument("dns ttl", self.ttl, "must be between 0 and 86400 seconds")
        domain = self.domain.strip(".").lower()
        if domain and not all(0 < len(p) <= 63 for p in domain.split(".")):
            raise InvalidArgument("dns domain", self.domain, "not a valid domain name")
        object.__setattr__(self, "domain", domain)


def parse_upstream(text: str) -> Upstream:
    """``IP``, ``IP:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address."""
    value = text.strip()
    host, port = value, DNS_PORT
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument("dns upstream", text, "expected [IPv6]:PORT")
        host = inner
        port = _port(text, rest[1:]) if rest else DNS_PORT
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = _port(text, port_text)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidArgument("dns upstream", text, "expected IP[:PORT]") from None
    return Upstream(address, port)


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument("dns upstream", text, "port must be 1-65535")
    return int(port)


def parse_upstreams(values: Iterable[str]) -> tuple[Upstream, ...]:
    """Repeated ``--dns-upstream`` values (each may itself be a comma-separated list)."""
    out: list[Upstream] = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                up = parse_upstream(part)
                if up not in out:
                    out.append(up)
    return tuple(out)


def format_upstreams(upstreams: Sequence[Upstream]) -> str:
    """The value stored in ``Network.options[OPTION_UPSTREAMS]``."""
    return ",".join(str(u) for u in upstreams)


def resolv_conf_upstreams(path: Path = Path("/etc/resolv.conf")) -> tuple[Upstream, ...]:
    """The ``nameserver`` lines of a resolv.conf (missing or unreadable file: none).

    Loopback resolvers (systemd-resolved's 127.0.0.53) are kept: the agent forwards from the
    host's namespace, where they are reachable, unlike a container (Docker's failure mode).
    """
    try:
        text = path.read_text()
    except OSError:
        return ()
    return resolv_conf_text_upstreams(text)


def resolv_conf_text_upstreams(text: str) -> tuple[Upstream, ...]:
    found: list[str] = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            found.append(parts[1].split("%", 1)[0])  # a zone index is host-local; drop it
    out: list[Upstream] = []
    for value in found:
        try:
            out.append(Upstream(ipaddress.ip_address(value)))
        except ValueError:
            continue
    return tuple(dict.fromkeys(out))


def dns_enabled(network: Network) -> bool:
    return network.options.get(OPTION_DNS, "true").lower() not in ("false", "0", "no", "off")


def network_upstreams(network: Network) -> tuple[Upstream, ...]:
    """The network's own upstreams; empty means "use the agent's". Bad values are skipped (they
    were validated when the network was created)."""
    value = network.options.get(OPTION_UPSTREAMS, "")
    out: list[Upstream] = []
    for part in value.split(","):
        if part.strip():
            try:
                out.append(parse_upstream(part))
            except InvalidArgument:
                continue
    return tuple(out)


def listen_addresses(network: Network) -> tuple[IPAddress, ...]:
    """Where the DNS server listens for ``network``: its subnets' gateways (port 53)."""
    if not dns_enabled(network):
        return ()
    return tuple(s.gateway for s in network.subnets if s.gateway is not None)

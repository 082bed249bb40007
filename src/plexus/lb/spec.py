"""A service as stored (``keys.service``): what ``plexus service create`` and a Kubernetes
``v1 Service`` both become, and the parsing of the CLI's specs. Pure.

    --port [PNAME:]PORT[:TARGETPORT][/tcp|udp]   http:80:8080, 80, 53/udp, web:80:http
    --publish [HOSTIP:]HOSTPORT:PORT[/proto]     8080:80, 127.0.0.1:8080:80/tcp
    --selector K=V                               app=web (every pair must match)

A target port given by name (``http``) is resolved per endpoint through the names its container
exposes (``run --expose http=8080``), as a Pod's named containerPort is: two endpoints may serve
one service port on different container ports. An endpoint that exposes no such name is not a
backend of that port (``plexus service inspect`` reports the name as unresolved).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from plexus.errors import InvalidArgument
from plexus.lb.model import Proto
from plexus.model import parse
from plexus.model.types import IPAddress

Affinity = Literal["none", "client-ip"]
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, Kubernetes' sessionAffinityConfig default
MAX_AFFINITY_TIMEOUT = 86400  # Kubernetes' upper bound
PROTOCOLS: tuple[Proto, ...] = ("tcp", "udp")


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    protocol: Proto = "tcp"
    target: int | str = 0  # a container port, a name the endpoints expose, or 0: ``port``
    name: str = ""

    @property
    def target_port(self) -> int | str:
        return self.target or self.port

    def __str__(self) -> str:
        target = f":{self.target}" if self.target and self.target != self.port else ""
        return (f"{self.name}:" if self.name else "") + f"{self.port}{target}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Publish:
    """A host port leading to a service port, on every host (``address`` None: every local
    address): ``--publish`` and a NodePort's ``nodePort``."""

    host_port: int
    port: int
    protocol: Proto = "tcp"
    address: IPAddress | None = None

    def __str__(self) -> str:
        ip = "" if self.address is None else (
            f"[{self.address}]:" if self.address.version == 6 else f"{self.address}:")
        return f"{ip}{self.host_port}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Health:
    """A readiness check: a TCP connect to ``port``, or ``command`` run in the container."""

    port: int = 0
    command: str = ""
    interval: float = 5.0
    threshold: int = 3


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    network: str
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    vips: tuple[IPAddress, ...] = ()  # chosen when stored; none when headless
    headless: bool = False
    affinity: Affinity = "none"
    affinity_timeout: int = 0
    publish: tuple[Publish, ...] = ()
    health: Health | None = None
    created: float = 0.0
    origin: str = "cli"  # "cli" or "manifest" (``plexus apply``)
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def affinity_seconds(self) -> int:
        """The frontends' affinity timeout (0: none)."""
        return self.affinity_timeout if self.affinity == "client-ip" else 0

    def to_json(self) -> str:
        d = asdict(self)
        d["vips"] = [str(v) for v in self.vips]
        d["publish"] = [{**asdict(p), "address": None if p.address is None else str(p.address)}
                        for p in self.publish]
        d["selector"], d["labels"] = dict(self.selector), dict(self.labels)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> Service:
        d: dict[str, Any] = json.loads(text)
        d["ports"] = tuple(ServicePort(**p) for p in d["ports"])
        d["vips"] = tuple(ipaddress.ip_address(v) for v in d["vips"])
        d["publish"] = tuple(Publish(**{**p, "address": None if p["address"] is None
                                        else ipaddress.ip_address(p["address"])})
                             for p in d["publish"])
        d["health"] = None if d.get("health") is None else Health(**d["health"])
        return Service(**d)


# -- parsing the CLI's specs ----------------------------------------------------------------------


def port_number(field: str, spec: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidArgument(field, spec, f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def protocol(field: str, spec: str, text: str) -> Proto:
    lowered = text.lower()
    if lowered == "tcp":
        return "tcp"
    if lowered == "udp":
        return "udp"
    raise InvalidArgument(field, spec, f"protocol {text!r} is not tcp or udp")


def target(field: str, spec: str, text: str) -> int | str:
    """A container port number or the name of one (an IANA service name)."""
    if text.isdigit():
        return port_number(field, spec, text)
    try:
        return parse.port_name(field, text)
    except InvalidArgument:
        raise InvalidArgument(field, spec, f"target {text!r} is neither a port number nor a "
                              "port name (1-15 lowercase letters, digits, '-')") from None


def service_port(spec: str) -> ServicePort:
    """``[PNAME:]PORT[:TARGETPORT][/tcp|udp]``."""
    body, slash, proto = spec.partition("/")
    proto_ = protocol("port", spec, proto) if slash else "tcp"
    parts = body.split(":")
    if not body or len(parts) > 3 or "" in parts:
        raise InvalidArgument("port", spec, "expected [NAME:]PORT[:TARGETPORT][/tcp|udp]")
    name = ""
    if len(parts) == 3 or (len(parts) == 2 and not parts[0].isdigit()):
        name = parse.port_name("port", parts.pop(0))
    port = port_number("port", spec, parts[0])
    to = target("port", spec, parts[1]) if len(parts) == 2 else 0
    return ServicePort(port, proto_, 0 if to == port else to, name)


def service_ports(specs: Iterable[str]) -> tuple[ServicePort, ...]:
    ports = tuple(service_port(s) for s in specs)
    check_ports(ports, "port")
    return ports


def check_ports(ports: tuple[ServicePort, ...], field: str) -> None:
    if not ports:
        raise InvalidArgument(field, "", "a service needs at least one port")
    seen: set[tuple[int, str]] = set()
    names: set[str] = set()
    for p in ports:
        if (p.port, p.protocol) in seen:
            raise InvalidArgument(field, str(p), f"port {p.port}/{p.protocol} is given twice")
        if p.name and p.name in names:
            raise InvalidArgument(field, str(p), f"port name {p.name} is given twice")
        seen.add((p.port, p.protocol))
        names.add(p.name)
    if len(ports) > 1 and "" in names:
        # Kubernetes' rule, and what keeps the ports of a service apart in listings.
        unnamed = next(p for p in ports if not p.name)
        raise InvalidArgument(field, str(unnamed), "a service with several ports names each")


def selector(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InvalidArgument("selector", item, "expected KEY=VALUE")
        try:
            parse.label(key, value)
        except InvalidArgument as exc:
            raise InvalidArgument("selector", item, exc.message.split(": ", 1)[-1]) from None
        if key in out and out[key] != value:
            raise InvalidArgument("selector", item, f"{key} is given twice")
        out[key] = value
    return out


def publish(spec: str) -> Publish:
    """``[HOSTIP:]HOSTPORT:PORT[/tcp|udp]`` (an IPv6 HOSTIP in brackets)."""
    body, slash, proto = spec.partition("/")
    proto_ = protocol("publish", spec, proto) if slash else "tcp"
    address: IPAddress | None = None
    if body.startswith("["):
        host, close, body = body[1:].partition("]:")
        address = _address(spec, host) if close else _bad_publish(spec)
    elif body.count(":") == 2:
        host, _, body = body.partition(":")
        address = _address(spec, host)
    host_port, colon, port = body.partition(":")
    if not colon:
        _bad_publish(spec)
    if address is not None and address.is_unspecified:
        address = None
    return Publish(port_number("publish", spec, host_port), port_number("publish", spec, port),
                   proto_, address)


def _address(spec: str, text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument("publish", spec, f"host address {text!r} is not an IP") from None


def _bad_publish(spec: str) -> Any:
    raise InvalidArgument("publish", spec, "expected [HOSTIP:]HOSTPORT:PORT[/tcp|udp]")


def check_publish(publishes: tuple[Publish, ...], ports: tuple[ServicePort, ...]) -> None:
    served = {(p.port, p.protocol) for p in ports}
    seen: set[tuple[int, str]] = set()
    for p in publishes:
        if (p.port, p.protocol) not in served:
            raise InvalidArgument("publish", str(p), f"the service has no port "
                                  f"{p.port}/{p.protocol}")
        if (p.host_port, p.protocol) in seen:
            raise InvalidArgument("publish", str(p), f"host port {p.host_port}/{p.protocol} "
                                  "is given twice")
        seen.add((p.host_port, p.protocol))


def affinity(mode: str, timeout: int | None) -> tuple[Affinity, int]:
    if mode in ("", "none"):
        if timeout is not None:
            raise InvalidArgument("affinity-timeout", timeout, "needs --affinity client-ip")
        return "none", 0
    if mode != "client-ip":
        raise InvalidArgument("affinity", mode, "expected client-ip or none")
    seconds = DEFAULT_AFFINITY_TIMEOUT if timeout is None else timeout
    if not 1 <= seconds <= MAX_AFFINITY_TIMEOUT:
        raise InvalidArgument("affinity-timeout", seconds,
                              f"expected 1 to {MAX_AFFINITY_TIMEOUT} seconds")
    return "client-ip", seconds

"""Pure data types: what the datastore holds and the dataplane renders.

Every type round-trips through ``to_json``/``from_json`` (the datastore's value format) and is
immutable; services build new values with ``dataclasses.replace``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from plexus.model import keys

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# The name of a driver (``plexus.model.drivers``: bridge, host, none, ipam).
Driver = str
Protocol = Literal["tcp", "udp"]
# "pending" until the request that made the endpoint has seen it programmed: an agent killed in
# between finds it pending at start-up and rolls it back (its requester got an error).
EndpointState = Literal["pending", "ready"]
ContainerState = Literal["creating", "running", "exited"]
# Who asked for an endpoint: GC of one front door must never touch another's.
Owner = Literal["plexus", "cni", "cni-ipam", "docker"]
DEFAULT_NAMESPACE = "default"  # the namespace of an endpoint that names none


def _ip(value: str | None) -> IPAddress | None:
    return None if value is None else ipaddress.ip_address(value)


def _net(value: str | None) -> IPNetwork | None:
    return None if value is None else ipaddress.ip_network(value)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)


@dataclass(frozen=True, slots=True)
class Subnet:
    cidr: IPNetwork
    gateway: IPAddress | None = None
    ip_range: IPNetwork | None = None  # allocate only from here (inside cidr)

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def pool(self) -> IPNetwork:
        return self.ip_range or self.cidr

    def to_dict(self) -> dict[str, Any]:
        return {
            "cidr": str(self.cidr),
            "gateway": None if self.gateway is None else str(self.gateway),
            "ip_range": None if self.ip_range is None else str(self.ip_range),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Subnet:
        cidr = ipaddress.ip_network(d["cidr"])
        return Subnet(cidr, _ip(d.get("gateway")), _net(d.get("ip_range")))


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    id: str
    driver: Driver = "bridge"
    subnets: tuple[Subnet, ...] = ()
    ipv6: bool = False
    internal: bool = False
    mtu: int = 1500
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    vni: int = 0  # the VXLAN id of a network that spans hosts (0: none)
    block_size: int = 0  # its per-host blocks' IPv4 prefix length (ipam.hostblocks)

    @property
    def bridge(self) -> str:
        """Kernel name of the network's bridge (IFNAMSIZ is 16, so at most 15 characters)."""
        return f"pxbr-{self.id[:10]}"

    def subnets_of(self, version: int) -> list[Subnet]:
        return [s for s in self.subnets if s.version == version]

    def to_json(self) -> str:
        d = asdict(self)
        d["subnets"] = [s.to_dict() for s in self.subnets]
        return _dumps(d)

    @staticmethod
    def from_json(text: str) -> Network:
        d = json.loads(text)
        d["subnets"] = tuple(Subnet.from_dict(s) for s in d["subnets"])
        return Network(**d)


@dataclass(frozen=True, slots=True)
class PortMapping:
    """``[HOSTIP:]HPORT[-HPORT2]:CPORT[-CPORT2][/PROTO]``.

    A host range maps element-wise onto an equally long container range, or entirely onto one
    container port (as Docker does).
    """

    host_port: int
    container_port: int
    protocol: Protocol = "tcp"
    host_ip: IPAddress | None = None  # None: every address of the host
    host_port_end: int = 0  # 0: same as host_port
    container_port_end: int = 0

    @property
    def host_last(self) -> int:
        return self.host_port_end or self.host_port

    @property
    def container_last(self) -> int:
        return self.container_port_end or self.container_port

    @property
    def host_slot(self) -> str:
        """Where on the host it is published: an address, or "*" for every address."""
        return "*" if self.host_ip is None else str(self.host_ip)

    def pairs(self) -> list[tuple[int, int]]:
        """(host port, container port) for every port in the mapping."""
        hosts = range(self.host_port, self.host_last + 1)
        if self.container_last == self.container_port:
            return [(h, self.container_port) for h in hosts]
        return list(zip(hosts, range(self.container_port, self.container_last + 1), strict=True))

    def __str__(self) -> str:
        host = f"{self.host_port}" + (f"-{self.host_port_end}" if self.host_port_end else "")
        cont = f"{self.container_port}" + (
            f"-{self.container_port_end}" if self.container_port_end else ""
        )
        ip = ""
        if self.host_ip is not None:
            ip = f"[{self.host_ip}]:" if self.host_ip.version == 6 else f"{self.host_ip}:"
        return f"{ip}{host}:{cont}/{self.protocol}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["host_ip"] = None if self.host_ip is None else str(self.host_ip)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PortMapping:
        return PortMapping(**{**d, "host_ip": _ip(d.get("host_ip"))})


@dataclass(frozen=True, slots=True)
class ExposedPort:
    """A port the container serves (``--expose [NAME=]PORT[/PROTO]``), as a pod's
    ``containerPort``: what a policy's named port resolves to."""

    port: int
    protocol: str = "tcp"  # "tcp", "udp" or "sctp"
    name: str = ""

    def __str__(self) -> str:
        return (f"{self.name}=" if self.name else "") + f"{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One attachment of a container (a network namespace) to one network on one node."""

    container_id: str
    ifname: str
    network: str  # network name
    node: str
    netns: str  # path of the network namespace ("" for driver host)
    addresses: tuple[IPInterface, ...] = ()
    gateways: tuple[IPAddress, ...] = ()  # default routes (only on the container's first network)
    mac: str = ""  # chosen when the endpoint is made, so every re-creation gets the same
    ports: tuple[PortMapping, ...] = ()
    name: str = ""  # container name, for DNS and listings
    aliases: tuple[str, ...] = ()
    namespace: str = ""  # the policy namespace (Kubernetes-style), not the netns
    labels: dict[str, str] = field(default_factory=dict)
    state: EndpointState = "pending"
    created: float = 0.0
    owner: Owner = "plexus"
    bandwidth: dict[str, int] = field(default_factory=dict)  # stored now, enforced with QoS
    # The runtime moves the container end itself (Docker): the pair is made in the host's
    # namespace, its container end named ``peer_ifname``.
    peer_in_host: bool = False
    exposes: tuple[ExposedPort, ...] = ()
    # Addresses taken from a block another host holds (a spanning network whose pool had no
    # free block left: ipam.plans.claim_in_host_blocks): the one case where other hosts route
    # a single address to this endpoint's node rather than a block to the block's holder.
    borrowed: tuple[IPAddress, ...] = ()

    @property
    def key(self) -> str:
        """Unique on one node; ``store_key`` is unique across the cluster."""
        return f"{self.container_id}/{self.ifname}"

    @property
    def store_key(self) -> str:
        return keys.endpoint(self.node, self.container_id, self.ifname)

    @property
    def host_ifname(self) -> str:
        """Deterministic host-side veth name, so every ensure and delete finds the same link."""
        return "pxv" + _digest(self.key)

    @property
    def peer_ifname(self) -> str:
        """The container end while it is in the host's namespace (``peer_in_host``)."""
        return "pxc" + _digest(self.key)

    @property
    def has_links(self) -> bool:
        """False for address-only (IPAM) endpoints: another plugin made the interface."""
        return self.owner != "cni-ipam"

    def address_of(self, version: int) -> IPAddress | None:
        return next((a.ip for a in self.addresses if a.version == version), None)

    def to_json(self) -> str:
        d = asdict(self)
        d["addresses"] = [str(a) for a in self.addresses]
        d["gateways"] = [str(g) for g in self.gateways]
        d["ports"] = [p.to_dict() for p in self.ports]
        d["exposes"] = [asdict(x) for x in self.exposes]
        d["borrowed"] = [str(a) for a in self.borrowed]
        return _dumps(d)

    @staticmethod
    def from_json(text: str) -> Endpoint:
        d = json.loads(text)
        d["addresses"] = tuple(ipaddress.ip_interface(a) for a in d["addresses"])
        d["gateways"] = tuple(ipaddress.ip_address(g) for g in d["gateways"])
        d["ports"] = tuple(PortMapping.from_dict(p) for p in d["ports"])
        d["aliases"] = tuple(d["aliases"])
        d["exposes"] = tuple(ExposedPort(**x) for x in d.get("exposes", ()))
        d["borrowed"] = tuple(ipaddress.ip_address(a) for a in d.get("borrowed", ()))
        d.pop("host_ifname", None)  # derived since layout 2
        return Endpoint(**d)

    @property
    def policy_namespace(self) -> str:
        """The namespace policies see it in: its own, else ``default``."""
        return self.namespace or DEFAULT_NAMESPACE


@dataclass(frozen=True, slots=True)
class Container:
    """A lightweight container started by ``plexus run``: a named netns and a process in it."""

    id: str
    name: str
    node: str
    netns_name: str
    networks: tuple[str, ...]
    command: tuple[str, ...]
    ports: tuple[PortMapping, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = ""
    aliases: tuple[str, ...] = ()
    static_ips: tuple[IPAddress, ...] = ()
    pid: int = 0
    pid_start: int = 0  # /proc/PID/stat start time, so a reused pid is not mistaken for ours
    state: ContainerState = "creating"
    exit_code: int | None = None
    created: float = 0.0

    @property
    def netns(self) -> str:
        return f"/run/netns/{self.netns_name}" if self.netns_name else ""

    def to_json(self) -> str:
        d = asdict(self)
        d["ports"] = [p.to_dict() for p in self.ports]
        d["static_ips"] = [str(a) for a in self.static_ips]
        return _dumps(d)

    @staticmethod
    def from_json(text: str) -> Container:
        d = json.loads(text)
        d["ports"] = tuple(PortMapping.from_dict(p) for p in d["ports"])
        d["static_ips"] = tuple(ipaddress.ip_address(a) for a in d["static_ips"])
        for k in ("networks", "command", "aliases"):
            d[k] = tuple(d[k])
        return Container(**d)


@dataclass(frozen=True, slots=True)
class Host:
    """A host of the datastore: what its agent says of itself at start-up (``keys.host``).
    Whether it is alive is another key, held by the agent's lease (``keys.host_lease``)."""

    name: str
    address: str  # the underlay address other hosts reach it at ("" if it has none)
    agent_id: str  # the state directory's id: a restart is the same agent, a copy is not
    version: str = ""
    started: float = 0.0  # wall-clock time of the last start
    seen: float = 0.0  # wall-clock time its agent last said it was alive

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Host:
        d = json.loads(text)
        return Host(**{k: d[k] for k in Host.__dataclass_fields__ if k in d})


@dataclass(frozen=True, slots=True)
class Namespace:
    """A policy namespace (Kubernetes-style): a name and labels that namespace selectors match.
    ``labels`` never holds ``kubernetes.io/metadata.name``: it is added when read (``all``)."""

    name: str
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0

    @property
    def all_labels(self) -> dict[str, str]:
        return {**self.labels, NAMESPACE_NAME_LABEL: self.name}

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Namespace:
        d = json.loads(text)
        return Namespace(str(d["name"]), dict(d.get("labels", {})), float(d.get("created", 0)))


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

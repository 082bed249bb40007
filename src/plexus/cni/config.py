"""The CNI network configuration plexus accepts, and the request the shim forwards.

A plugin object in a conflist, for example::

    {"cniVersion": "1.0.0", "name": "web", "type": "plexus",
     "subnets": ["10.10.0.0/24"], "gateway": "10.10.0.1", "ipv6": false, "internal": false,
     "mtu": 1500, "ipMasq": true,
     "ipam": {"type": "plexus", "ranges": [[{"subnet": "10.10.0.0/24"}]]},
     "capabilities": {"portMappings": true, "ips": true, "mac": true, "aliases": true,
                      "bandwidth": true, "dns": true},
     "network": "web", "socket": "/run/plexus/plexus.sock"}

``network`` names the plexus network (default: ``name``). The network options (subnets,
gateway, ipv6, internal, mtu, ipMasq, ipam.ranges) are optional: without them the config
attaches to an existing plexus network; with them the network is created on the first ADD and
must agree with them afterwards.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from plexus.cni import spec
from plexus.errors import InvalidArgument, PlexusError
from plexus.model import parse
from plexus.model.types import ExposedPort, IPAddress, PortMapping
from plexus.services.networks import NetworkSpec

NETWORK_OPTIONS = ("subnet", "subnets", "gateway", "ipv6", "internal", "mtu", "ipMasq")
KNOWN_FIELDS = frozenset(
    {
        "cniVersion",
        "cniVersions",
        "name",
        "type",
        "socket",
        "network",
        "ipam",
        "dns",
        "capabilities",
        "runtimeConfig",
        "args",
        "prevResult",
        "disableCheck",
        "disableGC",
        "loadOnlyInlinedPlugins",
        "plugins",
        "bridge",
        "isGateway",
        "isDefaultGateway",
        *NETWORK_OPTIONS,
    }
)


class CniError(PlexusError):
    """An error with an explicit CNI code (the spec's table)."""

    def __init__(self, code: int, message: str, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def version_tuple(v: str) -> tuple[int, ...]:
    try:
        return spec.version_tuple(v)
    except ValueError:
        raise CniError(spec.INCOMPATIBLE_VERSION, f"invalid cniVersion {v!r}") from None


@dataclass(frozen=True)
class CniRequest:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: str
    config: dict[str, Any]
    mode: str = "main"  # "main" (type plexus) or "ipam" (type plexus-ipam)

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", "0.1.0"))

    @property
    def network(self) -> str:
        ipam = self.config.get("ipam") or {}
        if self.mode == "ipam" and isinstance(ipam, dict) and ipam.get("network"):
            return str(ipam["network"])
        return str(self.config.get("network") or self.config.get("name") or "")

    @property
    def runtime(self) -> dict[str, Any]:
        rc = self.config.get("runtimeConfig") or {}
        return rc if isinstance(rc, dict) else {}


def check_fields(config: dict[str, Any]) -> None:
    """Unknown plugin fields are refused with code 2, naming key and value (the spec allows a
    plugin to refuse them, and a typo such as "subent" would otherwise be silently ignored)."""
    for key, value in config.items():
        if key not in KNOWN_FIELDS and not key.startswith("cni.dev/"):
            raise CniError(2, f"unsupported field {key!r} with value {value!r} in network config")


def _ranges(ipam: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Subnets and gateways of host-local style ``ranges``: [[{"subnet", "gateway"}]]
    (rangeStart/rangeEnd are not supported; the whole subnet is allocated from)."""
    subnets: list[str] = []
    gateways: list[str] = []
    for rangeset in ipam.get("ranges") or []:
        for r in rangeset if isinstance(rangeset, list) else [rangeset]:
            if not isinstance(r, dict) or "subnet" not in r:
                raise CniError(7, f"invalid ipam range {r!r}: needs a subnet")
            subnets.append(str(r["subnet"]))
            if r.get("gateway"):
                gateways.append(str(r["gateway"]))
    return subnets, gateways


def network_spec(req: CniRequest) -> NetworkSpec | None:
    """The network this config describes, or None if it only names an existing one. In IPAM
    mode the top level belongs to the main plugin (its ipMasq, mtu...): only the ipam block
    describes plexus's network."""
    ipam = req.config.get("ipam") if isinstance(req.config.get("ipam"), dict) else {}
    assert isinstance(ipam, dict)
    c = ipam if req.mode == "ipam" else req.config
    rsubnets, rgateways = _ranges(ipam)
    if not any(k in c for k in NETWORK_OPTIONS) and not rsubnets:
        return None
    subnets = [str(s) for s in _list(c, "subnets")] + ([str(c["subnet"])] if "subnet" in c else [])
    gateways = ([str(c["gateway"])] if "gateway" in c else []) + rgateways
    options = {} if c.get("ipMasq", True) else {"masquerade": "false"}
    return NetworkSpec(
        name=req.network,
        driver="ipam" if req.mode == "ipam" else "bridge",
        subnets=subnets + rsubnets,
        gateways=gateways,
        ipv6=bool(c.get("ipv6", False)),
        internal=bool(c.get("internal", False)),
        mtu=int(c.get("mtu", 1500)),
        options=options,
        labels={"plexus.cni/config": req.network},
    )


def _list(c: dict[str, Any], key: str) -> list[Any]:
    value = c.get(key, [])
    if not isinstance(value, list):
        raise CniError(7, f"invalid {key} {value!r}: expected a list")
    return value


def parse_cni_args(args: str) -> dict[str, str]:
    """CNI_ARGS ``K=V;K2=V2``. Unknown keys are an error unless IgnoreUnknown is set (as the
    reference plugins do)."""
    known = {
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
        "IP",
        "MAC",
    }
    pairs: dict[str, str] = {}
    for item in filter(None, args.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise CniError(4, f"invalid CNI_ARGS element {item!r}: expected K=V")
        pairs[key] = value
    ignore = pairs.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = [k for k in pairs if k not in known]
    if unknown and not ignore:
        raise CniError(2, f"unknown CNI_ARGS key {unknown[0]!r} (set IgnoreUnknown=1 to allow)")
    return pairs


@dataclass(frozen=True)
class Attachment:
    """What one ADD asks for, gathered from runtimeConfig, args and CNI_ARGS."""

    ips: list[IPAddress] = field(default_factory=list)
    ports: list[PortMapping] = field(default_factory=list)
    mac: str = ""
    aliases: list[str] = field(default_factory=list)
    name: str = ""
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    bandwidth: dict[str, int] = field(default_factory=dict)
    exposes: tuple[ExposedPort, ...] = ()


def attachment(req: CniRequest) -> Attachment:
    rc = req.runtime
    cni_args = parse_cni_args(req.args)
    conv = (
        ((req.config.get("args") or {}).get("cni") or {})
        if isinstance(req.config.get("args"), dict)
        else {}
    )
    ips = [_ip(v) for v in [*rc.get("ips", []), *conv.get("ips", [])]]
    if cni_args.get("IP"):
        ips += [_ip(v) for v in cni_args["IP"].split(",")]
    labels = {
        str(x["key"]): str(x["value"])
        for x in conv.get("labels", [])
        if isinstance(x, dict) and "key" in x
    }
    mac = str(rc.get("mac") or cni_args.get("MAC") or "")
    return Attachment(
        ips=ips,
        ports=[_port(p) for p in rc.get("portMappings", [])],
        mac=mac,
        aliases=_aliases(rc.get("aliases"), req.network),
        name=cni_args.get("K8S_POD_NAME", ""),
        namespace=cni_args.get("K8S_POD_NAMESPACE", ""),
        labels=labels,
        bandwidth=_bandwidth(rc.get("bandwidth")),
        exposes=_exposes(conv.get("ports")),
    )


def _exposes(raw: object) -> tuple[ExposedPort, ...]:
    """``args.cni.ports``: a pod's containerPorts (``name``, ``containerPort``, ``protocol``),
    which CNI's portMappings do not carry, so that policies' named ports resolve."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CniError(7, f"invalid args.cni.ports {raw!r}: a list of containerPorts")
    specs = []
    for p in raw:
        if not isinstance(p, dict) or "containerPort" not in p:
            raise CniError(7, f"invalid args.cni.ports entry {p!r}: needs containerPort")
        name = f"{p['name']}=" if p.get("name") else ""
        specs.append(f"{name}{p['containerPort']}/{str(p.get('protocol') or 'TCP').lower()}")
    try:
        return parse.exposes(specs)
    except InvalidArgument as exc:
        raise CniError(7, f"invalid args.cni.ports: {exc.message}") from None


def _ip(value: object) -> IPAddress:
    text = str(value).split("/")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CniError(7, f"invalid ips {value!r}: not an IP address") from None


def _port(p: object) -> PortMapping:
    if not isinstance(p, dict):
        raise CniError(7, f"invalid portMappings entry {p!r}")
    host_ip = p.get("hostIP") or ""
    spec = f"{host_ip}:" if host_ip and ":" not in host_ip else (f"[{host_ip}]:" if host_ip else "")
    spec += f"{p.get('hostPort')}:{p.get('containerPort')}/{p.get('protocol', 'tcp') or 'tcp'}"
    try:
        return parse.port_mapping(spec)
    except InvalidArgument as exc:
        raise CniError(7, f"invalid portMappings entry {p!r}: {exc.message}") from None


def _aliases(value: object, network: str) -> list[str]:
    """Podman passes ``{"network": ["alias", ...]}``; others a plain list. A runtime's names
    that are no DNS names (a container named ``my_web``) cannot be looked up: they are left out
    rather than failing the container's start."""
    if isinstance(value, dict):
        value = value.get(network, [])
    names = [str(a) for a in value] if isinstance(value, list) else []
    return [a for a in names if len(a) <= 253 and parse.DNS_NAME_RE.match(a)]


def _bandwidth(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    keys = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")
    return {k: int(value[k]) for k in keys if k in value}

"""Docker's remote network driver (libnetwork docs/remote.md), translated to plexus's services.

Docker's lifecycle maps onto the calls every front door uses: CreateNetwork creates (or joins) a
plexus network, CreateEndpoint attaches with the addresses Docker's IPAM chose and a veth whose
container end stays in the host (``peer_in_host``), Join tells Docker that end's name (Docker
moves it into the sandbox and names it ethN) and learns the container's policy namespace and
labels from dockerd (``names.labels``), ProgramExternalConnectivity publishes ports. Every
call is idempotent, so a dockerd or agent restart, a replayed call or a restarted container
never meets "endpoint already exists". This module keeps no state of its own: the mapping of
Docker networks to plexus networks is a datastore key (``keys.docker_network``), read through
the cache.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from plexus.api.docker import names
from plexus.errors import Conflict, InUse, InvalidArgument, NotFound, NotReady
from plexus.model import keys, parse
from plexus.model.types import Endpoint, IPInterface, Network, PortMapping
from plexus.services.endpoints import AttachSpec, EndpointService
from plexus.services.networks import NetworkService, NetworkSpec
from plexus.services.pools import SUBNET_CLAIM, PoolService
from plexus.state.cache import DockerNetwork
from plexus.store.base import Compare, Delete, Put

log = logging.getLogger("plexus.docker")

GENERIC = "com.docker.network.generic"
PORTMAP = "com.docker.network.portmap"
IFNAME = "eth"  # Docker names the interface itself (DstPrefix + index)
PROTOCOLS = {6: "tcp", 17: "udp"}
NAMESPACE_LABEL = "plexus.namespace"  # a container label: its policy namespace


def _truthy(value: object) -> bool:
    return value is True or str(value).lower() in ("1", "true")


def ports_from_portmap(items: object) -> list[PortMapping]:
    """Docker's ``com.docker.network.portmap``: [{Proto, IP, Port, HostIP, HostPort,
    HostPortEnd}], Proto 6 = tcp, 17 = udp."""
    out: list[PortMapping] = []
    for b in items if isinstance(items, list) else []:
        proto = PROTOCOLS.get(int(b.get("Proto", 6)))
        if proto is None:
            raise InvalidArgument("portmap", b, "only tcp and udp can be published")
        host_ip = str(b.get("HostIP") or "")
        host = f"[{host_ip}]:" if ":" in host_ip else (f"{host_ip}:" if host_ip else "")
        start, end = int(b["HostPort"]), int(b.get("HostPortEnd") or b["HostPort"])
        span = f"{start}-{end}" if end > start else f"{start}"
        out.append(parse.port_mapping(f"{host}{span}:{int(b['Port'])}/{proto}"))
    return out


class DockerNetworkDriver:
    def __init__(self, networks: NetworkService, endpoints: EndpointService, pools: PoolService,
                 docker_api: Path | None, host_exceptions: Callable[[], Awaitable[None]]) -> None:
        self.networks = networks
        self.endpoints = endpoints
        self.pools = pools
        self.ctx = networks.ctx
        self.docker_api = docker_api
        self._host_exceptions = host_exceptions  # dockerd's FORWARD DROP needs our ACCEPTs
        self._learning: set[asyncio.Task[None]] = set()

    def _mapping(self, network_id: str) -> DockerNetwork:
        found = self.ctx.cache.docker_networks.get(network_id)
        if found is None:
            raise NotFound(f"docker network {network_id[:12]} is not known to plexus")
        return found

    # -- networks ------------------------------------------------------------------------------

    async def create_network(self, body: dict[str, Any]) -> dict[str, Any]:
        network_id = str(body.get("NetworkID", ""))
        parse.name("NetworkID", network_id, max_len=128)
        await self._host_exceptions()
        if network_id in self.ctx.cache.docker_networks:
            return {}  # replayed: already done
        options = body.get("Options") or {}
        generic = options.get(GENERIC) or {}
        name = str(generic.get("plexus.name") or f"docker-{network_id[:12]}")
        spec = _spec(name, network_id, options, generic, body)
        existing = self.ctx.cache.network(name)
        if existing is not None:
            _agree(existing, spec)
        else:
            await self.networks.create(spec)
        key = keys.docker_network(network_id)
        mapping = json.dumps({"name": name, "created": existing is None})
        result = await self.ctx.commit([Compare.absent(key)], [Put(key, mapping)])
        await self.ctx.seen(result.revision)
        log.info("docker network %s served by plexus network %s", network_id[:12], name)
        return {}

    async def delete_network(self, body: dict[str, Any]) -> dict[str, Any]:
        network_id = str(body.get("NetworkID", ""))
        mapping = self.ctx.cache.docker_networks.get(network_id)
        if mapping is None:
            return {}
        others = [i for i in self.ctx.cache.served_by(mapping.name) if i != network_id]
        net = self.ctx.cache.network(mapping.name)
        if mapping.created and not others and net is not None:
            try:
                await self.networks.remove(mapping.name)
            except InUse as exc:  # CNI or plexus containers still use it: keep it for them
                log.info("docker network %s removed; plexus network kept: %s",
                         network_id[:12], exc.message)
            else:
                await self._return_to_pools(net)
        result = await self.ctx.commit([], [Delete(keys.docker_network(network_id))])
        await self.ctx.seen(result.revision)
        return {}

    async def _return_to_pools(self, net: Network) -> None:
        """Subnets whose pool Docker still holds go back to it (Docker releases the pool after
        the network)."""
        for s in net.subnets:
            if await self.pools.pools_of(str(s.cidr)):
                await self.pools.return_subnet(str(s.cidr))

    # -- endpoints -----------------------------------------------------------------------------

    def _key(self, endpoint_id: str) -> str:
        return keys.endpoint(self.ctx.node, endpoint_id, IFNAME)

    def _endpoint(self, endpoint_id: str) -> Endpoint | None:
        return self.ctx.cache.endpoint(self._key(endpoint_id))

    def _require(self, endpoint_id: str) -> Endpoint:
        ep = self._endpoint(endpoint_id)
        if ep is None:
            raise NotFound(f"endpoint {endpoint_id[:12]} not found")
        return ep

    async def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        name = self._mapping(str(body.get("NetworkID", ""))).name
        endpoint_id = str(body.get("EndpointID", ""))
        iface = body.get("Interface") or {}
        if self._endpoint(endpoint_id) is not None:  # a restarted container, or a replay
            await self.endpoints.detach(endpoint_id, ifname=IFNAME, missing_ok=True)
        addresses: list[IPInterface] = [
            ipaddress.ip_interface(iface[k]) for k in ("Address", "AddressIPv6") if iface.get(k)
        ]
        options = body.get("Options") or {}
        mac = str(
            iface.get("MacAddress") or options.get("com.docker.network.endpoint.macaddress") or ""
        )
        await self.endpoints.attach(
            AttachSpec(
                container_id=endpoint_id, network=name, netns="", ifname=IFNAME, mac=mac,
                addresses=addresses, pool_claims=keys.POOL_CLAIM_PREFIX, owner="docker",
                peer_in_host=True, default_route=True,
                # Docker repeats the container's port bindings in every CreateEndpoint but calls
                # ProgramExternalConnectivity only for the endpoint that gives the gateway:
                # publish there, or a second network would publish the same ports twice.
                one_per_network=False,
                name=str(options.get("plexus.container_name", "")),
            )
        )
        # Docker supplied the interface; answering with other values would be an error.
        return {"Interface": {}}

    async def endpoint_info(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._require(str(body.get("EndpointID", "")))
        return {
            "Value": {
                "plexus.network": ep.network,
                "plexus.host_ifname": ep.host_ifname,
                "plexus.addresses": ",".join(map(str, ep.addresses)),
            }
        }

    async def delete_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        # As for a CNI DEL: answer once released; the kernel finishes the veth in the background
        # (a CreateEndpoint of the same endpoint waits for it).
        await self.endpoints.detach(str(body.get("EndpointID", "")), ifname=IFNAME,
                                    missing_ok=True)
        return {}

    async def join(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._require(str(body.get("EndpointID", "")))
        net = self.ctx.cache.network(ep.network)
        if net is None:
            raise NotFound(f"network {ep.network} is gone")
        # Docker moves the container end now: make sure it is there (it is recreated if an
        # earlier life of the container took it), then record the sandbox.
        await self.ctx.refresh(ep.store_key)
        policy = await self._policy_identity(str(body.get("NetworkID", "")), ep.container_id)
        ep = await self.endpoints.update(ep.store_key, netns=str(body.get("SandboxKey") or ""),
                                         **policy)
        self._learn_names(ep.store_key, str(body.get("NetworkID", "")), ep.container_id)
        gw4 = next((str(g) for g in ep.gateways if g.version == 4), "")
        gw6 = next((str(g) for g in ep.gateways if g.version == 6), "")
        return {
            "InterfaceName": {"SrcName": ep.peer_ifname, "DstPrefix": IFNAME},
            "Gateway": gw4,
            "GatewayIPv6": gw6,
            # An internal network has no gateway on purpose; Docker must not add its
            # docker_gwbridge to make up for it.
            "DisableGatewayService": net.internal,
        }

    async def _policy_identity(self, network_id: str, endpoint_id: str) -> dict[str, Any]:
        """The container's name, policy namespace and labels, from dockerd (the plugin API
        does not carry them), before the container runs: policy applies from its first packet.
        Without dockerd's API (``--docker-api``) a container is in ``default``, unlabelled."""
        socket = self.docker_api
        if socket is None:
            return {}
        try:
            name, labels = await names.labels(socket, network_id, endpoint_id)
        except LookupError as exc:
            # Fail closed: a container whose labels are unknown could slip past a policy.
            raise NotReady(f"{exc}: its labels decide its network policy") from None
        namespace, selectable = policy_labels(labels)
        return {"name": name, "namespace": namespace, "labels": selectable}

    def _learn_names(self, key: str, network_id: str, endpoint_id: str) -> None:
        socket = self.docker_api
        if socket is None or not socket.exists():
            return
        task = asyncio.create_task(self._learn(key, socket, network_id, endpoint_id))
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    async def _learn(self, key: str, socket: Path, network_id: str, endpoint_id: str) -> None:
        name, aliases = await names.lookup(socket, network_id, endpoint_id)
        if not name or self.ctx.cache.endpoint(key) is None:
            return
        try:
            await self.endpoints.update(key, name=name, aliases=tuple(aliases))
        except (Conflict, NotFound):
            return  # changed meanwhile (left, deleted): nothing to name any more
        log.info("docker endpoint %s is container %s (aliases %s)",
                 endpoint_id[:12], name, ", ".join(aliases) or "none")

    async def leave(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._endpoint(str(body.get("EndpointID", "")))
        if ep is not None:
            await self.endpoints.update(ep.store_key, netns="")
        return {}

    async def program_external(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._require(str(body.get("EndpointID", "")))
        ports = ports_from_portmap((body.get("Options") or {}).get(PORTMAP))
        if list(ports) != list(ep.ports):
            await self.endpoints.set_ports(ep.store_key, ports)
        return {}

    async def revoke_external(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._endpoint(str(body.get("EndpointID", "")))
        if ep is not None and ep.ports:
            await self.endpoints.set_ports(ep.store_key, [])
        return {}


def policy_labels(labels: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A Docker container's policy namespace (its label ``plexus.namespace``, else default) and
    the labels policies can select. Docker labels that are no Kubernetes labels (Compose's
    64-character ``com.docker.compose.config-hash``, values with spaces) cannot be selected:
    they are left out rather than failing the container's start."""
    namespace = parse.namespace(labels.get(NAMESPACE_LABEL, ""))
    selectable: dict[str, str] = {}
    for key, value in labels.items():
        if key == NAMESPACE_LABEL:
            continue
        try:
            parse.label(key, value)
        except InvalidArgument as exc:
            log.debug("docker label not selectable by policy: %s", exc.message)
            continue
        selectable[key] = value
    return namespace, selectable


def _spec(name: str, network_id: str, options: dict[str, Any], generic: dict[str, Any],
          body: dict[str, Any]) -> NetworkSpec:
    data = [*(body.get("IPv4Data") or []), *(body.get("IPv6Data") or [])]
    subnets = [str(d["Pool"]) for d in data if d.get("Pool")]
    gateways = [str(d["Gateway"]).split("/")[0] for d in data if d.get("Gateway")]
    mtu = generic.get("plexus.mtu") or generic.get("com.docker.network.driver.mtu") or 1500
    extra = {k: str(v) for k, v in generic.items() if not k.startswith("plexus.name")}
    return NetworkSpec(
        name=name,
        driver="bridge",
        subnets=subnets,
        gateways=gateways,
        ipv6=_truthy(options.get("com.docker.network.enable_ipv6")),
        internal=_truthy(options.get("com.docker.network.internal"))
        or _truthy(generic.get("plexus.internal")),
        mtu=int(mtu),
        labels={"docker.network.id": network_id},
        options=extra,
        adopt_claim=SUBNET_CLAIM,
    )


def _agree(net: Network, spec: NetworkSpec) -> None:
    have = {str(s.cidr) for s in net.subnets}
    wanted = {str(ipaddress.ip_network(s)) for s in spec.subnets}
    if wanted and wanted != have:
        raise Conflict(
            f"plexus network {net.name!r} has subnets {sorted(have)}, not {sorted(wanted)}"
        )
    if spec.internal != net.internal:
        raise Conflict(f"plexus network {net.name!r} has internal={net.internal}")

"""Docker's remote network driver on plexus's services (libnetwork docs/remote.md).

Docker's lifecycle maps onto the same calls every front door uses: CreateNetwork creates (or
joins) a plexus network, CreateEndpoint attaches with the addresses Docker's IPAM chose and makes
a veth whose container end stays in the host, Join tells Docker that end's name (Docker moves it
into the sandbox and names it ethN), ProgramExternalConnectivity publishes ports through plexus's
DNAT maps. Every call is idempotent, so a dockerd or agent restart, a replayed call or a
restarted container never meets "endpoint already exists".
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from plexus.agent.core import Core, log
from plexus.agent.endpoints import AttachSpec, EndpointService
from plexus.agent.networks import NetworkService, NetworkSpec
from plexus.api.docker import names
from plexus.api.docker.ipam import OWNER_PREFIX, POOL_CLAIM, POOLS
from plexus.dataplane import docker_user
from plexus.dataplane.driver import peer_ifname
from plexus.errors import Conflict, InUse, InvalidArgument, NotFound
from plexus.model import keys, parse
from plexus.model.types import Endpoint, IPInterface, Network, PortMapping
from plexus.store.base import Compare, Datastore, Put

NETWORKS = "/plexus/docker/networks/"
GENERIC = "com.docker.network.generic"
PORTMAP = "com.docker.network.portmap"
IFNAME = "eth"  # Docker names the interface itself (DstPrefix + index)
PROTOCOLS = {6: "tcp", 17: "udp"}


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


async def served(store: Datastore) -> dict[str, list[str]]:
    """plexus network name → the Docker network IDs it serves."""
    kvs, _ = await store.list(NETWORKS)
    out: dict[str, list[str]] = {}
    for kv in kvs:
        out.setdefault(json.loads(kv.value)["name"], []).append(kv.key[len(NETWORKS) :])
    return out


class DockerNetworkDriver:
    def __init__(self, core: Core, networks: NetworkService, endpoints: EndpointService) -> None:
        self.core = core
        self.networks = networks
        self.endpoints = endpoints
        self._learning: set[asyncio.Task[None]] = set()

    async def _mapping(self, network_id: str) -> dict[str, Any]:
        kv = await self.core.store.get(NETWORKS + network_id)
        if kv is None:
            raise NotFound(f"docker network {network_id[:12]} is not known to plexus")
        return dict(json.loads(kv.value))

    async def network_name(self, network_id: str) -> str:
        return str((await self._mapping(network_id))["name"])

    async def served(self) -> dict[str, list[str]]:
        return await served(self.core.store)

    async def create_network(self, body: dict[str, Any]) -> dict[str, Any]:
        network_id = str(body.get("NetworkID", ""))
        parse.name("NetworkID", network_id, max_len=128)
        await docker_user.ensure_accept_rules()  # dockerd runs: its FORWARD policy is DROP
        if await self.core.store.get(NETWORKS + network_id) is not None:
            return {}  # replayed: already done
        options = body.get("Options") or {}
        generic = options.get(GENERIC) or {}
        name = str(generic.get("plexus.name") or f"docker-{network_id[:12]}")
        spec = self._spec(name, network_id, options, generic, body)
        existing = self.core.networks.get(name)
        if existing is not None:
            _agree(existing, spec)
            created = False
        else:
            await self.networks.create(spec)
            created = True
        mapping = json.dumps({"name": name, "created": created})
        await self.core.store.txn(
            [Compare.absent(NETWORKS + network_id)], [Put(NETWORKS + network_id, mapping)]
        )
        log.info("docker network %s served by plexus network %s", network_id[:12], name)
        return {}

    def _spec(
        self,
        name: str,
        network_id: str,
        options: dict[str, Any],
        generic: dict[str, Any],
        body: dict[str, Any],
    ) -> NetworkSpec:
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
            adopt_claim=POOL_CLAIM,
        )

    async def delete_network(self, body: dict[str, Any]) -> dict[str, Any]:
        network_id = str(body.get("NetworkID", ""))
        try:
            mapping = await self._mapping(network_id)
        except NotFound:
            return {}
        name = str(mapping["name"])
        others = [m for m in (await self.served()).get(name, []) if m != network_id]
        net = self.core.networks.get(name)
        if mapping["created"] and not others and net is not None:
            try:
                await self.networks.remove(name)
            except InUse as exc:  # CNI or plexus containers still use it: keep it for them
                log.info(
                    "docker network %s removed; plexus network kept: %s",
                    network_id[:12],
                    exc.message,
                )
            else:
                await self._return_to_pools(net)
        await self.core.store.delete(NETWORKS + network_id)
        return {}

    async def _return_to_pools(self, net: Network) -> None:
        """Subnets whose Docker pool is still held go back to that pool (Docker releases the
        pool after the network)."""
        for s in net.subnets:
            if await self.core.store.get(POOLS + str(s.cidr).replace("/", "_")) is not None:
                key = keys.subnet(s.cidr)
                await self.core.store.txn([Compare.absent(key)], [Put(key, POOL_CLAIM)])

    async def create_endpoint(self, body: dict[str, Any]) -> dict[str, Any]:
        name = await self.network_name(str(body.get("NetworkID", "")))
        endpoint_id = str(body.get("EndpointID", ""))
        iface = body.get("Interface") or {}
        stale = self._endpoint(endpoint_id)
        if stale is not None:  # a restarted container, or a replay after a crash
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
                container_id=endpoint_id,
                network=name,
                netns="",
                ifname=IFNAME,
                mac=mac,
                addresses=addresses,
                assigned_by=OWNER_PREFIX,
                owner="docker",
                peer_in_host=True,
                default_route=True,
                # Docker repeats the container's port bindings in every CreateEndpoint but calls
                # ProgramExternalConnectivity only for the endpoint that gives the gateway:
                # publish there, or a second network would publish the same ports twice.
                one_per_network=False,
                name=str(options.get("plexus.container_name", "")),
            )
        )
        # Docker supplied the interface; answering with other values would be an error.
        return {"Interface": {}}

    def _endpoint(self, endpoint_id: str) -> Endpoint | None:
        return self.core.endpoints.get(f"{endpoint_id}/{IFNAME}")

    def _require(self, endpoint_id: str) -> Endpoint:
        ep = self._endpoint(endpoint_id)
        if ep is None:
            raise NotFound(f"endpoint {endpoint_id[:12]} not found")
        return ep

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
        await self.endpoints.detach(
            str(body.get("EndpointID", "")), ifname=IFNAME, missing_ok=True, wait_kernel=False
        )
        return {}

    async def join(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._require(str(body.get("EndpointID", "")))
        net = self.core.networks.get(ep.network)
        if net is None:
            raise NotFound(f"network {ep.network} is gone")
        sandbox = str(body.get("SandboxKey") or "")
        if not await self.core.dataplane.has_link(peer_ifname(ep)):
            # Docker moves this end at Join; if it is gone, make the pair again rather than
            # answer with a name Docker cannot find.
            log.warning("veth end of %s was missing at Join; recreating it", ep.key)
            ep = await self.core.dataplane.ensure_detached_veth(net, ep)
        await self._update(ep, netns=sandbox)
        # The DOCKER-USER rules are ensured at CreateNetwork and by the periodic reconcile, not
        # here: checking costs up to six iptables runs, on every container start.
        self._learn_names(ep.key, str(body.get("NetworkID", "")), ep.container_id)
        gw4 = next((str(g) for g in ep.gateways if g.version == 4), "")
        gw6 = next((str(g) for g in ep.gateways if g.version == 6), "")
        return {
            "InterfaceName": {"SrcName": peer_ifname(ep), "DstPrefix": IFNAME},
            "Gateway": gw4,
            "GatewayIPv6": gw6,
            # An internal network has no gateway on purpose; Docker must not add its
            # docker_gwbridge to make up for it.
            "DisableGatewayService": net.internal,
        }

    def _learn_names(self, key: str, network_id: str, endpoint_id: str) -> None:
        socket = self.core.config.docker_api
        if socket is None or not socket.exists():
            return
        task = asyncio.create_task(self._learn(key, socket, network_id, endpoint_id))
        self._learning.add(task)
        task.add_done_callback(self._learning.discard)

    async def _learn(self, key: str, socket: Path, network_id: str, endpoint_id: str) -> None:
        name, aliases = await names.lookup(socket, network_id, endpoint_id)
        ep = self.core.endpoints.get(key)
        if not name or ep is None:
            return
        try:
            await self._update(ep, name=name, aliases=tuple(aliases))
        except Conflict:
            return  # changed meanwhile (left, deleted): nothing to name any more
        self.core.publish_dns_soon()
        log.info(
            "docker endpoint %s is container %s (aliases %s)",
            endpoint_id[:12],
            name,
            ", ".join(aliases) or "none",
        )

    async def _update(self, ep: Endpoint, **changes: Any) -> None:
        new = replace(ep, **changes)
        key = keys.endpoint(ep.node, ep.container_id, ep.ifname)
        res = await self.core.store.txn(
            [Compare(key, "value", "==", ep.to_json())], [Put(key, new.to_json())]
        )
        if not res.succeeded:
            raise Conflict(f"endpoint {ep.key} changed meanwhile")
        self.core.endpoints[ep.key] = new

    async def leave(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._endpoint(str(body.get("EndpointID", "")))
        if ep is not None:
            await self._update(ep, netns="")
        return {}

    async def program_external(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._require(str(body.get("EndpointID", "")))
        ports = ports_from_portmap((body.get("Options") or {}).get(PORTMAP))
        if list(ports) != list(ep.ports):
            await self.endpoints.set_ports(ep.key, ports)
        return {}

    async def revoke_external(self, body: dict[str, Any]) -> dict[str, Any]:
        ep = self._endpoint(str(body.get("EndpointID", "")))
        if ep is not None and ep.ports:
            await self.endpoints.set_ports(ep.key, [])
        return {}


def _agree(net: Network, spec: NetworkSpec) -> None:
    have = {str(s.cidr) for s in net.subnets}
    wanted = {str(ipaddress.ip_network(s)) for s in spec.subnets}
    if wanted and wanted != have:
        raise Conflict(
            f"plexus network {net.name!r} has subnets {sorted(have)}, not {sorted(wanted)}"
        )
    if spec.internal != net.internal:
        raise Conflict(f"plexus network {net.name!r} has internal={net.internal}")

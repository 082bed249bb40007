"""Attaching a network namespace to a network, and detaching it.

Attach is three steps, each undone if a later one fails:
1. one transaction writes the endpoint (state "pending"), its addresses and its port claims;
2. the dataplane programs links, addresses and routes, then the firewall gets its elements;
3. a second write marks the endpoint "ready".
An agent killed between 1 and 3 finds a "pending" endpoint when it starts again and rolls it back,
so nothing is left half-made (see ``reconcile``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from plexus.agent.core import Core, log
from plexus.dataplane import netns
from plexus.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, PlexusError
from plexus.ipam.service import Plan, claim_keys, plan_allocation, plan_assigned
from plexus.model import keys, parse
from plexus.model.types import Endpoint, IPAddress, IPInterface, Network, Owner, PortMapping
from plexus.store.base import Compare, Delete, Put


@dataclass(frozen=True)
class AttachSpec:
    container_id: str
    network: str
    netns: str
    ifname: str = ""  # "" → the next free ethN of this container
    ips: Sequence[IPAddress] = ()
    ports: Sequence[PortMapping] = ()
    mac: str = ""
    name: str = ""
    aliases: Sequence[str] = ()
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # None: the container's first network carries its default route(s), as with Docker.
    default_route: bool | None = None
    owner: Owner = "plexus"
    bandwidth: dict[str, int] = field(default_factory=dict)
    # CNI lets a container join one network several times under different interface names.
    one_per_network: bool = True
    # Addresses the front door's own IPAM already assigned (Docker); claims whose owner starts
    # with ``assigned_by`` are that IPAM's and are left to it.
    addresses: Sequence[IPInterface] = ()
    assigned_by: str = ""
    # Docker moves the container end itself: make the pair in the host namespace.
    peer_in_host: bool = False


def claim_owner(value: str) -> str:
    """Claims hold the owning endpoint's key, as a bare string (addresses) or in JSON (ports)."""
    if value.startswith("{"):
        return str(json.loads(value).get("endpoint", ""))
    return value


def _port_claims(node: str, ep: Endpoint) -> list[str]:
    return [keys.port(node, p.protocol, h) for p in ep.ports for h, _ in p.pairs()]


class EndpointService:
    def __init__(self, core: Core) -> None:
        self.core = core

    def all(self) -> list[Endpoint]:
        return sorted(self.core.endpoints.values(), key=lambda e: (e.container_id, e.ifname))

    def of_container(self, container_id: str) -> list[Endpoint]:
        return [e for e in self.all() if e.container_id == container_id]

    async def attach(self, spec: AttachSpec) -> Endpoint:
        net, ep = self._validate(spec)
        route = spec.default_route
        if route is None:
            route = not any(e.gateways for e in self.of_container(spec.container_id))
        ep = await self._commit_pending(net, ep, spec, route)
        try:
            if spec.peer_in_host:
                ep = await self.core.dataplane.ensure_detached_veth(net, ep)
            elif ep.has_links:
                ep = await self.core.dataplane.ensure_endpoint(net, ep)
            ep = replace(ep, state="ready")
            self.core.endpoints[ep.key] = ep
            await self.core.publish()
            await self.core.store.put(self._key(ep), ep.to_json())
        except BaseException:
            await self._rollback(ep)
            raise
        log.info("attached %s to %s as %s", ep.container_id, net.name, ep.key)
        return ep

    def _validate(self, spec: AttachSpec) -> tuple[Network, Endpoint]:
        parse.name("container_id", spec.container_id, max_len=128)
        net = self.core.networks.get(spec.network)
        if net is None:
            raise NotFound(f"network {spec.network!r} not found")
        needs_netns = net.driver not in ("host", "ipam") and spec.owner != "cni-ipam"
        if needs_netns and not spec.peer_in_host:
            netns.check_netns(spec.netns)
        if (net.driver == "ipam") != (spec.owner == "cni-ipam"):
            raise InvalidArgument(
                "network", net.name, f"driver {net.driver} does not serve {spec.owner} endpoints"
            )
        mine = self.of_container(spec.container_id)
        if spec.one_per_network and any(e.network == net.name for e in mine):
            raise AlreadyExists(f"{spec.container_id} is already attached to network {net.name}")
        ifname = spec.ifname or _next_ifname({e.ifname for e in mine})
        parse.ifname(ifname)
        if any(e.ifname == ifname for e in mine):
            raise AlreadyExists(f"{spec.container_id} already has an interface {ifname}")
        if spec.ports and net.driver != "bridge":
            raise InvalidArgument("publish", str(spec.ports[0]), f"driver {net.driver} has no NAT")
        self._check_ports(spec.ports)
        ep = Endpoint(
            container_id=spec.container_id,
            ifname=ifname,
            network=net.name,
            node=self.core.node,
            netns=spec.netns if net.driver != "host" else "",
            ports=tuple(spec.ports),
            mac=spec.mac,
            name=spec.name,
            aliases=tuple(spec.aliases),
            namespace=spec.namespace,
            labels=dict(spec.labels),
            created=time.time(),
            owner=spec.owner,
            bandwidth=dict(spec.bandwidth),
        )
        return net, ep

    def _check_ports(
        self, ports: Sequence[PortMapping], others: Sequence[Endpoint] | None = None
    ) -> None:
        for i, p in enumerate(ports):
            for q in ports[i + 1 :]:
                if parse.port_overlap(p, q):
                    raise InvalidArgument("publish", str(q), f"overlaps {p}")
            for other in self.core.endpoints.values() if others is None else others:
                for q in other.ports:
                    if parse.port_overlap(p, q):
                        who = other.name or other.container_id
                        raise Conflict(f"host port {p} is already published by {who} ({q})")

    def _key(self, ep: Endpoint) -> str:
        return keys.endpoint(self.core.node, ep.container_id, ep.ifname)

    async def _plan(self, net: Network, ep: Endpoint, spec: AttachSpec) -> Plan:
        if spec.addresses:
            return await plan_assigned(
                self.core.store, net, self._key(ep), spec.addresses, spec.assigned_by
            )
        if net.driver in ("bridge", "ipam"):
            return await plan_allocation(self.core.store, net, self._key(ep), spec.ips)
        return Plan()

    async def _commit_pending(
        self, net: Network, ep: Endpoint, spec: AttachSpec, default_route: bool
    ) -> Endpoint:
        """Claim addresses and write the endpoint in one transaction, retrying lost races."""
        for _ in range(self.core.config.txn_retries):
            plan = await self._plan(net, ep, spec)
            pending = replace(ep, addresses=tuple(plan.addresses))
            if default_route:
                pending = replace(pending, gateways=_gateways(net, pending))
            claims = _port_claims(self.core.node, pending)
            owner = json.dumps({"endpoint": self._key(pending)})
            result = await self.core.store.txn(
                [Compare.absent(self._key(pending)), *plan.compares, *map(Compare.absent, claims)],
                [
                    Put(self._key(pending), pending.to_json()),
                    *plan.ops,
                    *(Put(c, owner) for c in claims),
                ],
            )
            if result.succeeded:
                self.core.endpoints[pending.key] = pending
                return pending
            await self._explain_conflict(pending, claims)
        raise Conflict(f"could not allocate addresses on {net.name}: too much contention")

    async def _explain_conflict(self, ep: Endpoint, claims: list[str]) -> None:
        if await self.core.store.get(self._key(ep)) is not None:
            raise AlreadyExists(f"endpoint {ep.key} already exists")
        for claim in claims:
            if await self.core.store.get(claim) is not None:
                raise Conflict(f"host port {claim.rsplit('/', 2)[-2:]} is already published")
        # otherwise an address race: plan again

    async def _rollback(self, ep: Endpoint) -> None:
        errors = await self._teardown(ep)
        if errors:
            log.error("rollback of %s left errors: %s", ep.key, "; ".join(errors))

    async def _teardown(self, ep: Endpoint, wait_kernel: bool = True) -> list[str]:
        """Forget the endpoint in the store first, then in the kernel, so a crash in between
        leaves only an orphan link, which the reconciler deletes. Collects every error."""
        errors: list[str] = []
        try:
            await self._forget(ep)
        except PlexusError as exc:
            errors.append(f"store: {exc}")
        self.core.endpoints.pop(ep.key, None)
        try:
            await self.core.publish()
        except PlexusError as exc:
            errors.append(f"firewall: {exc}")
        try:
            if ep.has_links:
                await self.core.dataplane.delete_endpoint(ep, wait=wait_kernel)
        except PlexusError as exc:
            errors.append(f"link: {exc}")
        return errors

    async def _forget(self, ep: Endpoint) -> None:
        """Delete the endpoint row and the address and port claims it owns, in one transaction.
        A claim is released only while it still names this endpoint: a stale endpoint must never
        free an address that has since been given to someone else."""
        key = self._key(ep)
        claims = claim_keys(ep.addresses) + _port_claims(self.core.node, ep)
        for _ in range(self.core.config.txn_retries):
            owned: list[tuple[str, str]] = []
            for claim in claims:
                kv = await self.core.store.get(claim)
                if kv is not None and claim_owner(kv.value) == key:
                    owned.append((claim, kv.value))
            result = await self.core.store.txn(
                [Compare(c, "value", "==", v) for c, v in owned],
                [Delete(key), *(Delete(c) for c, _ in owned)],
            )
            if result.succeeded:
                return
        raise Conflict(f"could not release the claims of {ep.key}: too much contention")

    async def set_ports(self, key: str, ports: Sequence[PortMapping]) -> Endpoint:
        """Replace an endpoint's published ports (Docker's ProgramExternalConnectivity comes
        after Join): claims and endpoint in one transaction, then the firewall's elements."""
        ep = self.core.endpoints.get(key)
        if ep is None:
            raise NotFound(f"endpoint {key} not found")
        others = [e for e in self.core.endpoints.values() if e.key != key]
        self._check_ports(ports, others)
        new = replace(ep, ports=tuple(ports))
        old_claims, new_claims = _port_claims(self.core.node, ep), _port_claims(self.core.node, new)
        owner = json.dumps({"endpoint": self._key(ep)})
        added = [c for c in new_claims if c not in old_claims]
        result = await self.core.store.txn(
            [Compare(self._key(ep), "value", "==", ep.to_json()), *map(Compare.absent, added)],
            [
                Put(self._key(ep), new.to_json()),
                *(Put(c, owner) for c in added),
                *(Delete(c) for c in old_claims if c not in new_claims),
            ],
        )
        if not result.succeeded:
            raise Conflict(f"the ports of {key} changed meanwhile, or a host port was taken")
        self.core.endpoints[key] = new
        await self.core.publish()
        return new

    async def detach(
        self,
        container_id: str,
        network: str = "",
        ifname: str = "",
        missing_ok: bool = False,
        wait_kernel: bool = True,
    ) -> Endpoint | None:
        """``wait_kernel=False`` answers once the endpoint is released (store, addresses,
        firewall, DNS) and lets the kernel finish deleting the veth in the background."""
        ep = self._find(container_id, network, ifname)
        if ep is None:
            if missing_ok:
                return None
            what = f"network {network}" if network else f"interface {ifname or '?'}"
            raise NotFound(f"{container_id} is not attached to {what}")
        errors = await self._teardown(ep, wait_kernel)
        if errors:
            raise PlexusError(f"detach {ep.key}: " + "; ".join(errors))
        log.info("detached %s from %s", ep.container_id, ep.network)
        return ep

    def _find(self, container_id: str, network: str, ifname: str) -> Endpoint | None:
        for ep in self.of_container(container_id):
            if (not network or ep.network == network) and (not ifname or ep.ifname == ifname):
                return ep
        return None


def _gateways(net: Network, ep: Endpoint) -> tuple[IPAddress, ...]:
    """The gateways of the subnets the endpoint has addresses in; none on internal networks,
    which reach nothing beyond themselves."""
    if net.internal or net.driver not in ("bridge", "ipam"):
        return ()
    return tuple(
        s.gateway
        for s in net.subnets
        if s.gateway is not None and ep.address_of(s.version) in s.cidr
    )


def _next_ifname(used: set[str]) -> str:
    return next(f"eth{i}" for i in range(len(used) + 1) if f"eth{i}" not in used)

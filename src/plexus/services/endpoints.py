"""Attaching network namespaces to networks, and detaching them.

Attach is one transaction and two waits:
1. one transaction writes the endpoints (state "pending"), their addresses and their port claims;
2. the service waits until the reconcilers have programmed them (links, firewall, DNS); if one
   failed, a second transaction releases everything and the error is the answer;
3. a last transaction marks them "ready".
An agent killed between 1 and 3 finds "pending" endpoints when it starts again and rolls them
back (their requester got an error), so nothing is left half-made. Detach is one transaction
(endpoint, addresses, ports) and a wait until the kernel has let go.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from plexus.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, PlexusError
from plexus.ipam import hostblocks
from plexus.ipam.plans import (
    NextFree,
    Plan,
    plan_allocation,
    plan_assigned,
    plan_release_many,
)
from plexus.model import keys, parse
from plexus.model.drivers import traits
from plexus.model.types import (
    Endpoint,
    ExposedPort,
    IPAddress,
    IPInterface,
    Network,
    Owner,
    PortMapping,
)
from plexus.services import namespaces, ports, spanning
from plexus.services.context import Context, endpoint_object
from plexus.services.leftovers import Leftovers
from plexus.store.base import Compare, Delete, Put, TxnResult


@dataclass(frozen=True)
class AttachSpec:
    container_id: str
    network: str
    netns: str
    ifname: str = ""  # "" -> the next free ethN of this container
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
    # Addresses an IPAM pool already handed out (Docker); claims whose value starts with
    # ``pool_claims`` are the pool's and are left to it.
    addresses: Sequence[IPInterface] = ()
    pool_claims: str = ""
    # Docker moves the container end itself: make the pair in the host namespace.
    peer_in_host: bool = False
    exposes: Sequence[ExposedPort] = ()  # named ports, for policies


def random_mac() -> str:
    """A locally administered unicast MAC, chosen once per endpoint so that every re-creation
    of its interface (after a crash, a repair) has the same one."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


@dataclass(frozen=True)
class _Planned:
    ep: Endpoint
    spec: AttachSpec
    net: Network
    route: bool  # the endpoint carries the container's default route(s)


class EndpointService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.leftovers = Leftovers(ctx, self.release)

    def all(self) -> list[Endpoint]:
        return sorted(self.ctx.cache.local_endpoints(), key=lambda e: (e.container_id, e.ifname))

    def of_container(self, container_id: str) -> list[Endpoint]:
        return self.ctx.cache.of_container(container_id)

    def get(self, key: str) -> Endpoint:
        ep = self.ctx.cache.endpoint(key)
        if ep is None:
            raise NotFound(f"endpoint {key} not found")
        return ep

    # -- attach --------------------------------------------------------------------------------

    async def attach(self, spec: AttachSpec) -> Endpoint:
        return (await self.attach_all([spec]))[0]

    async def attach_all(self, specs: Sequence[AttachSpec]) -> list[Endpoint]:
        """Attach every spec (a container's networks) in one transaction. What a failed
        attach may have left in the store is rolled back (now, or by ``leftovers`` once the
        store answers again)."""
        await self.leftovers.clear(container_ids={s.container_id for s in specs})
        planned: list[_Planned] = []
        for spec in specs:
            planned.append(self._validate(spec, planned))
            await self._check_host_addresses(spec.ports)
        result, eps = await self._commit(planned)
        try:
            await self.ctx.settle(result.revision, [endpoint_object(e.store_key) for e in eps])
        except PlexusError:
            await self._undo(eps)
            raise
        return await self._mark_ready(eps)

    async def _undo(self, eps: list[Endpoint]) -> None:
        """Release what a failed attach wrote; if the store does not answer, later."""
        try:
            await self.release(eps)
        except PlexusError:
            self.leftovers.endpoints(eps)

    def _validate(self, spec: AttachSpec, siblings: list[_Planned]) -> _Planned:
        parse.name("container_id", spec.container_id, max_len=128)
        for a in spec.aliases:
            parse.alias(a)
        parse.namespace(spec.namespace)
        for k, v in spec.labels.items():
            parse.label(k, v)
        net = self.ctx.cache.network(spec.network)
        if net is None:
            raise NotFound(f"network {spec.network!r} not found")
        kind = traits(net.driver)
        if kind.foreign_links != (spec.owner == "cni-ipam"):
            raise InvalidArgument(
                "network", net.name, f"driver {net.driver} does not serve {spec.owner} endpoints"
            )
        if kind.needs_netns and not spec.peer_in_host:
            self.ctx.host.check_netns(spec.netns)
        existing = self.of_container(spec.container_id)
        mine = [*existing, *(p.ep for p in siblings if p.ep.container_id == spec.container_id)]
        if spec.one_per_network and any(e.network == net.name for e in mine):
            raise AlreadyExists(f"{spec.container_id} is already attached to network {net.name}")
        ifname = parse.ifname(spec.ifname or _next_ifname({e.ifname for e in mine}))
        if any(e.ifname == ifname for e in mine):
            raise AlreadyExists(f"{spec.container_id} already has an interface {ifname}")
        if spec.ports and not kind.publishes:
            raise InvalidArgument("publish", str(spec.ports[0]), f"driver {net.driver} has no NAT")
        _check_overlaps(spec.ports)
        route = spec.default_route
        if route is None:
            route = not any(e.gateways for e in existing) and not any(p.route for p in siblings)
        ep = Endpoint(
            container_id=spec.container_id, ifname=ifname, network=net.name,
            node=self.ctx.node, netns=spec.netns if kind.needs_netns else "",
            ports=tuple(spec.ports), mac=spec.mac or (random_mac() if kind.links else ""),
            name=spec.name, aliases=tuple(spec.aliases), namespace=spec.namespace,
            labels=dict(spec.labels), created=time.time(), owner=spec.owner,
            bandwidth=dict(spec.bandwidth), peer_in_host=spec.peer_in_host,
            exposes=tuple(spec.exposes),
        )
        return _Planned(ep, spec, net, route)

    async def _check_host_addresses(self, mappings: Sequence[PortMapping]) -> None:
        """A port published on a host address the host does not have would never be reached."""
        for pm in mappings:
            if pm.host_ip is not None and not await self.ctx.host.has_address(pm.host_ip):
                raise InvalidArgument("publish", str(pm),
                                      f"the host has no address {pm.host_ip}")

    async def _plan(self, p: _Planned) -> tuple[Endpoint, Plan]:
        owner = p.ep.store_key
        if p.spec.addresses:
            plan = await plan_assigned(self.ctx.store, p.net, owner, p.spec.addresses,
                                       p.spec.pool_claims)
        elif traits(p.net.driver).allocates:
            plan = await plan_allocation(self.ctx.store, p.net, owner, p.spec.ips, self._who,
                                         self._next_free(p.net, p.spec.ips))
        else:
            plan = Plan()
        ep = replace(p.ep, addresses=tuple(plan.addresses), borrowed=tuple(plan.borrowed))
        ep = replace(ep, gateways=_gateways(p.net, ep) if p.route else ())
        change = ports.PortChange(self.ctx.node, owner, (), ep.ports)
        plan.extend(await ports.plan_ports(self.ctx.store, [change], self._who))
        plan.compares.append(Compare.absent(owner))
        plan.ops.append(Put(owner, ep.to_json()))
        return ep, plan

    def _next_free(self, net: Network, static: Sequence[IPAddress]) -> NextFree | None:
        """A network that spans hosts hands out addresses from this host's blocks."""
        if static and spanning.spans_hosts(net):
            raise InvalidArgument("ip", str(static[0]),
                                  "a fixed address on a network that spans hosts is not "
                                  "supported yet")
        return spanning.next_free(self.ctx, net)

    async def _commit(self, planned: list[_Planned]) -> tuple[TxnResult, list[Endpoint]]:
        """Claim addresses and ports and write the endpoints in one transaction, planning again
        when a race was lost."""
        for _ in range(self.ctx.config.txn_retries):
            plan, eps = Plan(), []
            for p in planned:
                ep, part = await self._plan(p)
                eps.append(ep)
                plan.extend(part)
            # A namespace named for the first time is created with its first endpoint.
            compares, ops = await namespaces.ensure_ops(self.ctx, [e.namespace for e in eps])
            plan.compares += compares
            plan.ops += ops
            try:
                result = await self.ctx.commit(plan.compares, plan.ops)
            except BaseException:  # StoreUnavailable: it may have been applied all the same
                self.leftovers.endpoints(eps)
                raise
            if result.succeeded:
                return result, eps
            for ep in eps:
                if await self.ctx.store.get(ep.store_key) is not None:
                    raise AlreadyExists(f"endpoint {ep.key} already exists")
        raise Conflict(f"could not allocate on {planned[0].net.name}: too much contention")

    async def _mark_ready(self, eps: list[Endpoint]) -> list[Endpoint]:
        ready = [replace(e, state="ready") for e in eps]
        try:
            result = await self.ctx.commit(
                [Compare(e.store_key, "value", "==", e.to_json()) for e in eps],
                [Put(e.store_key, e.to_json()) for e in ready],
            )
            if result.succeeded:
                await self.ctx.seen(result.revision)
        except BaseException:  # the requester hears of a failure: neither version is wanted
            self.leftovers.endpoints([*eps, *ready])
            raise
        if not result.succeeded:  # released meanwhile (a DEL racing the ADD): that one wins
            raise Conflict(f"endpoint {eps[0].key} was removed while it was being attached")
        return ready

    def _who(self, holder: str) -> str:
        """A claim's holder as a user knows it: the container's name, else its short ID."""
        ep = self.ctx.cache.endpoint(holder)
        if ep is not None:
            return ep.name or ep.container_id[:12]
        if holder.startswith(keys.ENDPOINTS):
            return holder.rsplit("/", 2)[-2][:12]
        return holder  # a pool's

    # -- change --------------------------------------------------------------------------------

    async def set_ports(self, key: str, new: Sequence[PortMapping]) -> Endpoint:
        """Replace an endpoint's published ports (Docker's ProgramExternalConnectivity comes
        after Join): claims and endpoint in one transaction, then wait for the firewall."""
        ep = self.get(key)
        _check_overlaps(new)
        await self._check_host_addresses(new)
        change = ports.PortChange(ep.node, key, ep.ports, new)
        plan = await ports.plan_ports(self.ctx.store, [change], self._who)
        return await self._update(ep, plan, ports=tuple(new))

    async def update(self, key: str, **changes: Any) -> Endpoint:
        """Change fields of an endpoint that need no new claims (names, the sandbox, its policy
        namespace and labels; a namespace named for the first time is created with it)."""
        plan = Plan()
        if "namespace" in changes:
            parse.namespace(changes["namespace"])
            plan.compares, plan.ops = await namespaces.ensure_ops(self.ctx,
                                                                  [changes["namespace"]])
        for k, v in changes.get("labels", {}).items():
            parse.label(k, v)
        return await self._update(self.get(key), plan, **changes)

    async def _update(self, ep: Endpoint, plan: Plan, **changes: Any) -> Endpoint:
        new = replace(ep, **changes)
        result = await self.ctx.commit(
            [Compare(ep.store_key, "value", "==", ep.to_json()), *plan.compares],
            [Put(ep.store_key, new.to_json()), *plan.ops],
        )
        if not result.succeeded:
            raise Conflict(f"endpoint {ep.key} changed meanwhile, or a host port was taken")
        await self.ctx.settle(result.revision, [endpoint_object(ep.store_key)])
        return new

    # -- detach --------------------------------------------------------------------------------

    async def detach(self, container_id: str, network: str = "", ifname: str = "",
                     missing_ok: bool = False) -> Endpoint | None:
        await self.leftovers.clear(container_ids={container_id})
        ep = self._find(container_id, network, ifname)
        if ep is None:
            if missing_ok:
                return None
            what = f"network {network}" if network else f"interface {ifname or '?'}"
            raise NotFound(f"{container_id} is not attached to {what}")
        await self.release([ep])
        return ep

    def _find(self, container_id: str, network: str, ifname: str) -> Endpoint | None:
        for ep in self.of_container(container_id):
            if (not network or ep.network == network) and (not ifname or ep.ifname == ifname):
                return ep
        return None

    async def release(self, eps: Sequence[Endpoint], guards: Sequence[Compare] = ()) -> None:
        """Delete endpoints with the address and port claims they still own (a stale endpoint
        never frees an address since given to someone else), in one transaction if
        ``guards`` hold; then wait until the kernel has let go of them (a veth's deletion
        finishes in the background)."""
        if not eps:
            return
        held = [(a, ep.store_key) for ep in eps for a in ep.addresses]
        changes = [ports.PortChange(ep.node, ep.store_key, ep.ports) for ep in eps]
        for _ in range(self.ctx.config.txn_retries):
            plan = await plan_release_many(self.ctx.store, held)
            plan.extend(await ports.plan_ports(self.ctx.store, changes))
            plan.ops += [Delete(ep.store_key) for ep in eps]
            result = await self.ctx.commit([*plan.compares, *guards], plan.ops)
            if result.succeeded:
                await self.ctx.settle(result.revision)
                return
            if guards and not all([await _holds(self.ctx, g) for g in guards]):
                return  # changed by someone else meanwhile: not this release's to delete
        raise Conflict(f"could not release {eps[0].key}: too much contention")


async def _holds(ctx: Context, guard: Compare) -> bool:
    """Does a ``mod ==`` compare still hold?"""
    kv = await ctx.store.get(guard.key)
    return kv is not None and kv.mod_revision == guard.value


def _check_overlaps(mappings: Sequence[PortMapping]) -> None:
    for i, p in enumerate(mappings):
        for q in mappings[i + 1 :]:
            if parse.port_overlap(p, q):
                raise InvalidArgument("publish", str(q), f"overlaps {p}")


def _gateways(net: Network, ep: Endpoint) -> tuple[IPAddress, ...]:
    """The gateways of the subnets the endpoint has addresses in; none on internal networks,
    which reach nothing beyond themselves."""
    if net.internal or not traits(net.driver).routes:
        return ()
    found = []
    for s in net.subnets:
        address = ep.address_of(s.version)
        if address is None or address not in s.cidr:
            continue
        gateway = hostblocks.gateway(net, s, address)
        if gateway is not None:
            found.append(gateway)
    return tuple(found)


def _next_ifname(used: set[str]) -> str:
    return next(f"eth{i}" for i in range(len(used) + 1) if f"eth{i}" not in used)

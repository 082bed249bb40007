"""IPAM pools: a subnet reserved before its network exists, and the addresses handed out of it.

Docker's IPAM driver asks for a pool, then its gateway, then (per container) addresses, and only
in between creates the network. A pool claims its subnet as ``pool:docker`` in
``/plexus/subnets/`` (the network created later adopts that claim), is counted (identical
requests share it), and its addresses are claimed as ``pool:ID`` through the same IPAM plans as
every other address, so pool, CNI and plexus containers of one network can never collide.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field, replace

from plexus.errors import Conflict, Exhausted, InvalidArgument, NotFound
from plexus.ipam import allocator
from plexus.ipam.plans import Plan, claim_address, claim_next, plan_release
from plexus.model import keys
from plexus.model.types import IPInterface, IPNetwork, Network, Subnet
from plexus.services import spanning
from plexus.services.context import Context
from plexus.services.networks import NetworkService
from plexus.store.base import Compare, Delete, Op, Put

SUBNET_CLAIM = keys.pool_claim("docker")  # what a pool writes into /plexus/subnets/CIDR


@dataclass
class Pool:
    cidr: str
    sub_pool: str = ""
    refs: int = 0
    gateway: str = ""
    used: bool = False  # some address other than the gateway was handed out
    auto: bool = False
    aux: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return pool_id(self.cidr, self.sub_pool)

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    @property
    def range(self) -> IPNetwork:
        return ipaddress.ip_network(self.sub_pool) if self.sub_pool else self.network

    @property
    def claim(self) -> str:
        """The owner value of the addresses this pool hands out."""
        return keys.pool_claim(self.id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def pool_id(cidr: str, sub_pool: str = "") -> str:
    return f"{cidr}|{sub_pool}" if sub_pool else cidr


def _cidr(field_name: str, value: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise InvalidArgument(field_name, value, "not a CIDR") from None


class PoolService:
    def __init__(self, ctx: Context, networks: NetworkService) -> None:
        self.ctx = ctx
        self.networks = networks

    async def get(self, pid: str) -> Pool:
        kv = await self.ctx.store.get(keys.pool(pid))
        if kv is None:
            raise NotFound(f"unknown pool {pid!r}")
        return Pool(**json.loads(kv.value))

    async def _save(self, pool: Pool, prev: Pool) -> bool:
        key = keys.pool(pool.id)
        res = await self.ctx.commit([Compare(key, "value", "==", prev.to_json())],
                                    [Put(key, pool.to_json())])
        return res.succeeded

    # -- pools ---------------------------------------------------------------------------------

    async def request(self, want: str, sub: str, v6: bool) -> Pool:
        """The pool ``want`` (or an automatic one of the family), counted once more."""
        if sub and not want:
            raise InvalidArgument("SubPool", sub, "a sub-pool needs a pool")
        for _ in range(self.ctx.config.txn_retries):
            cidr = await self._choose(want, v6)
            if sub and not _cidr("SubPool", sub).subnet_of(ipaddress.ip_network(cidr)):  # type: ignore[arg-type]
                raise InvalidArgument("SubPool", sub, f"not inside {cidr}")
            pool = await self._reference(cidr, sub, auto=not want)
            if pool is not None:
                return pool
        raise Conflict("could not reserve a pool: too much contention")

    async def _choose(self, want: str, v6: bool) -> str:
        if want:
            net = _cidr("Pool", want)
            if (net.version == 6) != v6:
                raise InvalidArgument("Pool", want, f"V6={v6} does not match the pool")
            return str(net)
        cfg = self.ctx.config
        pool, prefix = (cfg.pool6, cfg.pool6_prefix) if v6 else (cfg.pool4, cfg.pool4_prefix)
        refused, _ = await self.ctx.store.list(keys.POOLS_REFUSED)
        avoid = [p for p, _ in await self.networks.taken_prefixes()]
        avoid += [ipaddress.ip_network(keys.segment_cidr(kv.key[len(keys.POOLS_REFUSED):]))
                  for kv in refused]
        return str(allocator.pick_subnet(pool, prefix, avoid))

    async def _reference(self, cidr: str, sub: str, auto: bool) -> Pool | None:
        """Count one more user of the pool, claiming its subnet on first use; None: lost a
        race, try again."""
        claim_key = keys.subnet(cidr)
        claim = await self.ctx.store.get(claim_key)
        if claim is None:
            await self._check_free(cidr)
        elif claim.value != SUBNET_CLAIM and self.ctx.cache.network(claim.value) is None:
            raise Conflict(f"pool {cidr} is held by {claim.value}")
        try:
            prev: Pool | None = await self.get(pool_id(cidr, sub))
        except NotFound:
            prev = None
        new = replace(prev, refs=prev.refs + 1) if prev else Pool(cidr, sub, 1, auto=auto)
        key = keys.pool(new.id)
        guards = [Compare.unchanged(claim, claim_key),
                  Compare.absent(key) if prev is None else Compare(key, "value", "==",
                                                                   prev.to_json())]
        ops: list[Op] = [Put(key, new.to_json())]
        if claim is None:
            ops.append(Put(claim_key, SUBNET_CLAIM))
        res = await self.ctx.commit(guards, ops)
        return new if res.succeeded else None

    async def _check_free(self, cidr: str) -> None:
        net = ipaddress.ip_network(cidr)
        for taken, where in await self.networks.taken_prefixes():
            if taken.version == net.version and taken.overlaps(net):
                raise Conflict(f"pool {cidr} overlaps {taken} ({where})")

    async def release(self, pid: str) -> None:
        for _ in range(self.ctx.config.txn_retries):
            try:
                pool = await self.get(pid)
            except NotFound:
                return  # released already: idempotent
            if pool.refs > 1:
                if await self._save(replace(pool, refs=pool.refs - 1), pool):
                    return
                continue
            if await self._drop(pool):
                return
        raise Conflict(f"could not release pool {pid}: too much contention")

    async def _drop(self, pool: Pool) -> bool:
        plan = Plan([], [Compare(keys.pool(pool.id), "value", "==", pool.to_json())],
                    [Delete(keys.pool(pool.id))])
        claim = await self.ctx.store.get(keys.subnet(pool.cidr))
        if claim is not None and claim.value == SUBNET_CLAIM:
            # No network took the subnet over: the pool's addresses go with it.
            plan.ops += [Delete(keys.subnet(pool.cidr)), Delete(keys.ipam_cursor(pool.cidr))]
            held, _ = await self.ctx.store.list(keys.ipam_prefix(pool.cidr))
            mine = [_iface(kv.key, pool) for kv in held if kv.value == pool.claim]
            plan.extend(await plan_release(self.ctx.store, mine, pool.claim))
        if pool.auto and not pool.used:
            # Docker hands back an automatic pool it would not use (it overlaps a route Docker
            # knows of): it must not be offered again.
            plan.ops.append(Put(keys.pool_refused(pool.cidr), "refused by docker"))
        return (await self.ctx.commit(plan.compares, plan.ops)).succeeded

    # -- addresses -----------------------------------------------------------------------------

    def _subnet(self, pool: Pool) -> Subnet:
        """The pool as a subnet: the network's gateway once it exists, else the pool's."""
        net = self._network_of(pool)
        gw = None
        if net is not None:
            gw = next((s.gateway for s in net.subnets if str(s.cidr) == pool.cidr), None)
        if gw is None and pool.gateway:
            gw = ipaddress.ip_address(pool.gateway)
        return Subnet(pool.network, gw, pool.range if pool.sub_pool else None)

    def _network_of(self, pool: Pool) -> Network | None:
        for net in self.ctx.cache.networks.values():
            if any(str(s.cidr) == pool.cidr for s in net.subnets):
                return net
        return None

    async def gateway(self, pid: str, want: str) -> IPInterface:
        pool = await self.get(pid)
        net = self._network_of(pool)
        if net is not None:
            gw = next((s.gateway for s in net.subnets if str(s.cidr) == pool.cidr), None)
            if want and gw is not None and want != str(gw):
                raise Conflict(f"network {net.name} has gateway {gw}, not {want}")
            address = str(gw or allocator.first_host(pool.network))
        else:
            address = want or str(allocator.first_host(pool.network))
            if ipaddress.ip_address(address) not in pool.network:
                raise InvalidArgument("Address", want, f"not in pool {pool.cidr}")
        for _ in range(self.ctx.config.txn_retries):
            fresh = await self.get(pool.id)
            if await self._save(replace(fresh, gateway=address), fresh):
                return ipaddress.ip_interface(f"{address}/{pool.network.prefixlen}")
        raise Conflict("could not record the gateway: too much contention")

    async def address(self, pid: str, want: str) -> IPInterface:
        """An address of the pool: ``want`` exactly, or the next free one (on a network that
        spans hosts, of this host's blocks: ``services.spanning``)."""
        for _ in range(self.ctx.config.txn_retries):
            pool = await self.get(pid)
            subnet = self._subnet(pool)
            plan = await self._plan_address(pool, subnet, want, self._network_of(pool))
            guard = Compare(keys.pool(pool.id), "value", "==", pool.to_json())
            used = replace(pool, used=True)
            res = await self.ctx.commit([guard, *plan.compares],
                                        [*plan.ops, Put(keys.pool(pool.id), used.to_json())])
            if res.succeeded:
                # The next request plans from the cache: it must see the block claimed here.
                await self.ctx.seen(res.revision)
                return plan.addresses[0]
        raise Conflict("could not allocate an address: too much contention")

    async def _plan_address(self, pool: Pool, subnet: Subnet, want: str,
                            net: Network | None) -> Plan:
        if spanning.spans_hosts(net) and pool.sub_pool:
            raise InvalidArgument("SubPool", pool.sub_pool, "a network that spans hosts hands "
                                  "out the addresses of each host's blocks")
        if not want:
            claim = (net and spanning.next_free(self.ctx, net)) or self._claim_next
            try:
                return await claim(subnet, pool.claim)
            except Exhausted:
                raise Exhausted(f"no free address left in pool {pool.id}") from None
        address = ipaddress.ip_address(want)
        if address not in pool.network:
            raise InvalidArgument("Address", want, f"not in pool {pool.cidr}")
        if spanning.spans_hosts(net) and not spanning.in_own_blocks(self.ctx, subnet, address):
            raise InvalidArgument("Address", want, f"not in a block of {pool.cidr} this host "
                                  "holds (network spans hosts)")
        try:
            return await claim_address(self.ctx.store, subnet, address, pool.claim)
        except (InvalidArgument, Conflict):
            raise Conflict(f"address {want} is not available in pool {pool.cidr}") from None

    async def _claim_next(self, subnet: Subnet, owner: str) -> Plan:
        return await claim_next(self.ctx.store, subnet, owner)

    async def release_address(self, pid: str, address: str) -> None:
        try:
            pool = await self.get(pid)
        except NotFound:
            return
        if address and address == pool.gateway:
            await self._save(replace(pool, gateway=""), pool)
            return
        iface = ipaddress.ip_interface(f"{address}/{pool.network.prefixlen}")
        for _ in range(self.ctx.config.txn_retries):
            plan = await plan_release(self.ctx.store, [iface], pool.claim)
            if (await self.ctx.commit(plan.compares, plan.ops)).succeeded:
                return
        raise Conflict(f"could not release {address}: too much contention")

    async def pools_of(self, cidr: str) -> bool:
        """Is a pool of ``cidr`` still held (a network removed under it goes back to it)?"""
        listed, _ = await self.ctx.store.list(keys.POOLS)
        return any(Pool(**json.loads(kv.value)).cidr == cidr for kv in listed)

    async def return_subnet(self, cidr: str) -> None:
        key = keys.subnet(cidr)
        await self.ctx.commit([Compare.absent(key)], [Put(key, SUBNET_CLAIM)])


def _iface(key: str, pool: Pool) -> IPInterface:
    return ipaddress.ip_interface(f"{key.rsplit('/', 1)[1]}/{pool.network.prefixlen}")



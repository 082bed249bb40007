"""Docker's remote IPAM driver on plexus's datastore (libnetwork docs/ipam.md).

Docker asks for a pool before the network exists, then for the gateway, then (per container)
for addresses. A pool is a subnet claimed as ``pool:docker`` in ``/plexus/subnets/``; the network
created later adopts that claim. Pools are reference-counted (identical RequestPool calls return
the same PoolID), and container addresses are claimed as ``docker:POOLID`` under the subnet, the
same keys every plexus allocation uses, so Docker, CNI and plexus containers on one network can
never collide.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from plexus.agent.core import Core
from plexus.agent.networks import NetworkService
from plexus.errors import Conflict, Exhausted, InvalidArgument, NotFound
from plexus.ipam import allocator
from plexus.model import keys
from plexus.model.types import IPAddress, IPNetwork
from plexus.store.base import Compare, Delete, Put

POOL_CLAIM = "pool:docker"
OWNER_PREFIX = "docker:"
GATEWAY_REQUEST = "com.docker.network.gateway"
POOLS = "/plexus/docker/pools/"
REFUSED = "/plexus/docker/refused/"


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


def pool_id(cidr: str, sub_pool: str = "") -> str:
    return f"{cidr}|{sub_pool}" if sub_pool else cidr


def _pool_key(pid: str) -> str:
    return POOLS + pid.replace("/", "_")


class DockerIpam:
    def __init__(self, core: Core, networks: NetworkService) -> None:
        self.core = core
        self.networks = networks

    async def pool(self, pid: str) -> Pool:
        kv = await self.core.store.get(_pool_key(pid))
        if kv is None:
            raise NotFound(f"unknown pool {pid!r}")
        return Pool(**json.loads(kv.value))

    async def _save(self, pool: Pool, prev: Pool | None) -> bool:
        key = _pool_key(pool.id)
        guard = (
            Compare.absent(key)
            if prev is None
            else Compare(key, "value", "==", json.dumps(asdict(prev)))
        )
        res = await self.core.store.txn([guard], [Put(key, json.dumps(asdict(pool)))])
        return res.succeeded

    async def request_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        want, sub = str(body.get("Pool") or ""), str(body.get("SubPool") or "")
        if not body.get("AddressSpace"):
            raise InvalidArgument("AddressSpace", "", "required")
        if sub and not want:
            raise InvalidArgument("SubPool", sub, "a sub-pool needs a pool")
        v6 = bool(body.get("V6"))
        for _ in range(self.core.config.txn_retries):
            cidr = await self._choose(want, v6)
            if sub and not ipaddress.ip_network(sub).subnet_of(ipaddress.ip_network(cidr)):  # type: ignore[arg-type]
                raise InvalidArgument("SubPool", sub, f"not inside {cidr}")
            if await self._reference(cidr, sub, auto=not want):
                return {"PoolID": pool_id(cidr, sub), "Pool": cidr, "Data": {}}
        raise Conflict("could not reserve a pool: too much contention")

    async def _choose(self, want: str, v6: bool) -> str:
        if want:
            net = ipaddress.ip_network(want, strict=True) if _valid(want) else None
            if net is None:
                raise InvalidArgument("Pool", want, "not a CIDR")
            if (net.version == 6) != v6:
                raise InvalidArgument("Pool", want, f"V6={v6} does not match the pool")
            return str(net)
        cfg = self.core.config
        pool, prefix = (cfg.pool6, cfg.pool6_prefix) if v6 else (cfg.pool4, cfg.pool4_prefix)
        refused, _ = await self.core.store.list(REFUSED)
        avoid = [p for p, _ in await self.networks.taken_prefixes()]
        avoid += [ipaddress.ip_network(kv.key[len(REFUSED) :].replace("_", "/")) for kv in refused]
        return str(allocator.pick_subnet(pool, prefix, avoid))

    async def _reference(self, cidr: str, sub: str, auto: bool) -> bool:
        """Count one more user of the pool, claiming its subnet on first use. False: lost a
        race, try again."""
        claim_key = keys.subnet(cidr)
        claim = await self.core.store.get(claim_key)
        if claim is None:
            await self._check_free(cidr)
        elif claim.value != POOL_CLAIM and claim.value not in self.core.networks:
            raise Conflict(f"pool {cidr} is held by {claim.value}")
        try:
            prev: Pool | None = await self.pool(pool_id(cidr, sub))
        except NotFound:
            prev = None
        new = replace(prev, refs=prev.refs + 1) if prev else Pool(cidr, sub, 1, auto=auto)
        guards = [Compare.unchanged(claim, claim_key)]
        ops: list[Put] = [Put(_pool_key(new.id), json.dumps(asdict(new)))]
        if claim is None:
            ops.append(Put(claim_key, POOL_CLAIM))
        pool_guard = (
            Compare.absent(_pool_key(new.id))
            if prev is None
            else Compare(_pool_key(new.id), "value", "==", json.dumps(asdict(prev)))
        )
        res = await self.core.store.txn([*guards, pool_guard], ops)
        return res.succeeded

    async def _check_free(self, cidr: str) -> None:
        net = ipaddress.ip_network(cidr)
        for taken, where in await self.networks.taken_prefixes():
            if taken.version == net.version and taken.overlaps(net):
                raise Conflict(f"pool {cidr} overlaps {taken} ({where})")

    async def release_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = str(body.get("PoolID", ""))
        for _ in range(self.core.config.txn_retries):
            try:
                pool = await self.pool(pid)
            except NotFound:
                return {}  # released already: idempotent
            if pool.refs > 1:
                if await self._save(replace(pool, refs=pool.refs - 1), pool):
                    return {}
                continue
            await self._drop(pool)
            return {}
        raise Conflict(f"could not release pool {pid}: too much contention")

    async def _drop(self, pool: Pool) -> None:
        ops: list[Put | Delete] = [Delete(_pool_key(pool.id))]
        claim = await self.core.store.get(keys.subnet(pool.cidr))
        if claim is not None and claim.value == POOL_CLAIM:
            ops += [Delete(keys.subnet(pool.cidr)), Delete(keys.ipam_cursor(pool.cidr))]
            kvs, _ = await self.core.store.list(keys.ipam_prefix(pool.cidr))
            ops += [Delete(kv.key) for kv in kvs if kv.value.startswith(OWNER_PREFIX)]
        if pool.auto and not pool.used:
            # Docker hands back an automatic pool it would not use (it overlaps a route Docker
            # knows of); it must not be offered again.
            ops.append(Put(REFUSED + pool.cidr.replace("/", "_"), "refused by docker"))
        await self.core.store.txn([], ops)

    async def request_address(self, body: dict[str, Any]) -> dict[str, Any]:
        pool = await self.pool(str(body.get("PoolID", "")))
        options = body.get("Options") or {}
        want = str(body.get("Address") or "")
        if options.get("RequestAddressType") == GATEWAY_REQUEST:
            return await self._gateway(pool, want)
        for _ in range(self.core.config.txn_retries):
            address = await self._pick(pool, want)
            key = keys.ipam_addr(pool.cidr, address)
            cursor_key = keys.ipam_cursor(pool.cidr)
            cursor = await self.core.store.get(cursor_key)
            res = await self.core.store.txn(
                [Compare.absent(key), *([] if want else [Compare.unchanged(cursor, cursor_key)])],
                [
                    Put(key, OWNER_PREFIX + pool.id),
                    *([] if want else [Put(cursor_key, str(address))]),
                ],
            )
            if res.succeeded:
                await self._mark_used(pool)
                return {"Address": f"{address}/{pool.network.prefixlen}", "Data": {}}
            if want:
                raise Conflict(f"address {want} is already in use")
        raise Conflict("could not allocate an address: too much contention")

    async def _gateway(self, pool: Pool, want: str) -> dict[str, Any]:
        net = self.core.networks.get(await self._network_of(pool))
        if net is not None:
            gw = next((s.gateway for s in net.subnets if str(s.cidr) == pool.cidr), None)
            if want and gw is not None and want != str(gw):
                raise Conflict(f"network {net.name} has gateway {gw}, not {want}")
            address = str(gw or allocator.first_host(pool.network))
        else:
            address = want or str(allocator.first_host(pool.network))
            if ipaddress.ip_address(address) not in pool.network:
                raise InvalidArgument("Address", want, f"not in pool {pool.cidr}")
        for _ in range(self.core.config.txn_retries):
            fresh = await self.pool(pool.id)
            if await self._save(replace(fresh, gateway=address), fresh):
                return {"Address": f"{address}/{pool.network.prefixlen}", "Data": {}}
        raise Conflict("could not record the gateway: too much contention")

    async def _network_of(self, pool: Pool) -> str:
        claim = await self.core.store.get(keys.subnet(pool.cidr))
        return "" if claim is None or claim.value == POOL_CLAIM else claim.value

    async def _pick(self, pool: Pool, want: str) -> IPAddress:
        kvs, _ = await self.core.store.list(keys.ipam_prefix(pool.cidr))
        taken = {ipaddress.ip_address(kv.key.rsplit("/", 1)[1]) for kv in kvs}
        if pool.gateway:
            taken.add(ipaddress.ip_address(pool.gateway))
        net = self.core.networks.get(await self._network_of(pool))
        if net is not None:
            taken |= {s.gateway for s in net.subnets if s.gateway is not None}
        if want:
            address = ipaddress.ip_address(want)
            if address not in pool.network:
                raise InvalidArgument("Address", want, f"not in pool {pool.cidr}")
            if address in taken or address in allocator.unusable(pool.network):
                raise Conflict(f"address {want} is not available in pool {pool.cidr}")
            return address
        cursor = await self.core.store.get(keys.ipam_cursor(pool.cidr))
        try:
            return allocator.next_free(
                pool.network,
                pool.range,
                taken,
                ipaddress.ip_address(cursor.value) if cursor else None,
            )
        except Exhausted:
            raise Exhausted(f"no free address left in pool {pool.id}") from None

    async def _mark_used(self, pool: Pool) -> None:
        fresh = await self.pool(pool.id)
        if not fresh.used:
            await self._save(replace(fresh, used=True), fresh)

    async def release_address(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            pool = await self.pool(str(body.get("PoolID", "")))
        except NotFound:
            return {}
        address = str(body.get("Address", "")).split("/")[0]
        if address and address == pool.gateway:
            await self._save(replace(pool, gateway=""), pool)
            return {}
        key = keys.ipam_addr(pool.cidr, address)
        kv = await self.core.store.get(key)
        if kv is not None and kv.value.startswith(OWNER_PREFIX):
            await self.core.store.txn([Compare(key, "value", "==", kv.value)], [Delete(key)])
        return {}


def _valid(cidr: str) -> bool:
    try:
        ipaddress.ip_network(cidr, strict=True)
    except ValueError:
        return False
    return True

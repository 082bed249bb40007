"""Creating, listing and removing networks: subnets chosen, claimed and written in one
transaction; the bridge (or whatever the driver makes) is the reconcilers' business."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from plexus.dns import OPTION_UPSTREAMS, format_upstreams, parse_upstreams
from plexus.errors import AlreadyExists, Conflict, InUse, InvalidArgument, NotFound, PlexusError
from plexus.ipam import allocator, hostblocks
from plexus.model import keys, parse
from plexus.model.drivers import OFFLOAD_OPTION, traits
from plexus.model.types import Endpoint, IPNetwork, Network, Subnet
from plexus.services.context import Context, network_object
from plexus.store.base import Compare, Delete, Op, Put

Detach = Callable[[Sequence[Endpoint]], Awaitable[None]]
BUILTIN_LABEL = "plexus.builtin"
# Networks every agent has, as Docker has them: the host's own namespace, and loopback only.
BUILTINS = (("host", "host"), ("none", "none"))
FIRST_VNI = 4096  # automatic VXLAN ids start here (as Docker's overlay driver's do)
MAX_VNI = (1 << 24) - 1
OVERLAY_PREFIX4 = 20  # an automatic overlay subnet: 64 blocks of /26


@dataclass(frozen=True)
class NetworkSpec:
    """A request to create a network, as front doors hand it in (strings, unvalidated)."""

    name: str
    driver: str = "bridge"
    subnets: Sequence[str] = ()
    gateways: Sequence[str] = ()
    ip_ranges: Sequence[str] = ()
    ipv6: bool = False
    internal: bool = False
    mtu: int = 1500
    labels: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    # A subnet claim holding this value (an IPAM pool's, e.g. "pool:docker") is taken over by
    # the new network instead of being a conflict.
    adopt_claim: str = ""
    dns_upstreams: Sequence[str] = ()  # IP[:PORT] resolvers for this network's names
    vni: int = 0  # a spanning network's VXLAN id (0: the next free one)
    block_size: int = 0  # its per-host blocks' IPv4 prefix length (0: the default, /26)


def _explicit_subnets(spec: NetworkSpec) -> list[Subnet]:
    cidrs = [parse.cidr("subnet", s) for s in spec.subnets]
    gateways = [parse.address("gateway", g) for g in spec.gateways]
    ranges = [parse.cidr("ip-range", r) for r in spec.ip_ranges]
    for i, a in enumerate(cidrs):
        for b in cidrs[i + 1 :]:
            if a.overlaps(b):
                raise InvalidArgument("subnet", str(b), f"overlaps {a} of the same network")
    subnets = []
    for cidr in cidrs:
        mine = [g for g in gateways if g in cidr]
        if len(mine) > 1:
            raise InvalidArgument("gateway", str(mine[1]), f"a second gateway for {cidr}")
        gw = mine[0] if mine else None
        rng = next((r for r in ranges if r.version == cidr.version and r.subnet_of(cidr)), None)  # type: ignore[arg-type]
        if gw is not None and gw in allocator.unusable(cidr):
            raise InvalidArgument("gateway", str(gw), f"reserved address of {cidr}")
        subnets.append(Subnet(cidr, gw or allocator.first_host(cidr), rng))
    for gw in gateways:
        if not any(gw in c for c in cidrs):
            raise InvalidArgument("gateway", str(gw), "not inside any --subnet")
    for rng in ranges:
        if not any(s.ip_range == rng for s in subnets):
            raise InvalidArgument("ip-range", str(rng), "not inside any --subnet")
    return subnets


def _options(spec: NetworkSpec) -> dict[str, str]:
    options = dict(spec.options)
    offload = options.get(OFFLOAD_OPTION)
    if offload is not None and (offload not in ("on", "off") or spec.driver != "overlay"):
        raise InvalidArgument(f"opt {OFFLOAD_OPTION}", offload,
                              "on or off, on an overlay network")
    if spec.dns_upstreams:
        options[OPTION_UPSTREAMS] = format_upstreams(parse_upstreams(spec.dns_upstreams))
    return options


class NetworkService:
    def __init__(self, ctx: Context, detach: Detach) -> None:
        self.ctx = ctx
        self._detach = detach  # the endpoint service's, for a forced removal

    def all(self) -> list[Network]:
        return sorted(self.ctx.cache.networks.values(), key=lambda n: n.name)

    def get(self, name: str) -> Network:
        net = self.ctx.cache.network(name)
        if net is None:
            raise NotFound(f"network {name!r} not found")
        return net

    async def create(self, spec: NetworkSpec) -> Network:
        net = await self._build(spec)
        claims = [keys.subnet(s.cidr) for s in net.subnets]
        claims += [keys.vni(net.vni)] if net.vni else []
        guards = [await self._claim_guard(c, spec.adopt_claim) for c in claims]
        result = await self.ctx.commit(
            [Compare.absent(keys.network(net.name)), *guards],
            [Put(keys.network(net.name), net.to_json()), *(Put(c, net.name) for c in claims)],
        )
        if not result.succeeded:
            if await self.ctx.store.get(keys.network(net.name)) is not None:
                raise AlreadyExists(f"network {net.name!r} already exists")
            held = await self.ctx.store.get(keys.vni(net.vni)) if net.vni else None
            if held is not None:
                raise Conflict(f"vni {net.vni} is in use by network {held.value!r}")
            raise Conflict(f"a subnet of {net.name!r} was claimed meanwhile; try again")
        try:
            await self.ctx.settle(result.revision, [network_object(net.name)])
        except PlexusError:
            await self._forget(net)
            raise
        return net

    async def _claim_guard(self, claim: str, adopt: str) -> Compare:
        if adopt:
            kv = await self.ctx.store.get(claim)
            if kv is not None and kv.value == adopt:
                return Compare(claim, "value", "==", adopt)
        return Compare.absent(claim)

    async def _build(self, spec: NetworkSpec) -> Network:
        parse.name("name", spec.name)
        kind = traits(parse.driver(spec.driver))
        parse.mtu(spec.mtu)
        if self.ctx.cache.network(spec.name) is not None:
            raise AlreadyExists(f"network {spec.name!r} already exists")
        subnets: list[Subnet] = []
        if kind.subnets:
            subnets = _explicit_subnets(spec)
            await self._check_overlaps(subnets, spec.adopt_claim)
            subnets += await self._auto_subnets(spec, subnets, kind.spans_hosts)
        elif spec.subnets:
            raise InvalidArgument("subnet", spec.subnets[0], f"driver {kind.name} takes no subnets")
        vni, block_size = self._spanning(spec, kind.spans_hosts, subnets)
        return Network(
            name=spec.name,
            id=secrets.token_hex(16),
            driver=kind.name,
            subnets=tuple(subnets),
            ipv6=spec.ipv6 or any(s.version == 6 for s in subnets),
            internal=spec.internal,
            mtu=spec.mtu,
            labels=dict(spec.labels),
            options=_options(spec),
            created=time.time(),
            vni=vni,
            block_size=block_size,
        )

    def _spanning(self, spec: NetworkSpec, spans: bool,
                  subnets: list[Subnet]) -> tuple[int, int]:
        """(VNI, block size) of a network that spans hosts; (0, 0) for any other."""
        if not spans:
            for name, value in (("vni", spec.vni), ("block-size", spec.block_size)):
                if value:
                    raise InvalidArgument(name, str(value), "only for --driver overlay")
            return 0, 0
        if spec.ip_ranges:  # hosts take whole blocks of the subnet
            raise InvalidArgument("ip-range", spec.ip_ranges[0], "not for --driver overlay")
        block_size = spec.block_size or hostblocks.DEFAULT_BLOCK_SIZE
        hostblocks.check_block_size(block_size, [s.cidr for s in subnets])
        for s in subnets:
            hostblocks.check_gateway(s, block_size)
        used = {n.vni: n.name for n in self.ctx.cache.networks.values() if n.vni}
        if not spec.vni:
            return next(v for v in range(FIRST_VNI, MAX_VNI + 1) if v not in used), block_size
        if not 1 <= spec.vni <= MAX_VNI:
            raise InvalidArgument("vni", str(spec.vni), f"a VXLAN id, 1 to {MAX_VNI}")
        if spec.vni in used:
            raise Conflict(f"vni {spec.vni} is in use by network {used[spec.vni]!r}")
        return spec.vni, block_size

    async def taken_prefixes(self, adopt: str = "") -> list[tuple[IPNetwork, str]]:
        """What a new subnet must not overlap, with where each comes from: networks, subnets
        held by an IPAM pool (except ``adopt``), and this host's addresses and routes (not those
        of plexus's own bridges)."""
        nets = list(self.ctx.cache.networks.values())
        taken = [(s.cidr, f"network {n.name}") for n in nets for s in n.subnets]
        taken += [(r, "the service range") for r in self.ctx.cache.service_range]
        claims, _ = await self.ctx.store.list(keys.SUBNETS)
        taken += [
            (parse.cidr("subnet", keys.segment_cidr(kv.key[len(keys.SUBNETS):])), kv.value)
            for kv in claims
            if kv.value.startswith(keys.POOL_CLAIM_PREFIX) and kv.value != adopt
        ]
        local = await self.ctx.host.local_prefixes()
        own = {n.bridge for n in self.ctx.cache.networks.values()}
        return taken + [(p, w) for p, w in local if not any(b in w for b in own)]

    async def _check_overlaps(self, subnets: list[Subnet], adopt: str = "") -> None:
        taken = await self.taken_prefixes(adopt)
        for s in subnets:
            for cidr, where in taken:
                if s.cidr.version == cidr.version and s.cidr.overlaps(cidr):
                    raise Conflict(f"subnet {s.cidr} overlaps {cidr} ({where})")

    async def _auto_subnets(self, spec: NetworkSpec, have: list[Subnet],
                            spans: bool = False) -> list[Subnet]:
        cfg = self.ctx.config
        # Subnets given are the network's subnets, as with Docker: an automatic IPv4 one only
        # when none was given (an IPv6-only --subnet makes an IPv6-only network). A network
        # that spans hosts gets room for blocks of many hosts.
        prefix4 = min(cfg.pool4_prefix, max(OVERLAY_PREFIX4, cfg.pool4.prefixlen)) if spans \
            else cfg.pool4_prefix
        wanted = [] if have else [(cfg.pool4, prefix4)]
        if spec.ipv6 and not any(s.version == 6 for s in have):
            wanted.append((cfg.pool6, cfg.pool6_prefix))
        avoid = [cidr for cidr, _ in await self.taken_prefixes()]
        out = []
        for pool, prefix in wanted:
            cidr = allocator.pick_subnet(pool, prefix, avoid)
            out.append(Subnet(cidr, allocator.first_host(cidr)))
        return out

    async def ensure_builtin(self) -> None:
        """The built-in networks exist (another host of the cluster may have made them)."""
        for name, driver in BUILTINS:
            if self.ctx.cache.network(name) is None:
                with contextlib.suppress(AlreadyExists):  # another host made it meanwhile
                    await self.create(NetworkSpec(name=name, driver=driver,
                                                  labels={BUILTIN_LABEL: "true"}))

    async def remove(self, name: str, force: bool = False) -> int:
        """Removes the network; with ``force`` its endpoints (on every host) are detached first.
        Returns how many were detached."""
        net = self.get(name)
        if net.labels.get(BUILTIN_LABEL) == "true":
            raise Conflict(f"network {name!r} is built in and cannot be removed")
        services = sorted(s.ref for s in self.ctx.cache.services.values() if s.network == name)
        if services:  # even with --force: a service is not a container to detach
            raise InUse(f"network {name!r} has {len(services)} service(s) "
                        f"({', '.join(services[:5])}); remove them first")
        users = self.ctx.cache.endpoints_on(name)
        if users and not force:
            who = ", ".join(f"{e.node}/{e.name or e.container_id[:12]}" for e in users[:5])
            raise InUse(
                f"network {name!r} has {len(users)} endpoint(s) ({who}); "
                "remove them first or use --force"
            )
        if users:
            await self._detach(users)
        await self._forget(net)
        return len(users)

    async def _forget(self, net: Network) -> None:
        """Remove every trace of ``net`` from the store, then wait until the kernel follows."""
        ops: list[Op] = [Delete(keys.network(net.name))]
        if net.vni:
            ops.append(Delete(keys.vni(net.vni)))
        for s in net.subnets:
            ops += [
                Delete(keys.subnet(s.cidr)),
                Delete(keys.ipam_prefix(s.cidr), prefix=True),
                Delete(keys.ipam_blocks(s.cidr), prefix=True),
                Delete(keys.ipam_cursor(s.cidr)),
                Delete(keys.host_blocks(s.cidr), prefix=True),
            ]
        result = await self.ctx.commit([], ops)
        await self.ctx.settle(result.revision)

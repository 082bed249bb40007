"""Services (stable VIPs and names in front of containers): create, replace, list, remove. Each
a single transaction: the service, its VIP claims and its published host port claims together,
or nothing (``keys.SERVICES``, ``keys.SERVICE_IPS``, ``keys.SERVICE_PORTS``).

VIPs come from the cluster's service range (``lb.vips``), chosen when the first service needs
one unless ``--service-cidr`` gave it; a VIP given with ``--ip`` must lie in it and be free. A
service gets one VIP per family its network has and the range covers. Creating a service in a
namespace that does not exist creates the namespace, as ``plexus run --namespace`` does. What
serves it is computed from the cache (``lb.members``) by the reconcilers; ``inspect`` computes
the same from the cache.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass, field, replace

from plexus.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from plexus.lb import k8s, members, vips
from plexus.lb.spec import Publish, Service
from plexus.model import keys
from plexus.model.types import DEFAULT_NAMESPACE, Endpoint, IPAddress, IPNetwork
from plexus.services import namespaces
from plexus.services.context import Context
from plexus.store.base import Compare, Delete, Op, Put, TxnResult

log = logging.getLogger("plexus.services")
RANGE_ATTEMPTS = 5  # another host storing the range at the same moment: read theirs
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # an RFC 1035 label, as Kubernetes


def check_name(field: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(field, name, "a service name is 1-63 lowercase letters, digits "
                              "and '-', starting with a letter")
    return name


@dataclass(slots=True)
class Planned:
    """What plans of one transaction have taken so far (``plexus apply`` plans several)."""

    vips: set[IPAddress] = field(default_factory=set)
    ports: set[tuple[str, int]] = field(default_factory=set)  # (protocol, host port)
    new_range: tuple[IPNetwork, ...] = ()  # the default range, chosen by this transaction
    range_written: bool = False  # ... and the plan that stores it made


@dataclass(frozen=True, slots=True)
class Plan:
    service: Service
    compares: list[Compare]
    ops: list[Op]
    outcome: str  # "created", "configured", "unchanged"


class ServiceRegistry:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- the range ----------------------------------------------------------------------------

    async def ensure_range(self, given: Sequence[IPNetwork]) -> tuple[IPNetwork, ...]:
        """At start-up: an explicit ``--service-cidr`` (``given``) replaces the stored range.
        Without one nothing is written: the default is chosen when the first service needs a
        VIP (``range``), so an agent that never serves reserves no addresses (a network may
        still take 10.96.0.0/16, and the default then avoids it)."""
        if not given:
            return self.ctx.cache.service_range
        ranges = tuple(given)
        for _ in range(RANGE_ATTEMPTS):
            stored = await self.ctx.store.get(keys.SERVICE_RANGE)
            if stored is not None and stored.value == vips.dumps(ranges):
                return ranges
            result = await self.ctx.commit([Compare.unchanged(stored, keys.SERVICE_RANGE)],
                                           [Put(keys.SERVICE_RANGE, vips.dumps(ranges))])
            if result.succeeded:
                return ranges
        raise Conflict("the service range kept changing meanwhile; try again")

    async def range(self, planned: Planned | None = None) -> tuple[IPNetwork, ...]:
        """The cluster's service range: the stored one; else the one this transaction chose
        already; else the default, which the transaction of the service that needs it stores
        (``planned.new_range``, absent-only: of two hosts choosing at once, one wins and the
        other retries with the stored range), so a request that fails stores no range."""
        if self.ctx.cache.service_range:
            return self.ctx.cache.service_range
        stored = await self.ctx.store.get(keys.SERVICE_RANGE)
        if stored is not None:
            return vips.loads(stored.value)
        if planned is not None and planned.new_range:
            return planned.new_range
        ranges, crowded = vips.default(await self._avoid())
        for r in crowded:
            log.warning("every default service range overlaps this host's routes or "
                        "networks; using %s (choose one with --service-cidr)", r)
        if planned is not None:
            planned.new_range = ranges
        return ranges

    async def _avoid(self) -> list[IPNetwork]:
        cfg = self.ctx.config
        found = [cfg.pool4, cfg.pool6]
        found += [s.cidr for n in self.ctx.cache.networks.values() for s in n.subnets]
        found += [p for p, _ in await self.ctx.host.local_prefixes()]
        return found

    # -- reading ------------------------------------------------------------------------------

    def all(self, namespace: str = "") -> list[Service]:
        found = [s for s in self.ctx.cache.services.values()
                 if not namespace or s.namespace == namespace]
        return sorted(found, key=lambda s: (s.namespace, s.name))

    def get(self, namespace: str, name: str) -> Service:
        svc = self.ctx.cache.service(namespace or DEFAULT_NAMESPACE, name)
        if svc is None:
            raise NotFound(f"service {name} not found in namespace "
                           f"{namespace or DEFAULT_NAMESPACE}")
        return svc

    def endpoints(self, svc: Service) -> list[Endpoint]:
        """Every endpoint its selector matches, ready or not (``members.serving`` says which
        serve)."""
        return members.selected(self.ctx.cache, svc)

    def unresolved(self, svc: Service) -> list[str]:
        key = keys.service(svc.namespace, svc.name)
        ready = [ep for ep in self.endpoints(svc)
                 if members.serving(self.ctx.cache, key, svc, ep)]
        return members.unresolved(svc, ready)

    # -- writing ------------------------------------------------------------------------------

    async def create(self, svc: Service, ips: Sequence[IPAddress]) -> Service:
        """A new service (AlreadyExists if one has its name)."""
        if self.ctx.cache.service(svc.namespace, svc.name) is not None:
            raise AlreadyExists(f"service {svc.name} already exists in namespace "
                                f"{svc.namespace}")
        plan = await self._commit_plan(svc, ips, create=True)
        return plan.service

    async def put(self, svc: Service, ips: Sequence[IPAddress]) -> Plan:
        """Create or replace (``plexus apply``)."""
        return await self._commit_plan(svc, ips, create=False)

    async def _commit_plan(self, svc: Service, ips: Sequence[IPAddress], create: bool) -> Plan:
        plans: list[Plan] = []

        async def attempt() -> TxnResult | None:
            plans[:] = [await self.plan(svc, ips, create)]
            if not plans[0].ops:
                return TxnResult(True, 0)  # unchanged: nothing to write
            result = await self.ctx.commit(plans[0].compares, plans[0].ops)
            return result if result.succeeded else None

        result = await self.ctx.retrying(attempt, f"service {svc.ref}")
        if result.revision:
            await self.ctx.settle(result.revision)
        return plans[0]

    async def plan(self, svc: Service, ips: Sequence[IPAddress], create: bool = False,
                   planned: Planned | None = None, own_namespace: bool = True) -> Plan:
        """What creates or replaces ``svc`` (VIPs ``ips`` or picked; none when headless).
        ``own_namespace``: also what creates its namespace (else the caller plans that)."""
        planned = planned if planned is not None else Planned()
        check_name("name", svc.name)
        namespaces.check_name(svc.namespace)
        net = self.ctx.cache.network(svc.network)
        if net is None:
            raise InvalidArgument("network", svc.network, "no such network")
        key = keys.service(svc.namespace, svc.name)
        kv = await self.ctx.store.get(key)
        if create and kv is not None:
            raise AlreadyExists(f"service {svc.name} already exists in namespace "
                                f"{svc.namespace}")
        old = None if kv is None else Service.from_json(kv.value)
        families = sorted({s.version for s in net.subnets})
        chosen = await self._vips(svc, ips, old, families, planned)
        new = replace(svc, vips=chosen, created=old.created if old else time.time(),
                      publish=self._node_ports(svc.publish, old, planned))
        if old is not None and replace(new, created=0.0) == replace(old, created=0.0):
            return Plan(old, [], [], "unchanged")
        compares, ops = await namespaces.ensure_ops(self.ctx, [svc.namespace]) \
            if own_namespace else ([], [])
        compares.append(Compare.unchanged(kv, key))
        ops.append(Put(key, new.to_json()))
        if planned.new_range and not planned.range_written:
            compares.append(Compare.absent(keys.SERVICE_RANGE))
            ops.append(Put(keys.SERVICE_RANGE, vips.dumps(planned.new_range)))
            planned.range_written = True
        await self._claims(new, old, compares, ops)
        return Plan(new, compares, ops, "created" if old is None else "configured")

    def _node_ports(self, publish: tuple[Publish, ...], old: Service | None,
                    planned: Planned) -> tuple[Publish, ...]:
        """A NodePort without ``nodePort`` keeps the one it had, or gets a free one."""
        taken = {(p.protocol, p.host_port) for s in self.ctx.cache.services.values()
                 for p in s.publish} | planned.ports
        out = []
        for p in publish:
            if p.host_port == 0:
                kept = [o.host_port for o in (old.publish if old else ())
                        if (o.port, o.protocol) == (p.port, p.protocol)]
                free = kept or [n for n in k8s.NODE_PORTS if (p.protocol, n) not in taken][:1]
                if not free:
                    raise InvalidArgument("spec.ports.nodePort", None, "every node port is taken")
                p = replace(p, host_port=free[0])
            elif (p.protocol, p.host_port) in planned.ports:
                raise InvalidArgument("publish", str(p), "another service of this file "
                                      "publishes that host port")
            planned.ports.add((p.protocol, p.host_port))
            out.append(p)
        return tuple(out)

    async def _vips(self, svc: Service, ips: Sequence[IPAddress], old: Service | None,
                    families: list[int], planned: Planned) -> tuple[IPAddress, ...]:
        if old is not None:
            if (ips and tuple(ips) != old.vips) or svc.headless != old.headless:
                raise InvalidArgument("ip", ",".join(map(str, ips)) or "None",
                                      f"service {old.ref} has {_vips_text(old)}: a VIP "
                                      "cannot change (remove the service first)")
            return old.vips
        if svc.headless:
            return ()
        ranges = await self.range(planned)
        for ip in ips:
            if ip.version not in families:
                raise InvalidArgument("ip", str(ip), f"network {svc.network} has no "
                                      f"IPv{ip.version} subnet")
            vips.check(ranges, ip)
            await self._free(ip, planned)
        chosen = list(ips)
        for r in ranges:
            if r.version in families and not any(ip.version == r.version for ip in chosen):
                picked = vips.pick(r, _Taken(self.ctx.cache.vips, planned.vips))
                if picked is None:
                    raise InvalidArgument("service-cidr", str(r), "every VIP of the range is taken")
                chosen.append(picked)
        planned.vips.update(chosen)
        if not chosen:
            raise InvalidArgument("network", svc.network, "the service range has no part of "
                                  "the network's address families")
        return tuple(sorted(chosen, key=lambda a: a.version))

    async def _free(self, ip: IPAddress, planned: Planned) -> None:
        kv = await self.ctx.store.get(keys.service_ip(ip))
        if kv is not None:
            raise InvalidArgument("ip", str(ip), f"taken by service {kv.value}")
        if ip in planned.vips:
            raise InvalidArgument("ip", str(ip), "asked for by two services")

    async def _claims(self, new: Service, old: Service | None, compares: list[Compare],
                      ops: list[Op]) -> None:
        ref = new.ref
        for ip in set(new.vips) - set(old.vips if old else ()):
            compares.append(Compare.absent(keys.service_ip(ip)))
            ops.append(Put(keys.service_ip(ip), ref))
        mine = {keys.service_port(p.protocol, p.host_port) for p in new.publish}
        before = {keys.service_port(p.protocol, p.host_port) for p in old.publish} if old \
            else set()
        for p in new.publish:
            if (p.protocol, p.host_port) not in {(o.protocol, o.host_port) for o in
                                                 (old.publish if old else ())}:
                await self._no_container_port(p)
        for key in sorted(mine - before):
            kv = await self.ctx.store.get(key)
            if kv is not None and kv.value != ref:
                spec = next(str(p) for p in new.publish
                            if keys.service_port(p.protocol, p.host_port) == key)
                raise InvalidArgument("publish", spec, f"the host port is published by "
                                      f"service {kv.value}")
            compares.append(Compare.unchanged(kv, key))
            ops.append(Put(key, ref))
        ops.extend(Delete(k) for k in sorted(before - mine))

    async def _no_container_port(self, p: Publish) -> None:
        """A service's host port is open on every host: no container may publish it on one
        (``services.ports``, which refuses a container a port a service publishes)."""
        nodes = sorted({self.ctx.node, *self.ctx.cache.hosts})
        for node in nodes:
            kv = await self.ctx.store.get(keys.port(node, p.protocol, p.host_port))
            held = json.loads(kv.value) if kv is not None else {}
            where = "*" if p.address is None else str(p.address)
            clash = next((k for k in held if "*" in (k, where) or k == where), None)
            if clash is not None:
                raise InvalidArgument("publish", str(p), f"host port {p.host_port}/"
                                      f"{p.protocol} is published by a container on {node}")

    async def remove(self, namespace: str, name: str) -> Service:
        svc = self.get(namespace, name)
        key = keys.service(svc.namespace, svc.name)
        kv = await self.ctx.store.get(key)
        if kv is None:
            raise NotFound(f"service {name} not found in namespace {svc.namespace}")
        gone = Service.from_json(kv.value)
        ops: list[Op] = [Delete(key), *(Delete(keys.service_ip(ip)) for ip in gone.vips),
                         *(Delete(keys.service_port(p.protocol, p.host_port))
                           for p in gone.publish),
                         Delete(keys.service_healths(gone.namespace, gone.name), prefix=True)]
        result = await self.ctx.commit([Compare.unchanged(kv, key)], ops)
        if not result.succeeded:
            raise Conflict(f"service {gone.ref} changed meanwhile; try again")
        await self.ctx.settle(result.revision)
        return gone


def _vips_text(svc: Service) -> str:
    return "no VIP (headless)" if svc.headless else "VIP " + ", ".join(map(str, svc.vips))


def address(field: str, text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(field, text, "not an IP address") from None


class _Taken:
    """VIPs in use: the cache's and those planned in this transaction (no copy of either)."""

    def __init__(self, *sets: Container[IPAddress]) -> None:
        self._sets = sets

    def __contains__(self, ip: object) -> bool:
        return any(ip in s for s in self._sets)

"""The CNI verbs, run inside the agent. ``validate`` turned what a shim forwarded into a request;
this module gives each verb the semantics of the spec (SPEC.md 1.1.0) on plexus's services.

Errors leave here as ``CniError`` with the spec's code; other PlexusErrors are mapped in
``to_cni_error``, at this boundary only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from plexus.cni import config as cfg
from plexus.cni.config import CniError, CniRequest
from plexus.cni.results import add_result
from plexus.dns import dns_enabled
from plexus.errors import (
    AlreadyExists,
    Conflict,
    Exhausted,
    InvalidArgument,
    NotFound,
    NotReady,
    PlexusError,
    StoreUnavailable,
)
from plexus.ipam import hostblocks
from plexus.model.drivers import traits
from plexus.model.types import Endpoint, Network, Owner
from plexus.services.endpoints import AttachSpec, EndpointService
from plexus.services.networks import NetworkService, NetworkSpec

log = logging.getLogger("plexus.cni")
ENV_FIELDS = {"container_id", "netns", "ifname"}

Check = Callable[[Endpoint], Awaitable[list[str]]]
"""What is wrong with an endpoint in the kernel (links, addresses, published ports): a read."""


def to_cni_error(exc: PlexusError) -> CniError:
    if isinstance(exc, CniError):
        return exc
    if isinstance(exc, NotReady | StoreUnavailable):  # 11: "try again later"
        return CniError(11, exc.message)
    if isinstance(exc, InvalidArgument):
        return CniError(4 if exc.field in ENV_FIELDS else 7, exc.message)
    if isinstance(exc, NotFound):
        return CniError(7, exc.message)
    if isinstance(exc, AlreadyExists | Conflict | Exhausted):
        return CniError(999, exc.message)
    return CniError(999, exc.message)


class CniService:
    def __init__(self, networks: NetworkService, endpoints: EndpointService, check: Check,
                 dns_domain: str | None) -> None:
        self.ctx = networks.ctx
        self.networks = networks
        self.endpoints = endpoints
        self._check_kernel = check
        self.dns_domain = dns_domain  # None: the agent runs without DNS
        # Parallel first ADDs of one config would each try to create its network.
        self._creating: dict[str, asyncio.Lock] = {}

    async def handle(self, req: CniRequest) -> dict[str, Any] | None:
        if req.command == "STATUS":
            self._status()
            return None
        if not self.ctx.ready:
            raise CniError(11, "the plexus agent is starting; try again later")
        if req.mode == "main":  # in IPAM mode the top level is another plugin's business
            cfg.check_fields(req.config)
        verbs = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check, "GC": self.gc}
        verb = verbs.get(req.command)
        if verb is None:
            raise CniError(4, f"unknown CNI_COMMAND {req.command!r}")
        return await verb(req)

    def _status(self) -> None:
        if not self.ctx.ready:
            raise CniError(50, "the plexus agent is not ready (recovering state)")

    async def _network(self, req: CniRequest) -> Network:
        """The plexus network of this config: created on first use when the config describes
        it, and then required to agree with it (code 7 otherwise)."""
        spec = cfg.network_spec(req)
        existing = self.ctx.cache.network(req.network)
        if existing is None and spec is not None:
            async with self._creating.setdefault(req.network, asyncio.Lock()):
                existing = self.ctx.cache.network(req.network)
                if existing is None:
                    return await self.networks.create(spec)
        if existing is None:
            raise CniError(
                7,
                f"network {req.network!r} does not exist and the config gives "
                "no options (subnets, ...) to create it",
            )
        if spec is not None:
            _agree(existing, spec)
        return existing

    async def add(self, req: CniRequest) -> dict[str, Any]:
        net = await self._network(req)
        want = cfg.attachment(req)
        owner: Owner = "cni-ipam" if req.mode == "ipam" else "cni"
        ep = await self.endpoints.attach(
            AttachSpec(
                container_id=req.container_id,
                network=net.name,
                netns=req.netns,
                ifname=req.ifname,
                ips=want.ips,
                ports=[] if owner == "cni-ipam" else want.ports,
                mac=want.mac,
                name=want.name or req.container_id[:12],
                aliases=want.aliases,
                namespace=want.namespace,
                labels=want.labels,
                owner=owner,
                bandwidth=want.bandwidth,
                exposes=want.exposes,
                one_per_network=False,
                default_route=True,
            )
        )
        return add_result(req.version, net, ep, self._dns(req, net))

    def _dns(self, req: CniRequest, net: Network) -> dict[str, Any]:
        """The config's dns block, completed with plexus's resolver (the network's gateways)
        when the network has one."""
        given = req.config.get("dns")
        dns: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
        if self.dns_domain is not None and traits(net.driver).dns and dns_enabled(net):
            gateways = [
                str(s.gateway)
                for s in sorted(net.subnets, key=lambda s: s.version)
                if s.gateway is not None
            ]
            dns.setdefault("nameservers", gateways)
            if self.dns_domain:
                dns.setdefault("search", [self.dns_domain])
        return dns

    async def delete(self, req: CniRequest) -> None:
        # Best effort and idempotent: nothing to delete is success; no netns is fine.
        # The runtime deletes the namespace next; the kernel's veth teardown (~15-20 ms) need
        # not hold up its answer (a new ADD of the same endpoint waits for it).
        await self.endpoints.detach(req.container_id, ifname=req.ifname, missing_ok=True)

    async def check(self, req: CniRequest) -> None:
        if cfg.version_tuple(req.version) < (0, 4):
            raise CniError(1, "config version does not allow CHECK")
        ep = next(
            (e for e in self.endpoints.of_container(req.container_id) if e.ifname == req.ifname),
            None,
        )
        if ep is None:
            raise CniError(3, f"no attachment for container {req.container_id} {req.ifname}")
        problems = self._check_reservation(req, ep)
        if ep.has_links:
            problems += await self._check_kernel(ep)
        if problems:
            raise CniError(999, f"CHECK failed for {ep.key}: " + "; ".join(problems))

    def _check_reservation(self, req: CniRequest, ep: Endpoint) -> list[str]:
        prev = req.config.get("prevResult") or {}
        expected = {str(ip.get("address")) for ip in prev.get("ips", []) if isinstance(ip, dict)}
        net = self.ctx.cache.network(ep.network)
        have = {str(a if net is None else hostblocks.interface(net, a)) for a in ep.addresses}
        problems = []
        if expected and expected != have:
            problems.append(f"prevResult has {sorted(expected)}, plexus holds {sorted(have)}")
        if req.netns and ep.netns and os.path.realpath(req.netns) != os.path.realpath(ep.netns):
            problems.append(f"netns {req.netns} differs from the ADD's {ep.netns}")
        return problems

    async def gc(self, req: CniRequest) -> None:
        """Release every attachment of this network (made through CNI) that the runtime no
        longer lists. Keeps going on error and reports them all."""
        if cfg.version_tuple(req.version) < (1, 1):
            raise CniError(1, "config version does not allow GC")
        valid = _valid_attachments(req.config)
        errors = []
        for ep in self.ctx.cache.endpoints_on(req.network):
            if ep.node != self.ctx.node or ep.owner not in ("cni", "cni-ipam"):
                continue
            if (ep.container_id, ep.ifname) in valid:
                continue
            try:
                await self.endpoints.release([ep])
                log.info("cni gc released %s on %s", ep.key, ep.network)
            except PlexusError as exc:
                errors.append(str(exc))
        if errors:
            raise CniError(999, "GC left errors: " + "; ".join(errors))


def _valid_attachments(config: dict[str, Any]) -> set[tuple[str, str]]:
    # The 1.1.0 tag's text says "cni.dev/attachments" (a typo, fixed later in SPEC.md);
    # libcni sends both keys, so accept either.
    items = config.get("cni.dev/valid-attachments")
    if items is None:
        items = config.get("cni.dev/attachments", [])
    if not isinstance(items, list):
        raise CniError(7, f"invalid cni.dev/valid-attachments {items!r}")
    return {(str(a.get("containerID")), str(a.get("ifname"))) for a in items if isinstance(a, dict)}


def _agree(net: Network, spec: NetworkSpec) -> None:
    """A config that describes an existing network must describe it as it is."""
    have = {str(s.cidr) for s in net.subnets}
    wanted = {str(ipaddress.ip_network(s, strict=False)) for s in spec.subnets}
    mismatches = []
    if wanted and not wanted <= have:
        mismatches.append(f"subnets {sorted(wanted)} vs {sorted(have)}")
    if spec.internal != net.internal:
        mismatches.append(f"internal {spec.internal} vs {net.internal}")
    if spec.mtu != net.mtu:
        mismatches.append(f"mtu {spec.mtu} vs {net.mtu}")
    if spec.driver != net.driver:
        mismatches.append(f"driver {spec.driver} vs {net.driver}")
    if mismatches:
        raise CniError(
            7, f"network {net.name!r} exists with other settings: " + ", ".join(mismatches)
        )

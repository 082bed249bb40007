"""The composition root: the one place that builds an agent out of its parts.

    store ──watch──▶ informer ──▶ cache ──▶ reconcilers (links, firewall, overlay, dns) ──▶ kernel
                                    ▲                 │ progress
    front doors ──▶ services ───────┴── wait ◀────────┘

Nothing else constructs a service, a reconciler or a driver: front doors get the services they
translate to, services get the context, reconcilers get the cache and their seam. ``Agent`` is
built without I/O (``build``) and then started (``start``): the informer lists the store, the
link reconciler adopts what the kernel already holds, the reconcilers start, half-made work of a
killed agent is rolled back, and everything is applied before the agent says it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plexus.agent.fullpass import FullPass
from plexus.agent.garbage import Collector
from plexus.agent.health import HealthProber
from plexus.agent.inspect import Inspector
from plexus.agent.kernel import KernelWatcher, LinkState
from plexus.agent.monitor import LoopMonitor
from plexus.agent.reconcilers import dns, lb, overlay, policy
from plexus.agent.reconcilers.dns import DnsReconciler
from plexus.agent.reconcilers.firewall import FirewallReconciler
from plexus.agent.reconcilers.lb import LbReconciler
from plexus.agent.reconcilers.links import LinkReconciler
from plexus.agent.reconcilers.overlay import OverlayReconciler
from plexus.agent.reconcilers.policy import PolicyReconciler
from plexus.api.docker.ipam import DockerIpam
from plexus.api.docker.network import DockerNetworkDriver
from plexus.api.docker.server import DockerPlugin
from plexus.api.server import Api
from plexus.cni.service import CniService
from plexus.config import AgentConfig
from plexus.dataplane.drivers import NetworkDriver
from plexus.dataplane.events import KernelEvents
from plexus.dataplane.host import LinkTable
from plexus.dataplane.nft.firewall import Firewall
from plexus.dataplane.nft.lb_table import ServiceKernel
from plexus.dataplane.nft.policy_table import PolicyKernel
from plexus.dns import DnsService, DnsSettings, parse_upstreams
from plexus.errors import PlexusError
from plexus.model import keys
from plexus.model.types import Container, Host
from plexus.observe.agent import AgentCollector
from plexus.observe.dns import DnsCollector
from plexus.observe.drops import DropCollector, DropCounters
from plexus.observe.flowmetrics import FlowCollector
from plexus.observe.flows import Directory, FlowLog
from plexus.observe.metrics import Metrics
from plexus.observe.model import ModelCollector
from plexus.observe.services import ServiceCollector
from plexus.observe.traffic import TrafficCollector
from plexus.runtime.containers import ContainerRuntime
from plexus.services import blocks, hosts
from plexus.services.context import Context, HostView
from plexus.services.endpoints import EndpointService
from plexus.services.hosts import Registration
from plexus.services.lbservices import ServiceRegistry
from plexus.services.networks import NetworkService
from plexus.services.pools import PoolService
from plexus.state.cache import Cache
from plexus.state.progress import Progress
from plexus.state.work import Reconciler
from plexus.store.base import Datastore
from plexus.store.informer import Change, Informer

log = logging.getLogger("plexus.agent")

Hook = Callable[[], Awaitable[None]]
FREEZE_EVERY = 2.0  # seconds between gc.freeze() calls while changes arrive
SWEEP_EVERY = 3600.0  # seconds between full cycle collections (after a full pass)
TABLE_CHECK_TIMEOUT = 60.0  # seconds `plexus reconcile` waits for the policy and services tables
WATCHED = (keys.NETWORKS, keys.ENDPOINTS, keys.CONTAINERS, keys.DOCKER_NETWORKS, keys.HOSTS,
           keys.HOST_LEASES, keys.HOST_BLOCKS, keys.NAMESPACES, keys.POLICIES, keys.SERVICES,
           keys.SERVICE_RANGE, keys.SERVICE_HEALTH)


def _objects(cache: Cache, change: Change) -> list[str]:
    """The reconcilers' names of what a change touches (the cache already holds it)."""
    if change.key.startswith(keys.ENDPOINTS):
        return ["ep:" + change.key, policy.ENDPOINT + change.key, lb.ENDPOINT + change.key,
                *overlay.objects(cache, change)]
    if change.key.startswith(keys.SERVICES):
        return [lb.SERVICE + change.key, dns.SERVICE + change.key]
    if change.key.startswith(keys.SERVICE_HEALTH):
        service, _ = keys.service_health_parts(change.key)
        return [lb.SERVICE + service, dns.SERVICE + service]
    if change.key.startswith(keys.POLICIES):
        return [policy.POLICIES]
    if change.key.startswith(keys.NAMESPACES):
        return [policy.NAMESPACES]
    found = overlay.objects(cache, change)
    if change.key.startswith(keys.CONTAINERS) and change.kv is not None:
        # a `plexus run` container that exited (or runs again) leaves (or rejoins) services
        node = change.key[len(keys.CONTAINERS):].split("/", 1)[0]
        for ep in cache.of_container(Container.from_json(change.kv.value).id, node):
            found += [lb.ENDPOINT + ep.store_key, dns.BACKEND + ep.store_key]
    if change.key.startswith(keys.HOSTS):
        found.append(policy.HOSTS)
    if change.key.startswith(keys.NETWORKS):
        found.append("net:" + change.key[len(keys.NETWORKS):])
    return found


@dataclass
class Agent:
    config: AgentConfig
    store: Datastore
    cache: Cache
    informer: Informer
    progress: Progress
    ctx: Context
    links: LinkReconciler
    firewall: FirewallReconciler
    overlay: OverlayReconciler
    policy: PolicyReconciler | None
    lb: LbReconciler | None
    dns_reconciler: DnsReconciler | None
    dns: DnsService | None
    networks: NetworkService
    endpoints: EndpointService
    containers: ContainerRuntime
    pools: PoolService
    cni: CniService
    collector: Collector
    fullpass: FullPass
    host: LinkTable
    registration: Registration
    block_releaser: blocks.BlockReleaser
    health: HealthProber
    monitor: LoopMonitor = field(default_factory=LoopMonitor)
    docker: DockerPlugin | None = None
    kernel: KernelWatcher | None = None
    kernel_events: KernelEvents | None = None
    flows: FlowLog | None = None
    _periodic: asyncio.Task[None] | None = None
    _block_gc: asyncio.Task[None] | None = None
    _keepalive: asyncio.Task[None] | None = None
    _health_task: asyncio.Task[None] | None = None
    _frozen_at: float = 0.0
    _swept_at: float = field(default_factory=time.monotonic)

    @property
    def reconcilers(self) -> list[Reconciler]:
        found: list[Reconciler] = [self.links, self.firewall, self.overlay]
        found += [self.policy] if self.policy is not None else []
        found += [self.lb] if self.lb is not None else []
        return found + ([self.dns_reconciler] if self.dns_reconciler is not None else [])

    def dispatch(self, changes: Sequence[Change]) -> None:
        """The informer's consumer: the cache first, then each reconciler's queue."""
        self.cache.apply(changes)
        now = time.monotonic()
        if now - self._frozen_at >= FREEZE_EVERY:
            # What the agent holds (cache, records, applied state) lives long: out of the cycle
            # collector's sight, whose full collections over 5,000 endpoints' objects held the
            # loop for 40-70 ms in the middle of attaches. O(1); see _passes for the sweep.
            gc.freeze()
            self._frozen_at = now
        reconcilers = self.reconcilers
        for change in changes:
            objects = _objects(self.cache, change)
            if objects:
                for r in reconcilers:
                    taken = [o for o in objects if o.startswith(r.prefixes)]
                    if taken:
                        r.enqueue(taken, change.revision)

    def api(self) -> Api:
        return Api(self.networks, self.endpoints, self.containers, self.cni, self.dns, self)

    # -- Admin (what the API asks the agent itself) -------------------------------------------

    async def policy_counters(self) -> dict[str, dict[str, int]]:
        return await self.policy.counters() if self.policy is not None else {}

    def flow_log(self) -> FlowLog | None:
        return self.flows

    def status(self) -> dict[str, Any]:
        return {
            "revision": self.informer.revision,
            "applied": self.progress.applied(),
            "relists": self.informer.relists,
            "reconcilers": {r.name: {"queued": r.busy, "processed": r.processed,
                                     "errors": len(r.errors)} for r in self.reconcilers},
            "errors": self.progress.errors(),
            "firewall_repairs": self.firewall.repairs,
            "kernel_repairs": self.kernel.repairs if self.kernel is not None else 0,
            "full_passes": self.fullpass.passes,
            **self.monitor.status(),
        }

    async def reconcile(self) -> dict[str, Any]:
        """The full pass, then the policy and services tables checked (and rewritten if they
        drifted) before answering: ``plexus reconcile`` repairs everything it can see."""
        result = await self.fullpass.run()
        for reconciler, key in ((self.policy, policy.VERIFY), (self.lb, lb.VERIFY)):
            if reconciler is not None:
                await asyncio.wait_for(reconciler.check(key), TABLE_CHECK_TIMEOUT)
        return result

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Everything up to "ready" (the API may already be answering "starting")."""
        # First: a node name another live agent holds is refused before anything is touched.
        await self.registration.register()
        self._keepalive = asyncio.create_task(self.registration.run(), name="host-lease")
        self.monitor.start()
        await self.informer.start()
        adopted = await self.fullpass.adopt()
        log.info("adopted %d objects the kernel already holds", adopted)
        if self.dns is not None:
            await self.dns.start()
        for r in self.reconcilers:
            r.start()
        if self.kernel is not None and self.kernel_events is not None:
            await self.kernel.start(self.kernel_events)
        await self.ctx.settle(self.informer.revision)
        rolled = await self.collector.recover()
        if rolled:
            log.info("rolled back what a killed agent left half-made: %s", ", ".join(rolled))
        await self.networks.ensure_builtin()
        await ServiceRegistry(self.ctx).ensure_range(self.config.service_cidrs)
        self.ctx.ready = True

    def run_periodic(self) -> None:
        self._periodic = asyncio.create_task(self._passes(), name="full-pass")
        self._health_task = asyncio.create_task(self.health.run(), name="readiness-checks")
        if self.config.block_release_after:
            self._block_gc = asyncio.create_task(self._release_blocks(), name="block-gc")

    async def _release_blocks(self) -> None:
        """This host's empty blocks back to the pool (``services.blocks``)."""
        every = blocks.interval(self.config.block_release_after)
        while True:
            await asyncio.sleep(every)
            await self.block_releaser.run_once()

    async def _passes(self) -> None:
        """The full pass now and then every ``reconcile_interval``. After each, what the agent
        holds is moved out of the cycle collector's sight (gc.freeze): with thousands of
        endpoints a full collection walks every object and held the loop for 100+ ms; what
        is frozen is still freed by reference counting when it goes away."""
        while True:
            try:
                await self.fullpass.run()
                if self.policy is not None:
                    self.policy.enqueue([policy.VERIFY])
                if self.lb is not None:
                    self.lb.enqueue([lb.VERIFY])
                if self.config.host_gc_after:
                    await hosts.collect_expired(self.store, self.cache,
                                                self.config.host_gc_after)
            except PlexusError as exc:
                log.error("full pass failed: %s", exc)
            if time.monotonic() - self._swept_at >= SWEEP_EVERY:
                # Cycles that became garbage after they were frozen are only found by a full
                # collection of everything: one per hour, after a pass, bounds what they hold.
                gc.unfreeze()
                gc.collect()
                self._swept_at = time.monotonic()
            gc.freeze()
            await asyncio.sleep(self.config.reconcile_interval)

    async def close(self) -> None:
        for task in (self._periodic, self._block_gc, self._keepalive, self._health_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.kernel is not None:
            await self.kernel.close()
        await self.collector.close()
        await self.health.close()
        await self.endpoints.leftovers.close()
        for r in self.reconcilers:
            await r.close()
        await self.informer.close()
        if self.dns is not None:
            await self.dns.close()
        await self.host.close()
        await self.registration.close()
        await self.monitor.close()  # the store is the caller's: it opened it


def add_metrics(metrics: Metrics, agent: Agent, firewall: DropCounters) -> None:
    """The collectors of an agent's metrics (``plexus.observe``); services and policies add
    theirs here as they land."""
    metrics.add("model", ModelCollector(agent.cache))
    metrics.add("traffic", TrafficCollector(agent.cache))
    metrics.add("drops", DropCollector(firewall, agent.policy_counters))
    metrics.add("agent", AgentCollector(lambda: agent.reconcilers, metrics.timings))
    metrics.add("services", ServiceCollector(agent.cache))
    if agent.flows is not None:
        metrics.add("flows", FlowCollector(agent.flows))
    if agent.dns is not None:
        metrics.add("dns", DnsCollector(agent.dns.stats))


def dns_service(config: AgentConfig) -> DnsService | None:
    if not config.dns:
        return None
    upstreams = parse_upstreams(config.dns_upstreams)
    settings = DnsSettings(domain=config.dns_domain, ttl=config.dns_ttl, upstreams=upstreams)
    # Without --dns-upstream, follow the host's resolv.conf (re-read when it changes).
    follow = None if upstreams else Path("/etc/resolv.conf")
    return DnsService(settings, workers=config.dns_workers, follow=follow)


def build(config: AgentConfig, store: Datastore, drivers: Mapping[str, NetworkDriver],
          firewall: Firewall, host_view: HostView, host: LinkTable,
          dns: DnsService | None = None, docker_exceptions: Hook | None = None,
          kernel_events: KernelEvents | None = None,
          link_state: LinkState | None = None, cache: Cache | None = None,
          policy_kernel: PolicyKernel | None = None,
          lb_kernel: ServiceKernel | None = None) -> Agent:
    """An agent of these parts (the daemon passes the real ones, unit tests fakes).
    ``docker_exceptions``: keeps dockerd's FORWARD DROP from dropping plexus's traffic;
    ``kernel_events``: the host namespace's link and address notifications; ``cache``: the
    one the drivers were given a view of (a new one if None)."""
    cache = cache if cache is not None else Cache(config.node)
    holder: list[Agent] = []
    informer = Informer(store, keys.ROOT, lambda changes: holder[0].dispatch(changes),
                        on_advance=lambda rev: holder[0].progress.advanced(rev),
                        wanted=lambda key: key.startswith(WATCHED))
    links = LinkReconciler(cache, drivers, lambda ep: holder[0].collector.release_gone(ep),
                           workers=config.link_workers)
    fw = FirewallReconciler(cache, firewall, docker_exceptions)
    spanning = overlay.OverlayReconciler(cache, drivers)
    dns_reconciler = DnsReconciler(cache, dns) if dns is not None else None
    policies = policy.PolicyReconciler(cache, policy_kernel) if policy_kernel else None
    balancer = LbReconciler(cache, lb_kernel) if lb_kernel is not None else None
    reconcilers: list[Reconciler] = [links, fw, spanning,
                                     *([dns_reconciler] if dns_reconciler else []),
                                     *([policies] if policies else []),
                                     *([balancer] if balancer else [])]
    progress = Progress(informer, reconcilers)
    ctx = Context(config, store, cache, progress, host_view)
    endpoints = EndpointService(ctx)
    networks = NetworkService(ctx, endpoints.release)
    domain = config.dns_domain if dns is not None else None
    containers = ContainerRuntime(ctx, endpoints, domain)
    inspector = Inspector(drivers, firewall, cache)
    collector = Collector(ctx, endpoints, containers)
    agent = Agent(
        config=config, store=store, cache=cache, informer=informer, progress=progress, ctx=ctx,
        links=links, firewall=fw, overlay=spanning, policy=policies, lb=balancer,
        dns_reconciler=dns_reconciler, dns=dns,
        networks=networks, endpoints=endpoints, containers=containers,
        pools=PoolService(ctx, networks),
        cni=CniService(networks, endpoints, inspector.endpoint_problems, domain),
        collector=collector,
        fullpass=FullPass(cache, drivers, host, links, fw, dns_reconciler, collector, spanning),
        host=host,
        registration=Registration(store, Host(config.node, config.advertise_address,
                                              config.agent_id or config.node)),
        block_releaser=blocks.BlockReleaser(store, cache, config.block_release_after),
        health=HealthProber(ctx),
    )
    holder.append(agent)
    if config.flows:
        agent.flows = FlowLog(Directory(lambda: cache.endpoints.values(), config.node),
                              capacity=config.flow_capacity, rate=config.flow_rate,
                              reason_of=policies.reason if policies else None,
                              export=config.flow_export)
    if kernel_events is not None and link_state is not None:
        agent.kernel = KernelWatcher(cache, links, agent.fullpass.run, link_state, host.owner)
        agent.kernel_events = kernel_events
    if config.docker_plugin_socket is not None:
        driver = DockerNetworkDriver(networks, endpoints, agent.pools, config.docker_api,
                                     docker_exceptions or _nothing)
        agent.docker = DockerPlugin(ctx, DockerIpam(agent.pools), driver)
    return agent


async def _nothing() -> None:
    return None

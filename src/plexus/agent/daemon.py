"""`plexus agent`: open the real parts, wire them (``wiring.build``), serve, run until told to stop.

Stopping the agent leaves the network as it is (like dockerd's live-restore): containers keep
their links, addresses and firewall elements, and the next agent adopts them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from plexus.agent import exclusive, identity, wiring
from plexus.agent.migrate import migrate
from plexus.agent.reconcilers.overlay import CachePeers
from plexus.api.server import serve
from plexus.config import AgentConfig
from plexus.dataplane import docker_user
from plexus.dataplane.drivers import build_drivers, close_drivers
from plexus.dataplane.events import KernelEvents
from plexus.dataplane.host import HostNetlink
from plexus.dataplane.nft.firewall import NftFirewall
from plexus.dataplane.nft.lb_table import ServiceTable
from plexus.dataplane.nft.libnft import open_nft
from plexus.dataplane.nft.policy_table import PolicyTable
from plexus.dataplane.nft.setelem import ElementChannel
from plexus.errors import DataplaneError, InvalidArgument
from plexus.model import parse
from plexus.observe import server as metrics_server
from plexus.observe.flows import FlowLog
from plexus.observe.http import api_timer, docker_timer
from plexus.observe.kernel import KernelFlows
from plexus.observe.metrics import Metrics
from plexus.observe.store import TimedStore, engine_of
from plexus.observe.web import WebView
from plexus.services import hosts
from plexus.state.cache import Cache
from plexus.store import open_store

log = logging.getLogger("plexus.agent")


async def _docker_exceptions() -> None:
    await docker_user.ensure_accept_rules()


async def _advertise_address(config: AgentConfig, host: HostNetlink) -> str:
    """``--advertise-address`` if this host has it, else the default route's interface's."""
    if config.advertise_address:
        ip = parse.address("advertise-address", config.advertise_address)
        if not await host.has_address(ip):
            raise InvalidArgument("advertise-address", config.advertise_address,
                                  "not an address of this host")
        return str(ip)
    found = await host.default_route_address()
    return "" if found is None else str(found)


async def run_agent(config: AgentConfig) -> None:
    lock = exclusive.lock_state_dir(config.state_dir)
    netns_lock = exclusive.lock_netns(config.state_dir)
    sockets = [p for p in (config.socket, config.docker_plugin_socket) if p is not None]
    for path in sockets:
        exclusive.claim_socket(path)
    loop = asyncio.get_running_loop()
    loop.add_reader(netns_lock.fileno(), exclusive.answer, netns_lock)
    cacert, cert, key = config.etcd_tls
    store = open_store(config.store_url or str(config.state_dir / "plexus.db"),
                       cacert=cacert, cert=cert, key=key)
    metrics = Metrics() if config.metrics_address else None
    if metrics is not None:
        store = TimedStore(store, engine_of(config.store_url), metrics.timings.store)
    await migrate(store)
    owner = await identity.agent_owner(store, config.node)
    host = HostNetlink(owner)
    config = replace(config, agent_id=hosts.agent_id(config.state_dir),
                     advertise_address=await _advertise_address(config, host))
    # The drivers read the cache (overlays: the other hosts and their blocks) through a view
    # made here, from the cache the agent is then built around.
    cache = Cache(config.node)
    drivers = build_drivers(host, owner, CachePeers(cache, config.advertise_address))
    nft = open_nft()  # one libnftables context, on its own thread, for both tables
    firewall = NftFirewall(nft)
    agent = wiring.build(
        config, store, drivers, firewall, host, host,
        dns=wiring.dns_service(config), docker_exceptions=_docker_exceptions,
        kernel_events=KernelEvents(None), link_state=host.link_state, cache=cache,
        policy_kernel=PolicyTable(nft, ElementChannel()), lb_kernel=ServiceTable(nft),
    )
    runners: list[web.AppRunner] = []
    made: dict[Path, tuple[int, int] | None] = {}
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    flows: KernelFlows | None = None
    try:
        if metrics is not None:  # first: a taken port stops the agent before it starts
            view = WebView(agent.cache, lambda: agent.flows)
            runners.append(await metrics_server.start(config.metrics_address, metrics, view))
            wiring.add_metrics(metrics, agent, firewall)
        # The API answers "starting" while the agent recovers (the CNI shim maps it to 11).
        api = agent.api().app()
        if metrics is not None:
            api.middlewares.insert(0, api_timer(metrics.timings.api, metrics.timings.cni))
        runners.append(await serve(api, config.socket))
        made[config.socket] = exclusive.inode(config.socket)
        await agent.start()
        if agent.docker is not None and config.docker_plugin_socket is not None:
            plugin = agent.docker.app()
            if metrics is not None:
                plugin.middlewares.append(docker_timer(metrics.timings.docker))
            runners.append(await serve(plugin, config.docker_plugin_socket))
            made[config.docker_plugin_socket] = exclusive.inode(config.docker_plugin_socket)
            log.info("docker plugin on %s", config.docker_plugin_socket)
        agent.run_periodic()
        flows = _start_flows(agent.flows)
        log.info("agent ready on %s (node %s, links tagged %s)", config.socket, config.node,
                 owner)
        await stop.wait()
    finally:
        if flows is not None:
            flows.stop()
        for runner in runners:
            await runner.cleanup()
        await agent.close()
        await close_drivers(drivers)
        await store.close()
        for path, inode in made.items():
            exclusive.release_socket(path, inode)
        loop.remove_reader(netns_lock.fileno())
        netns_lock.close()
        lock.close()
        if agent.ctx.ready:  # a refused start says why in one line, and nothing else
            log.info("agent stopped")


def _start_flows(flows: FlowLog | None) -> KernelFlows | None:
    """The flow log's kernel sources; without them the agent runs on, and says why."""
    if flows is None:
        return None
    source = KernelFlows(flows)
    try:
        source.start()
    except (DataplaneError, OSError) as exc:
        log.error("flow log off: %s", exc)
        return None
    return source


def main(config: AgentConfig, verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(run_agent(config))

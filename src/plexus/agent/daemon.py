"""`plexus agent`: wire the pieces together and run until told to stop.

Stopping the agent leaves the network as it is (like dockerd's live-restore): containers keep
their links, addresses and firewall elements, and the next agent adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import IO

from plexus.agent.core import AgentConfig, Core, log
from plexus.agent.reconcile import Reconciler
from plexus.api.docker.server import DockerPlugin
from plexus.api.server import Api, serve
from plexus.dataplane.driver import NetlinkDataplane
from plexus.dataplane.nft.firewall import NftFirewall
from plexus.dataplane.nft.libnft import open_nft
from plexus.dns import DnsService, DnsSettings, parse_upstreams
from plexus.errors import PlexusError
from plexus.store import open_store


def _lock(state_dir: Path) -> IO[str]:
    """One agent per state directory: a second one would fight the first over the kernel."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 - held for the agent's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PlexusError(f"another agent is running with state directory {state_dir}") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _dns(config: AgentConfig) -> DnsService | None:
    if not config.dns:
        return None
    upstreams = parse_upstreams(config.dns_upstreams)
    settings = DnsSettings(domain=config.dns_domain, ttl=config.dns_ttl, upstreams=upstreams)
    # Without --dns-upstream, follow the host's resolv.conf (re-read when it changes).
    follow = None if upstreams else Path("/etc/resolv.conf")
    return DnsService(settings, workers=config.dns_workers, follow=follow)


async def run_agent(config: AgentConfig) -> None:
    lock = _lock(config.state_dir)
    store = open_store(config.store_url or str(config.state_dir / "plexus.db"))
    core = Core(
        config=config,
        store=store,
        dataplane=NetlinkDataplane(),
        firewall=NftFirewall(open_nft()),
        dns=_dns(config),
    )
    api = Api(core)
    runners = [await serve(api.app(), config.socket)]
    if config.docker_plugin_socket is not None:
        plugin = DockerPlugin(core, api.networks, api.endpoints)
        runners.append(await serve(plugin.app(), config.docker_plugin_socket))
        log.info("docker plugin on %s", config.docker_plugin_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    periodic: asyncio.Task[None] | None = None
    try:
        if core.dns is not None:
            await core.dns.start()
        reconciler = Reconciler(core, api.containers)
        report = await reconciler.recover()
        log.info("recovered: %s", report if report else "nothing to repair")
        core.ready = True
        log.info("agent ready on %s (node %s)", config.socket, config.node)
        periodic = asyncio.create_task(reconciler.run_forever())
        await stop.wait()
    finally:
        if periodic is not None:
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await periodic
        for runner in runners:
            await runner.cleanup()
        if core.dns is not None:
            await core.dns.close()
        await core.dataplane.close()
        await core.store.close()
        for path in (config.socket, config.docker_plugin_socket):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        lock.close()
        log.info("agent stopped")


def main(config: AgentConfig, verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(run_agent(config))

"""`plexus agent`: open the real parts, wire them (``wiring.build``), serve, run until told to stop.

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

from aiohttp import web

from plexus.agent import wiring
from plexus.agent.migrate import migrate
from plexus.api.server import serve
from plexus.config import AgentConfig
from plexus.dataplane import docker_user
from plexus.dataplane.drivers import build_drivers
from plexus.dataplane.events import KernelEvents
from plexus.dataplane.host import HostNetlink
from plexus.dataplane.nft.firewall import NftFirewall
from plexus.dataplane.nft.libnft import open_nft
from plexus.errors import PlexusError
from plexus.store import open_store

log = logging.getLogger("plexus.agent")


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


async def _docker_exceptions() -> None:
    await docker_user.ensure_accept_rules()


async def run_agent(config: AgentConfig) -> None:
    lock = _lock(config.state_dir)
    store = open_store(config.store_url or str(config.state_dir / "plexus.db"))
    await migrate(store)
    host = HostNetlink()
    agent = wiring.build(
        config, store, build_drivers(host), NftFirewall(open_nft()), host, host,
        dns=wiring.dns_service(config), docker_exceptions=_docker_exceptions,
        kernel_events=KernelEvents(None), link_state=host.link_state,
    )
    runners: list[web.AppRunner] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # The API answers "starting" while the agent recovers (the CNI shim maps it to 11).
        runners.append(await serve(agent.api().app(), config.socket))
        await agent.start()
        if agent.docker is not None and config.docker_plugin_socket is not None:
            runners.append(await serve(agent.docker.app(), config.docker_plugin_socket))
            log.info("docker plugin on %s", config.docker_plugin_socket)
        agent.run_periodic()
        log.info("agent ready on %s (node %s)", config.socket, config.node)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await agent.close()
        await store.close()
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

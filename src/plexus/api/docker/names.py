"""Learning a Docker container's name and aliases, which the plugin API never passes.

libnetwork tells a remote driver only IDs. The names live in dockerd, so after Join the agent
asks dockerd's own API (``GET /networks/ID`` lists the containers with their endpoint IDs,
``GET /containers/ID/json`` has the aliases) and records them with the endpoint, for DNS and for
`plexus ps`. The container is still starting at Join, so this runs in the background, retrying
a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("plexus.docker")

API = "http://docker/v1.41"
ATTEMPTS = 40
PAUSE = 0.25


async def _get(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(f"{API}{path}") as resp:
        if resp.status != 200:
            return None
        return await resp.json()


async def lookup(socket: Path, network_id: str, endpoint_id: str) -> tuple[str, list[str]]:
    """(container name, aliases) of the container behind ``endpoint_id``; ("", []) if dockerd
    cannot tell in time."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket)), timeout=timeout
    ) as session:
        for _ in range(ATTEMPTS):
            found = await _find(session, network_id, endpoint_id)
            if found is not None:
                return found
            await asyncio.sleep(PAUSE)
    return "", []


async def _find(
    session: aiohttp.ClientSession, network_id: str, endpoint_id: str
) -> tuple[str, list[str]] | None:
    try:
        net = await _get(session, f"/networks/{network_id}")
        for cid, info in ((net or {}).get("Containers") or {}).items():
            if info.get("EndpointID") != endpoint_id:
                continue
            ctr = await _get(session, f"/containers/{cid}/json") or {}
            networks = (ctr.get("NetworkSettings") or {}).get("Networks") or {}
            # During start-up the per-network EndpointID may still be empty; the NetworkID
            # is there from the start.
            aliases = next(
                (
                    n.get("Aliases") or []
                    for n in networks.values()
                    if n.get("NetworkID") == network_id
                ),
                [],
            )
            name = str(ctr.get("Name") or info.get("Name") or "").lstrip("/")
            if not aliases:
                # Docker fills in Aliases (at least the short ID, on a user-defined network)
                # once the start is under way: not yet.
                return None
            return name, [str(a) for a in aliases if a != name]
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        log.debug("docker API lookup of %s: %s", endpoint_id[:12], exc)
    return None

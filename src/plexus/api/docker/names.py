"""Learning a Docker container's name, aliases and labels, which the plugin API never passes.

libnetwork tells a remote driver only IDs. The names live in dockerd, so after Join the agent
asks dockerd's own API (``GET /networks/ID`` lists the containers with their endpoint IDs,
``GET /containers/ID/json`` has the aliases) and records them with the endpoint, for DNS and for
`plexus ps`. The container is still starting at Join, so this runs in the background, retrying
a bounded number of times.

Labels decide policy, so they must be known before the container runs: :func:`labels` is asked
during Join itself, and so uses only calls that dockerd answers while it holds the starting
container's lock (checked with docker.io 20.10): ``GET /networks/ID`` already lists the joining
endpoint (as ``ep-ENDPOINTID``, with the container's name, which is the endpoint's), and
``GET /containers/json`` reads dockerd's lock-free view, which has the labels since create.
``GET /containers/ID/json`` would wait for the start to finish, which waits for the Join.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


LABEL_ATTEMPTS = 12


async def labels(socket: Path, network_id: str, endpoint_id: str) -> tuple[str, dict[str, str]]:
    """(name, labels) of the container joining through ``endpoint_id``, answered during Join.
    Raises ``LookupError`` if dockerd cannot tell in time."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket)), timeout=timeout
    ) as session:
        for _ in range(LABEL_ATTEMPTS):
            try:
                found = await _labels(session, network_id, endpoint_id)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.debug("docker API labels of %s: %s", endpoint_id[:12], exc)
                found = None
            if found is not None:
                return found
            await asyncio.sleep(PAUSE)
    raise LookupError(f"dockerd ({socket}) did not say which container endpoint "
                      f"{endpoint_id[:12]} belongs to")


async def _labels(session: aiohttp.ClientSession, network_id: str,
                  endpoint_id: str) -> tuple[str, dict[str, str]] | None:
    net = await _get(session, f"/networks/{network_id}") or {}
    name = next((str(info.get("Name") or "") for info in (net.get("Containers") or {}).values()
                 if info.get("EndpointID") == endpoint_id), "")
    if not name:
        return None
    # The name filter is a regular expression; names are [a-zA-Z0-9][a-zA-Z0-9_.-]*, so only
    # "." needs escaping, and the exact match is checked here anyway.
    query = json.dumps({"name": [f"^/{name.replace('.', '[.]')}$"]})
    listed = await _get(session, f"/containers/json?all=1&filters={quote(query)}") or []
    for ctr in listed:
        if f"/{name}" in (ctr.get("Names") or []):
            return name, {str(k): str(v) for k, v in (ctr.get("Labels") or {}).items()}
    return None

"""The Docker plugin socket: libnetwork's remote NetworkDriver and IpamDriver over HTTP.

Docker POSTs JSON (Content-Type application/vnd.docker.plugins.v1.x+json, which aiohttp's
``request.json()`` accepts as it does not check the type). A semantic failure is HTTP 200 with
``{"Err": ...}`` for the network driver and ``{"Error": ...}`` for IPAM; unknown methods are 404,
which libnetwork takes as "not implemented" for the optional ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from plexus.api.docker.ipam import DockerIpam
from plexus.api.docker.network import DockerNetworkDriver
from plexus.errors import PlexusError
from plexus.services.context import Context

log = logging.getLogger("plexus.docker")

Call = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"


def _static(answer: dict[str, Any]) -> Call:
    async def call(body: dict[str, Any]) -> dict[str, Any]:
        return answer

    return call


class DockerPlugin:
    def __init__(self, ctx: Context, ipam: DockerIpam, driver: DockerNetworkDriver) -> None:
        self.ctx = ctx
        self.ipam = ipam
        self.driver = driver

    def app(self) -> web.Application:
        app = web.Application()
        d, i = self.driver, self.ipam
        app.router.add_post(
            "/Plugin.Activate",
            self._handler(
                _static({"Implements": ["NetworkDriver", "IpamDriver"]}), "Err", needs_ready=False
            ),
        )
        network: dict[str, Call] = {
            "GetCapabilities": _static({"Scope": "local", "ConnectivityScope": "local"}),
            "CreateNetwork": d.create_network,
            "DeleteNetwork": d.delete_network,
            "CreateEndpoint": d.create_endpoint,
            "DeleteEndpoint": d.delete_endpoint,
            "EndpointOperInfo": d.endpoint_info,
            "Join": d.join,
            "Leave": d.leave,
            "ProgramExternalConnectivity": d.program_external,
            "RevokeExternalConnectivity": d.revoke_external,
            "DiscoverNew": _static({}),
            "DiscoverDelete": _static({}),
        }
        ipam: dict[str, Call] = {
            "GetCapabilities": _static(
                {"RequiresMACAddress": False, "RequiresRequestReplay": False}
            ),
            "GetDefaultAddressSpaces": _static(
                {
                    "LocalDefaultAddressSpace": "plexus-local",
                    "GlobalDefaultAddressSpace": "plexus-global",
                }
            ),
            "RequestPool": i.request_pool,
            "ReleasePool": i.release_pool,
            "RequestAddress": i.request_address,
            "ReleaseAddress": i.release_address,
        }
        for name, call in network.items():
            app.router.add_post(f"/NetworkDriver.{name}", self._handler(call, "Err"))
        for name, call in ipam.items():
            app.router.add_post(f"/IpamDriver.{name}", self._handler(call, "Error"))
        return app

    def _handler(
        self, call: Call, err_field: str, needs_ready: bool = True
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw.strip() else {}
                if needs_ready:
                    self.ctx.require_ready()
                answer = await call(body if isinstance(body, dict) else {})
            except PlexusError as exc:
                log.info("docker %s failed: %s", request.path, exc.message)
                answer = {err_field: exc.message}
            except (ValueError, KeyError, TypeError) as exc:
                answer = {err_field: f"malformed request to {request.path}: {exc}"}
            return web.json_response(answer, content_type=CONTENT_TYPE)

        return handle

"""The opt-in TCP listener (``plexus agent --metrics-address``): ``GET /metrics``, and the web
view's page and its JSON and streams (``observe.web``) on the same listener.

Loopback by default: ``:9090`` or a bare ``9090`` means 127.0.0.1, so containers (which reach the
host only through their bridge's address) never see it unless the operator names an address.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from plexus.errors import InvalidArgument
from plexus.observe.metrics import Metrics
from plexus.observe.web import WebView

log = logging.getLogger("plexus.observe")
LOOPBACK = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port); loopback if no host."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        host, port_text = "", text.strip()
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidArgument("metrics-address", text, "expected HOST:PORT or PORT") from None
    if not 1 <= port <= 65535:
        raise InvalidArgument("metrics-address", text, "the port must be 1 to 65535")
    if not host:
        return LOOPBACK, port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise InvalidArgument("metrics-address", text,
                                  "the host must be an IP address or localhost") from None
    return host, port


def routes(app: web.Application, metrics: Metrics, view: WebView | None = None) -> None:
    """Everything the listener serves: the metrics, and the web view's pages."""

    async def serve_metrics(request: web.Request) -> web.Response:
        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", serve_metrics)
    if view is not None:
        view.add_routes(app)


@web.middleware
async def _not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return web.Response(status=404,
                            text=f"404: no page at {request.path} (try / or /metrics)\n")


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "is already in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "is not an address of this host"
    return f"cannot be listened on: {os.strerror(exc.errno or 0)}"


async def start(address: str, metrics: Metrics, view: WebView | None = None) -> web.AppRunner:
    """Listen on ``address``; a port already taken or an address this host lacks: one
    ``InvalidArgument`` line (the agent exits with it before it starts)."""
    host, port = parse_address(address)
    app = web.Application(middlewares=[_not_found])
    routes(app, metrics, view)
    # Open flow streams end on shutdown (``WebView``); the rest of a request is short.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise InvalidArgument("metrics-address", address,
                              f"{host}:{port} {_why(exc)}") from None
    log.info("metrics on http://%s:%d/metrics, web view on http://%s:%d/", host, port, host,
             port)
    return runner

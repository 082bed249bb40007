"""Request timing for the agent's HTTP front doors (API, CNI, Docker plugin): an aiohttp
middleware that observes one duration per request, labelled by the route's template (never the
path: ``/v1/containers/{name}``), so the label set is fixed by code.

The CNI shims all call ``POST /v1/cni``: those requests are timed by CNI command (from the body
aiohttp has already read and kept) and result (the shim's exit code, ``X-CNI-Exit``) instead.
"""

from __future__ import annotations

import json
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from plexus.observe.timing import Timings

CNI_PATH = "/v1/cni"
CNI_COMMANDS = frozenset(("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"))


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _status(exc: BaseException) -> int:
    return exc.status if isinstance(exc, web.HTTPException) else 500


def api_timer(api: Timings, cni: Timings) -> Middleware:
    @web.middleware
    async def timer(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except BaseException as exc:
            api.since((request.method, route_of(request), str(_status(exc))), started)
            raise
        if request.path == CNI_PATH:
            ok = response.headers.get("X-CNI-Exit") == "0"
            cni.since((await _cni_command(request), "ok" if ok else "error"), started)
        else:
            api.since((request.method, route_of(request), str(response.status)), started)
        return response

    return timer


def docker_timer(docker: Timings) -> Middleware:
    @web.middleware
    async def timer(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except BaseException as exc:
            docker.since((route_of(request).lstrip("/"), str(_status(exc))), started)
            raise
        docker.since((route_of(request).lstrip("/"), str(response.status)), started)
        return response

    return timer


async def _cni_command(request: web.Request) -> str:
    """The request's CNI_COMMAND, or "other" (the label set stays the spec's verbs)."""
    try:
        env = json.loads(await request.read()).get("env", {})
        command = str(env.get("CNI_COMMAND", "")) if isinstance(env, dict) else ""
    except (ValueError, AttributeError):
        return "other"
    return command if command in CNI_COMMANDS else "other"

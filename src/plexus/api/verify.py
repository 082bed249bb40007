"""``POST /v1/verify``: the agent probes what the model promises from its containers'
namespaces (``observe.verify``); translation only."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from plexus.api import body
from plexus.errors import InvalidArgument, NotFound
from plexus.observe import verify
from plexus.observe.expect import Model
from plexus.services.context import Context

MAX_TIMEOUT = 10.0


class VerifyApi:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # One verify at a time: two would share the neighbour tables' budget (observe.neigh)
        # and each other's timeouts.
        self._one = asyncio.Lock()

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_post("/v1/verify", self.verify)

    async def verify(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        network = body.get(b, "network", str, "") or None
        timeout = body.get(b, "timeout", float, verify.TIMEOUT)
        if not 0 < timeout <= MAX_TIMEOUT:
            raise InvalidArgument("timeout", timeout, f"expected seconds in (0, {MAX_TIMEOUT:g}]")
        if network is not None and self.ctx.cache.network(network) is None:
            raise NotFound(f"network {network!r} not found")
        async with self._one:
            found = await verify.verify(Model.of(self.ctx.cache), network, timeout)
        if not body.get(b, "all", bool, True):  # the disagreements and counts are enough
            found["probes"] = []
        # Off the event loop: every probe of 200 containers is ~16 MB of JSON.
        text = await asyncio.get_running_loop().run_in_executor(None, json.dumps, found)
        return web.Response(text=text, content_type="application/json")

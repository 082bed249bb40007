"""``GET /v1/flows``: the flow log's records that match a filter, or (``follow=1``) a stream of
them as they come, one JSON object a line (``observe.flows``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp import web

from plexus.errors import InvalidArgument, Unsupported
from plexus.observe.flows import Filter, Flow, FlowLog

FOLLOW_IDLE = 1.0  # seconds between checks that the client is still there


class FlowsApi:
    def __init__(self, flows: Callable[[], FlowLog | None]) -> None:
        self._flows = flows

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/v1/flows", self.flows)

    def _log(self) -> FlowLog:
        found = self._flows()
        if found is None:
            raise Unsupported("the flow log is off (plexus agent --no-flows)")
        return found

    async def flows(self, request: web.Request) -> web.StreamResponse:
        log = self._log()
        q = request.query
        flt = Filter.parse(q.get("from", ""), q.get("to", ""), q.get("port", ""),
                           q.get("verdict", ""), q.get("since", ""))
        try:
            limit = int(q.get("limit", "1000") or 0)
        except ValueError:
            raise InvalidArgument("limit", q.get("limit"), "not a number") from None
        found = log.query(flt, limit)
        if q.get("follow") not in ("1", "true"):
            return web.json_response({"flows": [f.json() for f in found],
                                      "stats": dict(log.stats)})
        return await self._follow(request, log, flt, found)

    async def _follow(self, request: web.Request, log: FlowLog, flt: Filter,
                      found: list[Flow]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        queue = log.follow()
        try:
            for f in found:
                await resp.write(_line(f.json()))
            while True:
                try:
                    flow = await asyncio.wait_for(queue.get(), FOLLOW_IDLE)
                except TimeoutError:
                    await resp.write(b"\n")  # a keep-alive: a gone client shows here
                    continue
                if flt.matches(flow):
                    await resp.write(_line(flow.json()))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            log.unfollow(queue)
        return resp


def _line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

"""The agent's web view, on the metrics listener (``plexus agent --metrics-address``).

    GET /                    the page: a map of hosts, networks and containers, IPAM, services,
                             policies (``web_html``), and the flows, which stream in live
    GET /fragments/state     the page's live part, which its script swaps in every few seconds
    GET /fragments/flows     ?follow=1: new flows as Server-Sent Events, one table row each
    GET /api/state           what the page shows, as JSON (``web_state.snapshot``)
    GET /api/flows           the flow log's records as JSON, like ``GET /v1/flows`` on the API
                             socket; ?follow=1: as Server-Sent Events, one JSON record each
    GET /static/NAME         the page's script and style sheet (``static/``; nothing from a CDN)

Read-only: only GET routes, nothing here writes; the agent's API stays on its unix socket.
Flow filters are ``plexus flows``'s (from, to, port, verdict, since); a bad one is a 400 that
names it. A stream sends each record once: its event id is the record's time, and a browser that
reconnects (EventSource does by itself) sends the last id back, so it resumes after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from plexus.errors import InvalidArgument, PlexusError
from plexus.observe import web_html
from plexus.observe.flows import Filter, Flow, FlowLog
from plexus.observe.traffic import TrafficCollector
from plexus.observe.web_state import Rates, snapshot
from plexus.state.cache import Cache

log = logging.getLogger("plexus.observe")
STATIC = Path(__file__).with_name("static")
IDLE = 2.0  # seconds between keep-alives on a quiet stream: a gone browser shows there
RECENT = 100  # flows the page opens with
_TYPES = {".js": "text/javascript", ".css": "text/css"}
# The page runs only its own script and style: nothing inline, nothing from elsewhere.
_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class WebView:
    def __init__(self, cache: Cache, flows: Callable[[], FlowLog | None],
                 traffic: TrafficCollector | None = None) -> None:
        self.cache = cache
        self._flows = flows
        self._traffic = traffic if traffic is not None else TrafficCollector(cache)
        self._rates = Rates()
        self._closing = asyncio.Event()

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.page)
        r.add_get("/fragments/state", self.state_fragment)
        r.add_get("/fragments/flows", self.flow_rows)
        r.add_get("/api/state", self.state_json)
        r.add_get("/api/flows", self.flows_json)
        r.add_get("/static/{name}", self.static)
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()  # open streams end within IDLE, so the agent stops promptly

    # -- state -----------------------------------------------------------------------------

    async def _state(self) -> dict[str, object]:
        if self._rates.due():
            try:
                await self._traffic.refresh()
                self._rates.add(self._traffic.per_container())
            except OSError as exc:  # the rates are left out, the rest is served
                log.warning("web view: reading link counters failed: %s", exc)
        return snapshot(self.cache, self._rates.rates)

    async def page(self, request: web.Request) -> web.Response:
        flt = _filter(request)
        log_ = self._flows()
        recent = log_.query(flt, RECENT) if log_ is not None else []
        text = web_html.page(await self._state(), recent, request.query_string)
        return _html(text)

    async def state_fragment(self, request: web.Request) -> web.Response:
        return _html(web_html.live(await self._state()))

    async def state_json(self, request: web.Request) -> web.Response:
        return web.json_response(await self._state(), headers={"Cache-Control": "no-store"})

    async def static(self, request: web.Request) -> web.FileResponse:
        name = request.match_info["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or path.suffix not in _TYPES or \
                not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": _TYPES[path.suffix],
                                               "Cache-Control": "no-cache"})

    # -- flows -----------------------------------------------------------------------------

    def _log(self) -> FlowLog:
        found = self._flows()
        if found is None:
            raise web.HTTPServiceUnavailable(
                text="the flow log is off (plexus agent --no-flows)\n")
        return found

    async def flows_json(self, request: web.Request) -> web.StreamResponse:
        log_, flt = self._log(), _filter(request)
        if request.query.get("follow") in ("1", "true"):
            return await self._stream(request, log_, flt, _json_event)
        limit = _int(request, "limit", 1000)
        return web.json_response({"flows": [f.json() for f in log_.query(flt, limit)],
                                  "stats": dict(log_.stats)})

    async def flow_rows(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, self._log(), _filter(request), web_html.flow_row)

    async def _stream(self, request: web.Request, log_: FlowLog, flt: Filter,
                      render: Callable[[Flow], str]) -> web.StreamResponse:
        after = _resume_point(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        queue = log_.follow()  # before the backlog is read: nothing falls between the two
        try:
            for f in log_.query(flt, 0 if after else RECENT):
                if f.time > after:
                    await resp.write(_event(f, render))
            while not self._closing.is_set():
                try:
                    flow = await asyncio.wait_for(queue.get(), IDLE)
                except TimeoutError:
                    await resp.write(b": idle\n\n")  # an SSE comment
                    continue
                if flt.matches(flow) and flow.time > after:
                    await resp.write(_event(flow, render))
        except ConnectionResetError:
            pass  # the browser went away (a cancellation, the server's, goes on up)
        finally:
            log_.unfollow(queue)
        return resp


def _filter(request: web.Request) -> Filter:
    q = request.query
    try:
        return Filter.parse(q.get("from", ""), q.get("to", ""), q.get("port", ""),
                            q.get("verdict", ""), q.get("since", ""))
    except PlexusError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None


def _int(request: web.Request, name: str, default: int) -> int:
    text = request.query.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise web.HTTPBadRequest(text=f"{InvalidArgument(name, text, 'not a number')}\n") \
            from None


def _resume_point(request: web.Request) -> float:
    """The time of the last record the client has: ``Last-Event-ID`` (a reconnecting
    EventSource) or ``after`` (the page, which opened with rows already); 0: none."""
    for text in (request.headers.get("Last-Event-ID", ""), request.query.get("after", "")):
        try:
            value = float(text) if text else 0.0
        except ValueError:
            raise web.HTTPBadRequest(
                text=f"{InvalidArgument('after', text, 'not a time')}\n") from None
        if value:
            return value
    return 0.0


def _event(flow: Flow, render: Callable[[Flow], str]) -> bytes:
    data = render(flow).replace("\n", " ")  # one SSE data line per event
    return f"id: {flow.time!r}\ndata: {data}\n\n".encode()


def _json_event(flow: Flow) -> str:
    return json.dumps(flow.json(), separators=(",", ":"))


def _html(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy": _POLICY})

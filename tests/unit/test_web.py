"""The web view (``observe.web``) on an in-memory cache and flow log: the page and its JSON show
the model, flows stream as Server-Sent Events and resume without repeats, bad input is a clear
400 or 404, and nothing but GET is served."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from plexus.model import keys
from plexus.model.types import Endpoint, Network, PortMapping, Subnet
from plexus.observe import nfwire as w
from plexus.observe import server
from plexus.observe.flows import Directory, FlowLog
from plexus.observe.metrics import Metrics
from plexus.observe.traffic import LinkCounters, TrafficCollector
from plexus.observe.web import WebView
from plexus.observe.web_state import Rates
from plexus.state.cache import Cache
from plexus.store.base import KeyValue
from plexus.store.informer import Change

ip = ipaddress.ip_address


def _put(key: str, value: str) -> Change:
    return Change(key, KeyValue(key, value, 1, 1, 1), 1)


def _cache() -> Cache:
    cache = Cache("h1")
    front = Network("front", "f" * 12, subnets=(Subnet(ipaddress.ip_network("10.1.0.0/24"),
                                                       ip("10.1.0.1")),))
    eps = [
        Endpoint("c0", "eth0", "front", "h1", "/x", name="web", owner="plexus", state="ready",
                 addresses=(ipaddress.ip_interface("10.1.0.10/24"),),
                 ports=(PortMapping(8080, 80),)),
        Endpoint("c1", "eth0", "front", "h1", "/y", name="<b>evil</b>", owner="cni",
                 addresses=(ipaddress.ip_interface("10.1.0.11/24"),)),
        Endpoint("c2", "eth0", "front", "h2", "/z", name="far", owner="docker",
                 addresses=(ipaddress.ip_interface("10.1.0.12/24"),)),
    ]
    cache.apply([_put(keys.network("front"), front.to_json()),
                 *(_put(ep.store_key, ep.to_json()) for ep in eps)])
    return cache


class _Lab:
    def __init__(self) -> None:
        self.cache = _cache()
        self.flows = FlowLog(Directory(lambda: self.cache.endpoints.values(), "h1"))
        web0 = self.cache.of_container("c0")[0]
        self.links = {web0.host_ifname: LinkCounters(1, 2, 100, 2000)}
        self.view = WebView(self.cache, lambda: self.flows,
                            TrafficCollector(self.cache, lambda: self.links))

    def connect(self, i: int, src: str = "10.1.0.11", dst: str = "10.1.0.10") -> None:
        t = w.Tuple5(ip(src), ip(dst), "tcp", 40000 + i, 80)
        self.flows.connection(w.CtEvent(True, i, t, None), now=1000.0 + i)


@pytest.fixture
async def lab() -> AsyncIterator[tuple[_Lab, TestClient[web.Request, web.Application]]]:
    lab = _Lab()
    app = web.Application(middlewares=[server._not_found])
    server.routes(app, Metrics(), lab.view)
    async with TestClient(TestServer(app)) as client:
        yield lab, client


Lab = tuple[_Lab, TestClient[web.Request, web.Application]]


async def test_the_state_lists_hosts_networks_containers_front_doors_and_ipam(lab: Lab) -> None:
    _, client = lab
    resp = await client.get("/api/state")
    assert resp.status == 200
    state = await resp.json()
    assert [(h["name"], h["local"]) for h in state["hosts"]] == [("h1", True), ("h2", False)]
    doors = {c["name"]: (c["node"], c["front_door"]) for c in state["containers"]}
    assert doors == {"web": ("h1", "plexus"), "<b>evil</b>": ("h1", "cni"),
                     "far": ("h2", "docker")}
    (front,) = state["networks"]
    # 256 - network - broadcast - gateway; every host's endpoints hold an address.
    assert front["pools"] == [{"subnet": "10.1.0.0/24", "pool": "10.1.0.0/24",
                               "gateway": "10.1.0.1", "used": 3, "size": 253}]
    (web_ep,) = next(c for c in state["containers"] if c["name"] == "web")["endpoints"]
    assert web_ep["ports"] == ["8080:80/tcp"]
    # The host end's transmit is what the container received.
    assert (web_ep["rx_bytes"], web_ep["tx_bytes"]) == (2000, 100)


async def test_the_page_shows_containers_escaped_and_loads_only_its_own_assets(lab: Lab) -> None:
    _, client = lab
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    text = await resp.text()
    assert 'data-name="web"' in text and 'data-door="cni"' in text
    assert "<b>evil</b>" not in text and "&lt;b&gt;evil&lt;/b&gt;" in text
    assert "↓ 2.0 kB ↑ 100 B" in text  # one reading of the counters: totals, not rates
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "http://" not in text.replace('href="/', "")  # nothing from elsewhere
    for asset, kind in (("/static/web.js", "text/javascript"), ("/static/web.css", "text/css")):
        got = await client.get(asset)
        assert got.status == 200 and got.content_type == kind and len(await got.read()) > 100


@pytest.mark.parametrize("path", ["/nowhere", "/static/nosuch.js", "/static/..%2Fweb.py",
                                  "/static/web_state.py", "/api/nothing"])
async def test_unknown_paths_are_404_and_the_listener_keeps_serving(lab: Lab, path: str) -> None:
    _, client = lab
    resp = await client.get(path)
    assert resp.status == 404
    assert (await client.get("/api/state")).status == 200


async def test_the_view_is_read_only(lab: Lab) -> None:
    _, client = lab
    for path in ("/", "/api/state", "/api/flows"):
        assert (await client.post(path, data=b"{}")).status == 405


async def test_flows_as_json_filtered_and_a_bad_filter_names_its_field(lab: Lab) -> None:
    box, client = lab
    box.connect(1)
    box.connect(2, src="10.1.0.10", dst="10.1.0.11")
    body = await (await client.get("/api/flows", params={"from": "web"})).json()
    assert [(f["src"]["name"], f["dst"]["name"]) for f in body["flows"]] == \
        [("web", "<b>evil</b>")]
    resp = await client.get("/api/flows", params={"verdict": "maybe"})
    assert resp.status == 400 and "verdict" in await resp.text()
    assert (await client.get("/api/flows", params={"follow": "1", "after": "x"})).status == 400


async def _events(resp: ClientResponse, n: int) -> list[tuple[str, str]]:
    """The next ``n`` (id, data) events of an SSE response (bounded)."""
    out: list[tuple[str, str]] = []
    ident = ""
    async with asyncio.timeout(5):
        while len(out) < n:
            line = (await resp.content.readline()).decode().rstrip("\n")
            if line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                out.append((ident, line[6:]))
    return out


async def test_the_stream_sends_new_flows_and_resumes_after_the_last_id(lab: Lab) -> None:
    box, client = lab
    box.connect(1)
    resp = await client.get("/api/flows", params={"follow": "1"})
    assert resp.headers["Content-Type"] == "text/event-stream"
    (first,) = await _events(resp, 1)  # the backlog
    box.connect(2)
    (second,) = await _events(resp, 1)  # live
    assert json.loads(second[1])["src"]["port"] == 40002
    resp.close()
    # A reconnecting browser sends the last id it saw: only what came after.
    box.connect(3)
    again = await client.get("/api/flows", params={"follow": "1"},
                             headers={"Last-Event-ID": first[0]})
    ports = [json.loads(d)["src"]["port"] for _, d in await _events(again, 2)]
    assert ports == [40002, 40003]
    again.close()


async def test_the_pages_stream_sends_escaped_table_rows(lab: Lab) -> None:
    box, client = lab
    resp = await client.get("/fragments/flows", params={"follow": "1", "to": "web"})
    box.connect(1)
    ((_, row),) = await _events(resp, 1)
    assert row.startswith('<tr class="flow verdict-forwarded" data-src="&lt;b&gt;evil')
    assert 'data-dst="web"' in row and "<b>evil</b>" not in row
    resp.close()


def test_rates_are_bytes_a_second_between_two_readings() -> None:
    now = [100.0]
    rates = Rates(lambda: now[0])
    key = ("web", "", "front")
    rates.add({key: (1000, 500, 1, 1)})
    assert rates.rates[key].rx_bytes is None  # one reading: no rate yet
    assert not rates.due()
    now[0] = 102.0
    assert rates.due()
    rates.add({key: (5000, 700, 2, 2)})
    assert (rates.rates[key].rx_bytes, rates.rates[key].tx_bytes) == (2000.0, 100.0)
    now[0] = 103.0
    rates.add({key: (10, 10, 0, 0)})  # counters restarted (a new veth): no negative rate
    assert rates.rates[key].rx_bytes is None

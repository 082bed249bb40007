"""The metrics' collectors over fakes: each family reads the agent's state at scrape time."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.streams import StreamReader

from plexus.dns.metrics import Histogram
from plexus.errors import DataplaneError, InvalidArgument, NotFound, StoreUnavailable
from plexus.model import keys
from plexus.model.types import Endpoint, Network, Subnet
from plexus.observe.agent import AgentCollector, RequestTimings
from plexus.observe.dns import DnsCollector
from plexus.observe.drops import DropCollector
from plexus.observe.http import api_timer, docker_timer
from plexus.observe.metrics import Metrics
from plexus.observe.model import ModelCollector, capacity
from plexus.observe.server import parse_address
from plexus.observe.store import TimedStore, engine_of
from plexus.observe.traffic import (
    IFLA_STATS64,
    LinkCounters,
    TrafficCollector,
    parse_dump,
    parse_link_stats,
)
from plexus.state.cache import Cache
from plexus.state.work import Reconciler
from plexus.store.base import KeyValue
from plexus.store.informer import Change
from plexus.store.memory import MemoryStore

net = ipaddress.ip_network


def _put(key: str, value: str) -> Change:
    return Change(key, KeyValue(key, value, 1, 1, 1), 1)


def _cache() -> Cache:
    cache = Cache("h1")
    front = Network("front", "f" * 12, subnets=(Subnet(net("10.1.0.0/24"),
                                                       ipaddress.ip_address("10.1.0.1")),))
    span = Network("span", "s" * 12, driver="vxlan", vni=42, block_size=26,
                   subnets=(Subnet(net("10.2.0.0/24")),))
    eps = [Endpoint(f"c{i}", "eth0", "front", "h1", "/x", name=f"web{i}", namespace="shop",
                    owner="cni" if i == 2 else "plexus",
                    addresses=(ipaddress.ip_interface(f"10.1.0.{10 + i}/24"),)) for i in range(3)]
    eps.append(Endpoint("r1", "eth0", "front", "h2", "/y", name="remote",
                        addresses=(ipaddress.ip_interface("10.1.0.99/24"),)))
    eps.append(Endpoint("c9", "eth0", "span", "h1", "/z", name="db", owner="docker",
                        addresses=(ipaddress.ip_interface("10.2.0.5/24"),)))
    changes = [_put(keys.network(n.name), n.to_json()) for n in (front, span)]
    changes += [_put(ep.store_key, ep.to_json()) for ep in eps]
    changes += [_put(keys.host_block(net("10.2.0.0/24"), net(b)), node)
                for b, node in (("10.2.0.0/26", "h1"), ("10.2.0.64/26", "h2"))]
    cache.apply(changes)
    return cache


async def _scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by (name, sorted labels), through the text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families((await metrics.render()).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_networks_endpoints_and_ipam_come_from_the_cache() -> None:
    metrics = Metrics()
    metrics.add("model", ModelCollector(_cache()))
    s = await _scrape(metrics)
    assert _v(s, "plexus_networks", driver="bridge") == 1
    assert _v(s, "plexus_networks", driver="vxlan") == 1
    # Only this host's endpoints, by front door; the remote one counts in IPAM only.
    assert _v(s, "plexus_endpoints", network="front", front_door="plexus") == 2
    assert _v(s, "plexus_endpoints", network="front", front_door="cni") == 1
    assert _v(s, "plexus_endpoints", network="span", front_door="docker") == 1
    assert _v(s, "plexus_ipam_addresses_used", network="front", pool="10.1.0.0/24") == 4
    # 256 - network - broadcast - gateway - 4 used
    assert _v(s, "plexus_ipam_addresses_free", network="front", pool="10.1.0.0/24") == 249
    assert _v(s, "plexus_ipam_blocks_used", network="span", pool="10.2.0.0/24") == 2
    assert _v(s, "plexus_ipam_blocks_free", network="span", pool="10.2.0.0/24") == 2
    assert _v(s, "plexus_ipam_blocks_used", network="front", pool="10.1.0.0/24") is None


def test_capacity_leaves_out_what_no_endpoint_may_hold() -> None:
    assert capacity(Subnet(net("10.0.0.0/30"), ipaddress.ip_address("10.0.0.1"))) == 1
    ranged = Subnet(net("10.0.0.0/24"), ipaddress.ip_address("10.0.0.1"), net("10.0.0.128/25"))
    assert capacity(ranged) == 127  # the broadcast address lies in the range
    assert capacity(Subnet(net("fd00::/64"))) == 2**64 - 1


def _link_message(name: str, counters: tuple[int, int, int, int], seq: int = 7) -> bytes:
    def attr(kind: int, value: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(value), kind) + value
        return raw + b"\0" * (-len(raw) % 4)

    stats = struct.pack("=QQQQ", *counters) + b"\0" * (8 * 20)  # the rest of the struct
    body = struct.pack("=BxHiII", 0, 1, 5, 0, 0) + attr(3, name.encode() + b"\0") + \
        attr(IFLA_STATS64, stats)
    return struct.pack("=IHHII", 16 + len(body), 16, 2, seq, 0) + body


def test_link_counters_parse_from_a_dump() -> None:
    found: dict[str, LinkCounters] = {}
    data = _link_message("pxvabc", (1, 2, 300, 400)) + _link_message("eth0", (5, 6, 7, 8))
    assert parse_dump(memoryview(data), 7, found) is False
    assert found["pxvabc"] == LinkCounters(1, 2, 300, 400) and len(found) == 2
    done = struct.pack("=IHHII", 20, 3, 2, 7, 0) + b"\0\0\0\0"
    assert parse_dump(memoryview(done), 7, found) is True
    assert parse_dump(memoryview(_link_message("late", (0, 0, 0, 0), seq=6)), 7, found) is False
    assert "late" not in found
    assert parse_link_stats(memoryview(_link_message("x", (0, 0, 0, 0))[16:40])) is None


async def test_container_traffic_is_the_host_ends_counters_turned_around() -> None:
    cache = _cache()
    web0 = cache.of_container("c0")[0]
    links = {web0.host_ifname: LinkCounters(rx_packets=3, tx_packets=4, rx_bytes=300,
                                            tx_bytes=4000),
             "eth0": LinkCounters(9, 9, 9, 9)}
    metrics = Metrics()
    metrics.add("traffic", TrafficCollector(cache, lambda: links))
    s = await _scrape(metrics)
    key = {"container": "web0", "namespace": "shop", "network": "front"}
    assert _v(s, "plexus_container_network_receive_bytes_total", **key) == 4000
    assert _v(s, "plexus_container_network_transmit_bytes_total", **key) == 300
    assert _v(s, "plexus_container_network_receive_packets_total", **key) == 4
    assert _v(s, "plexus_container_network_transmit_packets_total", **key) == 3
    # Endpoints without a link of their own have no series; nor has any other link.
    assert len([k for k in s if k[0] == "plexus_container_network_receive_bytes_total"]) == 1


class _Firewall:
    def __init__(self) -> None:
        self.fail = False

    async def counters(self) -> dict[str, tuple[int, int]]:
        if self.fail:
            raise DataplaneError("nft: no table")
        return {"drop_isolation": (5, 420), "drop_internal": (0, 0), "drop_unpublished": (2, 80)}


async def _policies() -> dict[str, dict[str, int]]:
    return {"NetworkPolicy shop/deny-db": {"allow": 3, "deny": 7, "audit": 0}}


async def test_drops_by_reason_and_policy_and_a_failed_source_is_left_out() -> None:
    firewall = _Firewall()
    metrics = Metrics()
    metrics.add("drops", DropCollector(firewall, _policies))
    metrics.add("model", ModelCollector(_cache()))
    s = await _scrape(metrics)
    assert _v(s, "plexus_dropped_packets_total", reason="isolation", policy="") == 5
    assert _v(s, "plexus_dropped_bytes_total", reason="unpublished") == 80
    assert _v(s, "plexus_dropped_packets_total", reason="policy",
              policy="NetworkPolicy shop/deny-db") == 7
    assert _v(s, "plexus_policy_packets_total", policy="NetworkPolicy shop/deny-db",
              outcome="allow") == 3
    firewall.fail = True
    s = await _scrape(metrics)
    assert _v(s, "plexus_dropped_packets_total", reason="isolation", policy="") is None
    assert _v(s, "plexus_scrape_errors_total", source="drops") == 1
    assert (_v(s, "plexus_scrape_source_duration_seconds", source="drops") or -1) >= 0
    assert _v(s, "plexus_networks", driver="bridge") == 1  # the others are still served


async def test_a_slow_source_times_out_and_the_scrape_still_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Slow:
        async def refresh(self) -> None:
            await asyncio.sleep(10)

        def collect(self) -> Any:
            raise AssertionError("a stale source is not collected")

    monkeypatch.setattr("plexus.observe.metrics.REFRESH_TIMEOUT", 0.05)
    metrics = Metrics()
    metrics.add("slow", Slow())
    s = await asyncio.wait_for(_scrape(metrics), 2)
    assert _v(s, "plexus_scrape_errors_total", source="slow") == 1


async def test_dns_counters_map_one_to_one() -> None:
    latency = Histogram((0.001, 0.01))
    latency.observe(0.002)

    async def stats() -> dict[str, Any]:
        return {"queries": {"udp": 10, "tcp": 1, "fast_path": 4, "total": 11},
                "responses": {"A": {"NOERROR": 8, "NXDOMAIN": 2}, "AAAA": {"NOERROR": 1}},
                "outcomes": {"local": 9, "forwarded": 2}, "dropped": {"malformed": 1},
                "upstreams": {"192.0.2.53:53": {"healthy": False, "queries": 2, "answers": 1,
                                                "failures": {"timeout": 1},
                                                "latency_seconds": latency.to_dict()}}}

    metrics = Metrics()
    metrics.add("dns", DnsCollector(stats))
    s = await _scrape(metrics)
    assert _v(s, "plexus_dns_responses_total", type="A", rcode="NXDOMAIN") == 2
    assert _v(s, "plexus_dns_queries_total", transport="udp") == 10
    assert _v(s, "plexus_dns_outcomes_total", outcome="forwarded") == 2
    assert _v(s, "plexus_dns_upstream_up", upstream="192.0.2.53:53") == 0
    assert _v(s, "plexus_dns_upstream_failures_total", upstream="192.0.2.53:53",
              kind="timeout") == 1
    assert _v(s, "plexus_dns_upstream_latency_seconds_bucket", upstream="192.0.2.53:53",
              le="0.01") == 1
    assert _v(s, "plexus_dns_upstream_latency_seconds_count", upstream="192.0.2.53:53") == 1


class _Flaky(Reconciler):
    name = "flaky"

    async def reconcile(self, key: str) -> None:
        await asyncio.sleep(0.001)
        if key == "bad":
            raise DataplaneError("kernel said no")


async def test_reconcile_durations_drift_and_request_timings() -> None:
    r = _Flaky()
    r.start()
    r.enqueue(["a", "bad"])
    r.invalidate("a")  # a kernel event said "a" drifted
    for _ in range(200):
        if r.processed >= 3 and r.errors:
            break
        await asyncio.sleep(0.005)
    await r.close()
    timings = RequestTimings()
    timings.api.observe(("GET", "/v1/status", "200"), 0.0003)
    timings.store.observe(("sqlite", "txn"), 0.002)
    timings.store.error(("etcd", "get"))
    metrics = Metrics()
    metrics.add("agent", AgentCollector(lambda: [r], timings))
    s = await _scrape(metrics)
    assert (_v(s, "plexus_reconcile_duration_seconds_count", reconciler="flaky") or 0) >= 2
    assert _v(s, "plexus_reconcile_drift_corrected_total", reconciler="flaky") == 1
    assert _v(s, "plexus_reconcile_failing_objects", reconciler="flaky") == 1
    assert _v(s, "plexus_api_request_duration_seconds_bucket", method="GET", route="/v1/status",
              code="200", le="0.0005") == 1
    assert _v(s, "plexus_datastore_request_duration_seconds_count", engine="sqlite",
              operation="txn") == 1
    assert _v(s, "plexus_datastore_errors_total", engine="etcd", operation="get") == 1


async def test_the_timed_store_counts_round_trips_and_failures() -> None:
    timings = RequestTimings().store
    inner = MemoryStore()
    store = TimedStore(inner, "sqlite", timings)
    await store.put("/a", "1")
    await store.get("/a")
    await store.list("/")
    assert {k: h.count for k, h in timings.histograms.items()} == {
        ("sqlite", "put"): 1, ("sqlite", "get"): 1, ("sqlite", "list"): 1}

    async def down(key: str) -> None:
        raise StoreUnavailable("etcd did not answer")

    inner.get = down  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await store.get("/a")
    assert timings.errors[("sqlite", "get")] == 1
    assert engine_of("etcds://10.0.0.1:2379") == "etcd" and engine_of("") == "sqlite"


@pytest.mark.parametrize(("text", "expected"), [
    (":9090", ("127.0.0.1", 9090)), ("9090", ("127.0.0.1", 9090)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::1]:9100", ("::1", 9100)),
    ("localhost:80", ("localhost", 80)),
])
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":", "abc", ":0", ":70000", "example.com:80", "1.2.3:9"])
def test_bad_metrics_addresses_name_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument, match="metrics-address"):
        parse_address(text)


async def _through(app: web.Application, middleware: Any, method: str, path: str,
                   body: bytes = b"") -> web.StreamResponse:
    """One request through ``middleware`` and the app's router, without a socket."""
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request(method, path, app=app, payload=_payload(body))
    match = await app.router.resolve(request)
    request._match_info = match  # what aiohttp's handler does before the middlewares
    return await middleware(request, match.handler)  # type: ignore[no-any-return]


def _payload(body: bytes) -> StreamReader:
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**16,
                          loop=asyncio.get_running_loop())
    reader.feed_data(body)
    reader.feed_eof()
    return reader


async def test_front_door_requests_are_timed_by_route_template_and_cni_command() -> None:
    async def container(request: web.Request) -> web.Response:
        raise NotFound("no such container")

    async def cni(request: web.Request) -> web.Response:
        return web.Response(text="{}", headers={"X-CNI-Exit": "1"})

    app = web.Application()
    app.router.add_get("/v1/containers/{name}", container)
    app.router.add_post("/v1/cni", cni)
    timings = RequestTimings()
    timer = api_timer(timings.api, timings.cni)
    with pytest.raises(NotFound):
        await _through(app, timer, "GET", "/v1/containers/web0")
    await _through(app, timer, "POST", "/v1/cni", b'{"env": {"CNI_COMMAND": "ADD"}}')
    await _through(app, timer, "POST", "/v1/cni", b'{"env": {"CNI_COMMAND": "x' * 9 + b'"}}')
    assert set(timings.api.histograms) == {("GET", "/v1/containers/{name}", "500")}
    assert set(timings.cni.histograms) == {("ADD", "error"), ("other", "error")}


async def test_docker_plugin_calls_are_timed_by_call() -> None:
    async def join(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/NetworkDriver.Join", join)
    timings = RequestTimings()
    timer = docker_timer(timings.docker)
    await _through(app, timer, "POST", "/NetworkDriver.Join")
    with pytest.raises(web.HTTPNotFound):
        await _through(app, timer, "POST", "/NetworkDriver.Nothing")
    assert set(timings.docker.histograms) == {("NetworkDriver.Join", "200"),
                                              ("unmatched", "404")}

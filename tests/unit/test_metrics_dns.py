"""DNS query latency without root: the server on loopback times every query it answers in
Python (a forwarded one including its upstream's delay), counts the fast path's ready-made
answers in the lowest bucket, the worker processes' histograms add up, and the collector serves
them as ``plexus_dns_query_duration_seconds``."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import dns.message
import dns.rcode
import pytest
from prometheus_client.parser import text_string_to_metric_families

from plexus.dns.config import DnsSettings
from plexus.dns.metrics import QUERY_BUCKETS, Histogram, merge_stats
from plexus.dns.records import RecordTable
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions
from plexus.dns.upstream import ForwardOptions
from plexus.observe.dns import DnsCollector
from plexus.observe.metrics import Metrics
from plexus.testing.dns import StubUpstream, endpoint, network

pytestmark = pytest.mark.timeout(60)
DELAY = 0.06  # the stub upstream's, above every bucket a local answer lands in


async def _ask(port: int, name: str) -> int:
    q = dns.message.make_query(name, "A")
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, q.to_wire())
        async with asyncio.timeout(3):
            return dns.message.from_wire(await loop.sock_recv(sock, 65535)).rcode()


def _le(h: dict[str, Any], bound: float) -> int:
    return int(next(n for b, n in h["buckets"] if b != "+Inf" and float(b) >= bound))


async def test_queries_are_timed_by_type_and_rcode_forwarded_ones_with_the_upstream() -> None:
    async with StubUpstream("127.0.0.31", records={"example.com": ["203.0.113.7"]},
                            delay=DELAY) as up:
        table = RecordTable.build([network("front", "127.0.0.0/8")],
                                  [endpoint("web", "front", "127.0.1.10")],
                                  DnsSettings(upstreams=(up.upstream,)))
        options = ServerOptions(forward=ForwardOptions(timeout=2, deadline=3,
                                                       health_interval=60))
        async with DnsServer(table, options) as srv:
            port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
            for _ in range(3):  # the first is answered in Python, the others ready-made
                assert await _ask(port, "web") == dns.rcode.NOERROR
            assert await _ask(port, "nosuch.plexus.internal") == dns.rcode.NXDOMAIN
            assert await _ask(port, "example.com") == dns.rcode.NOERROR
            latency = srv.stats()["latency"]
    local = latency["A"]["NOERROR"]
    assert local["count"] == 4  # web three times, example.com once
    assert _le(local, QUERY_BUCKETS[0]) >= 2  # the fast path's, in the lowest bucket
    assert _le(local, DELAY / 2) == 3  # every local answer well under the upstream's delay
    assert local["sum"] >= DELAY  # the forwarded one waited for its upstream
    assert latency["A"]["NXDOMAIN"]["count"] == 1


def test_worker_histograms_add_up_with_their_own_buckets() -> None:
    a, b = Histogram(QUERY_BUCKETS), Histogram(QUERY_BUCKETS)
    a.observe(0.00004)
    b.observe(0.3)
    b.observe(0.00004)
    merged = merge_stats([{"latency": {"A": {"NOERROR": a.to_dict()}}},
                          {"latency": {"A": {"NOERROR": b.to_dict()}}}])
    h = merged["latency"]["A"]["NOERROR"]
    assert h["count"] == 3 and len(h["buckets"]) == len(QUERY_BUCKETS) + 1
    assert _le(h, QUERY_BUCKETS[0]) == 2 and _le(h, 0.5) == 3


async def test_the_collector_serves_the_histogram_by_type_and_rcode() -> None:
    h = Histogram(QUERY_BUCKETS)
    h.observe(0.0002)

    async def stats() -> dict[str, Any]:
        return {"latency": {"AAAA": {"SERVFAIL": h.to_dict()}}}

    metrics = Metrics()
    metrics.add("dns", DnsCollector(stats))
    text = (await metrics.render()).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    at = (("rcode", "SERVFAIL"), ("type", "AAAA"))
    assert samples[("plexus_dns_query_duration_seconds_count", at)] == 1
    bucket = "plexus_dns_query_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.00025"), *at))] == 1
    assert samples[(bucket, (("le", "0.0001"), *at))] == 0

"""The flow log's and the services' metrics without a kernel: records by verdict, the rate
limit's suppressions, records the kernel dropped (read from a /proc/net/netlink of our own),
the ring's fill; and each service's endpoints, ready or not, from the cache."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from plexus.lb.spec import Service, ServicePort
from plexus.model import keys
from plexus.model.types import Endpoint
from plexus.observe import nfwire as w
from plexus.observe.flowmetrics import FlowCollector, netlink_drops
from plexus.observe.flows import Directory, FlowLog
from plexus.observe.metrics import Metrics
from plexus.observe.services import ServiceCollector
from plexus.state.cache import Cache
from plexus.store.base import KeyValue
from plexus.store.informer import Change

ip = ipaddress.ip_address
NETLINK = """\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
00000000543f00f8 0   0          00000000 0        0        0     2        0        4
00000000b1b8e12c 12  4242       00000006 0        0        0     2        17       9001
00000000b1b8e12d 12  4243       00000000 0        0        0     2        3        9002
"""


async def _scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families((await metrics.render()).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _ep(i: int, labels: dict[str, str], state: str = "ready", namespace: str = "shop",
        network: str = "front") -> Endpoint:
    return Endpoint(f"c{i}", "eth0", network, "h1", f"/run/c{i}", name=f"c{i}",
                    namespace=namespace, labels=labels, state=state,  # type: ignore[arg-type]
                    addresses=(ipaddress.ip_interface(f"10.1.0.{10 + i}/24"),))


def test_netlink_drops_are_read_by_inode_and_an_unlisted_socket_is_left_out() -> None:
    found = netlink_drops(NETLINK, {"conntrack": 9001, "nflog": 9002, "gone": 7})
    assert found == {"conntrack": 17, "nflog": 3}
    assert netlink_drops("", {"conntrack": 9001}) == {}


async def test_flow_records_by_verdict_suppressed_lost_and_the_ring(tmp_path: Path) -> None:
    web = _ep(1, {"app": "web"})
    log = FlowLog(Directory(lambda: [web], "h1"), capacity=4, rate=3)
    for i in range(5):  # 3 made in this second, 2 over the rate
        log.connection(w.CtEvent(True, i, w.Tuple5(ip("10.1.0.11"), ip("10.1.0.99"), "tcp",
                                                   1000 + i, 80), None), now=50.0)
    packet = w.Tuple5(ip("10.1.0.99"), ip("10.1.0.11"), "tcp", 999, 80)
    log.packet(w.Logged("drop isolation", 0, 0, 0, packet), now=51.0)
    log.packet(w.Logged("audit x", 0, 0, 0, packet), now=51.0)
    follower = log.follow()
    proc = tmp_path / "netlink"
    proc.write_text(NETLINK)
    log.sockets = {"conntrack": 9001, "nflog": 9002}
    metrics = Metrics()
    metrics.add("flows", FlowCollector(log, proc))
    s = await _scrape(metrics)
    assert _v(s, "plexus_flow_records_total", verdict="forwarded") == 3
    assert _v(s, "plexus_flow_records_total", verdict="dropped") == 1
    assert _v(s, "plexus_flow_records_total", verdict="audit") == 1
    assert _v(s, "plexus_flow_records_suppressed_total") == 2
    assert _v(s, "plexus_flow_records_lost_total", source="conntrack") == 17
    assert _v(s, "plexus_flow_records_lost_total", source="nflog") == 3
    assert _v(s, "plexus_flow_ring_records") == 4 and _v(s, "plexus_flow_ring_capacity") == 4
    assert _v(s, "plexus_flow_followers") == 1
    assert _v(s, "plexus_flow_open_connections") == 4  # 5 open, tracked up to the capacity
    log.unfollow(follower)
    log.sockets = {}  # the kernel sources stopped: nothing to read
    s = await _scrape(metrics)
    assert _v(s, "plexus_flow_followers") == 0
    assert _v(s, "plexus_flow_records_lost_total", source="conntrack") is None


def _put(key: str, value: str) -> Change:
    return Change(key, KeyValue(key, value, 1, 1, 1), 1)


async def test_services_count_their_endpoints_and_the_ready_ones() -> None:
    cache = Cache("h1")
    web = Service("shop", "web", "front", {"app": "web"}, (ServicePort(80),), (ip("10.96.0.1"),))
    empty = Service("shop", "empty", "front", {"app": "none"}, (ServicePort(80),),
                    (ip("10.96.0.2"),))
    eps = [_ep(1, {"app": "web"}), _ep(2, {"app": "web", "tier": "x"}),
           _ep(3, {"app": "web"}, state="pending"),
           _ep(4, {"app": "web"}, namespace="other"),  # another namespace: not picked
           _ep(5, {"app": "db"})]
    changes = [_put(keys.service(s.namespace, s.name), s.to_json()) for s in (web, empty)]
    cache.apply(changes + [_put(ep.store_key, ep.to_json()) for ep in eps])
    metrics = Metrics()
    metrics.add("services", ServiceCollector(cache))
    s = await _scrape(metrics)
    at = {"namespace": "shop", "service": "web", "network": "front"}
    assert _v(s, "plexus_service_endpoints", **at) == 3
    assert _v(s, "plexus_service_endpoints_ready", **at) == 2
    none = {**at, "service": "empty"}
    assert _v(s, "plexus_service_endpoints", **none) == 0
    assert _v(s, "plexus_service_endpoints_ready", **none) == 0
    assert _v(s, "plexus_services", network="front") == 2
    # A readiness check failing takes an endpoint out of the ready ones only.
    cache.failing.add((keys.service("shop", "web"), eps[0].store_key))
    s = await _scrape(metrics)
    assert _v(s, "plexus_service_endpoints_ready", **at) == 1
    assert _v(s, "plexus_service_endpoints", **at) == 3

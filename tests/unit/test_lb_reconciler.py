"""The services reconciler against an in-memory kernel: endpoints that start, stop, change
labels or named ports move in and out of the frontends of exactly the services they back, and
the kernel is told only that; the DNS reconciler publishes services' names."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

import pytest

from plexus.agent import wiring
from plexus.agent.reconcilers.dns import DnsReconciler
from plexus.agent.reconcilers.lb import ENDPOINT, SERVICE, VERIFY, LbReconciler
from plexus.dns import DnsService
from plexus.lb.model import Backend, Change, Frontend, Published
from plexus.lb.spec import Publish, Service, ServicePort
from plexus.model import keys
from plexus.model.types import Container, Endpoint, ExposedPort
from plexus.state.cache import Cache
from plexus.state.work import Reconciler
from plexus.store.base import KeyValue
from plexus.store.informer import Change as StoreChange
from plexus.testing.dns import endpoint, network
from plexus.testing.lb import FakeServiceKernel

pytestmark = pytest.mark.timeout(30)
IP = ipaddress.ip_address


class World:
    def __init__(self) -> None:
        self.cache = Cache("node1")
        self.kernel = FakeServiceKernel()
        self.lb = LbReconciler(self.cache, self.kernel)
        self.rev = 0
        self.put_network()

    def put_network(self) -> None:
        self._put(keys.network("net"), network("net", "10.1.0.0/24").to_json())

    def _put(self, key: str, value: str | None) -> None:
        self.rev += 1
        kv = None if value is None else KeyValue(key, value, self.rev, self.rev, 1)
        self.cache.apply([StoreChange(key, kv, self.rev)])

    def service(self, svc: Service | None, key: str = "") -> str:
        key = key or keys.service(svc.namespace, svc.name)  # type: ignore[union-attr]
        self._put(key, None if svc is None else svc.to_json())
        self.lb.enqueue([SERVICE + key], self.rev)
        return key

    def endpoint(self, ep: Endpoint, gone: bool = False) -> None:
        self._put(ep.store_key, None if gone else ep.to_json())
        self.lb.enqueue([ENDPOINT + ep.store_key], self.rev)

    def frontend(self, vip: str, port: int, proto: str = "tcp") -> Frontend:
        assert self.kernel.table is not None
        return self.kernel.table[(IP(vip), proto, port)]


async def settled(r: Reconciler) -> None:
    r.start()
    for _ in range(2000):
        if not r.busy:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the reconciler did not settle")


WEB = Service("default", "web", "net", {"app": "web"},
              (ServicePort(80, "tcp", 8080, "http"), ServicePort(53, "udp", "dns", "dns")),
              (IP("10.96.0.10"),), publish=(Publish(30080, 80),))


def pod(name: str, ip: str, **labels: str) -> Endpoint:
    ep = endpoint(name, "net", ip)
    return replace(ep, labels=labels, exposes=(ExposedPort(5353, "udp", "dns"),))


async def test_no_service_no_table_and_no_calls() -> None:
    w = World()
    w.endpoint(pod("a", "10.1.0.2", app="web"))
    await settled(w.lb)
    assert w.kernel.calls == [] and w.kernel.table is None


async def test_endpoints_follow_starts_stops_and_label_changes() -> None:
    w = World()
    a, b = pod("a", "10.1.0.2", app="web"), pod("b", "10.1.0.3", app="web")
    w.endpoint(a)
    w.service(WEB)
    await settled(w.lb)
    http = w.frontend("10.96.0.10", 80)
    assert http.backends == (Backend(IP("10.1.0.2"), 8080),)
    assert (http.service, http.name, http.published) == ("default/web", "http",
                                                         (Published(None, 30080),))
    assert w.frontend("10.96.0.10", 53, "udp").backends == (Backend(IP("10.1.0.2"), 5353),)
    w.kernel.calls.clear()

    w.endpoint(b)  # a second one starts
    await settled(w.lb)
    assert [c for c, _ in w.kernel.calls] == ["change"]
    assert len(w.frontend("10.96.0.10", 80).backends) == 2

    w.kernel.calls.clear()
    w.endpoint(replace(a, labels={"app": "db"}))  # relabelled away
    await settled(w.lb)
    assert w.frontend("10.96.0.10", 80).backends == (Backend(IP("10.1.0.3"), 8080),)
    assert ("forget_udp", ((IP("10.96.0.10"), "udp", 53), (Backend(IP("10.1.0.2"), 5353),))) \
        in w.kernel.calls

    w.endpoint(b, gone=True)  # stopped
    w.endpoint(replace(a, state="pending"))  # not ready: not a backend
    await settled(w.lb)
    assert w.frontend("10.96.0.10", 80).backends == ()  # clients get a reject, not a timeout


async def test_a_change_touches_only_the_services_it_concerns() -> None:
    w = World()
    other = replace(WEB, name="db", selector={"app": "db"}, vips=(IP("10.96.0.11"),))
    elsewhere = replace(WEB, namespace="shop", vips=(IP("10.96.0.12"),))
    for svc in (WEB, other, elsewhere):
        w.service(svc)
    await settled(w.lb)
    w.kernel.calls.clear()
    w.endpoint(pod("a", "10.1.0.2", app="web"))  # in namespace default
    await settled(w.lb)
    [(verb, change)] = w.kernel.calls
    assert verb == "change" and isinstance(change, Change)
    assert {f.service for f in change.changed} == {"default/web"} and not change.removed


async def test_named_target_ports_resolve_per_endpoint() -> None:
    w = World()
    svc = replace(WEB, ports=(ServicePort(80, "tcp", "http", "http"),), publish=())
    w.service(svc)
    one = replace(pod("a", "10.1.0.2", app="web"), exposes=(ExposedPort(8080, "tcp", "http"),))
    two = replace(pod("b", "10.1.0.3", app="web"), exposes=(ExposedPort(9090, "tcp", "http"),))
    none = pod("c", "10.1.0.4", app="web")  # exposes no "http": not a backend of port 80
    for ep in (one, two, none):
        w.endpoint(ep)
    await settled(w.lb)
    assert w.frontend("10.96.0.10", 80).backends == (
        Backend(IP("10.1.0.2"), 8080), Backend(IP("10.1.0.3"), 9090))


async def test_removing_the_last_service_removes_the_table_and_verify_repairs() -> None:
    w = World()
    key = w.service(WEB)
    await settled(w.lb)
    w.kernel.table = None  # someone deleted it
    w.lb.enqueue([VERIFY])
    await settled(w.lb)
    assert w.kernel.table is not None and w.lb.repairs == 1
    w.service(None, key)
    await settled(w.lb)
    assert w.kernel.table is None and w.kernel.calls[-1] == ("remove", None)


async def test_service_names_resolve_to_the_vip_and_headless_to_ready_endpoints() -> None:
    w = World()
    dns = DnsService()
    r = DnsReconciler(w.cache, dns)
    r.enqueue(["net:net"])
    await settled(r)
    headless = replace(WEB, name="peers", vips=(), headless=True, publish=())
    for svc in (WEB, headless):
        key = keys.service(svc.namespace, svc.name)
        w.service(svc)
        r.enqueue(["svc:" + key])
    a = pod("a", "10.1.0.2", app="web")
    w.endpoint(a)
    r.enqueue(["ep:" + a.store_key])
    await settled(r)
    for name in ("web", "web.default", "web.default.svc.plexus.internal"):
        assert dns.explain("net", name).resolution.addresses == (IP("10.96.0.10"),), name
    assert dns.explain("net", "peers.default").resolution.addresses == (IP("10.1.0.2"),)
    # the container's own PTR record is untouched by the headless service's name
    assert dns.explain("net", "2.0.1.10.in-addr.arpa", "PTR").resolution.targets == (
        "a.net.plexus.internal",)
    w.endpoint(a, gone=True)
    r.enqueue(["ep:" + a.store_key])
    await settled(r)
    # no ready endpoint: the name exists with no address (NODATA), it is not forwarded
    assert dns.explain("net", "peers.default").resolution.outcome == "nodata"


async def test_a_container_that_exited_leaves_and_one_that_runs_again_returns() -> None:
    w = World()
    w.service(WEB)
    a = pod("a", "10.1.0.2", app="web")
    w.endpoint(a)
    await settled(w.lb)
    record = Container(a.container_id, "a", "node1", "a", ("net",), ("sleep",), state="running")

    def put_container(c: Container) -> None:
        w._put(keys.container("node1", "a"), c.to_json())
        change = StoreChange(keys.container("node1", "a"),
                             KeyValue(keys.container("node1", "a"), c.to_json(), w.rev, w.rev, 1),
                             w.rev)
        w.lb.enqueue([o for o in wiring._objects(w.cache, change) if o.startswith("lb:")], w.rev)

    put_container(replace(record, state="exited"))
    await settled(w.lb)
    assert w.frontend("10.96.0.10", 80).backends == ()
    put_container(record)
    await settled(w.lb)
    assert w.frontend("10.96.0.10", 80).backends == (Backend(IP("10.1.0.2"), 8080),)

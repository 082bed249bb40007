"""The services control plane alone (no kernel): what the reconciler spends on a full sync of
10,000 services x 10 endpoints, on one endpoint change and on one new service, with an
in-memory ServiceKernel. The issue's targets (2 s, 20 ms, 20 ms) include the nftables batch,
which bench/services.py measures with the real table; this is the part before it.

    PYTHONPATH=$PWD .venv/bin/python bench/services_control.py [SERVICES] [ENDPOINTS]
"""

from __future__ import annotations

import asyncio
import ipaddress
import sys
import time

from plexus.agent.reconcilers.lb import ENDPOINT, SERVICE, LbReconciler
from plexus.lb.spec import Service, ServicePort
from plexus.model import keys
from plexus.model.types import Endpoint
from plexus.state.cache import Cache
from plexus.store.base import KeyValue
from plexus.store.informer import Change
from plexus.testing.dns import network
from plexus.testing.lb import FakeServiceKernel

VIPS = int(ipaddress.ip_address("10.96.0.0"))
PODS = int(ipaddress.ip_address("10.0.0.2"))


class Feed:
    def __init__(self, cache: Cache) -> None:
        self.cache, self.rev = cache, 0

    def put(self, key: str, value: str) -> None:
        self.rev += 1
        self.cache.apply([Change(key, KeyValue(key, value, self.rev, self.rev, 1), self.rev)])

    def endpoint(self, name: str, address: int, app: str) -> str:
        ep = Endpoint(name, "eth0", "net", "node1", "",
                      (ipaddress.ip_interface(f"{ipaddress.ip_address(address)}/8"),),
                      labels={"app": app}, state="ready")
        self.put(ep.store_key, ep.to_json())
        return ep.store_key

    def service(self, i: int, app: str = "") -> str:
        svc = Service("default", f"s{i}", "net", {"app": app or f"a{i}"},
                      (ServicePort(80, "tcp", 8080),), (ipaddress.ip_address(VIPS + i + 1),))
        key = keys.service("default", f"s{i}")
        self.put(key, svc.to_json())
        return key


def ms(start: float) -> str:
    return f"{(time.perf_counter() - start) * 1000:.1f} ms"


async def main(services: int, endpoints: int) -> None:
    cache = Cache("node1")
    r = LbReconciler(cache, FakeServiceKernel())
    feed = Feed(cache)
    feed.put(keys.network("net"), network("net", "10.0.0.0/8").to_json())
    for i in range(services):
        feed.service(i)
        for e in range(endpoints):
            feed.endpoint(f"c{i}x{e}", PODS + i * endpoints + e, f"a{i}")
    start = time.perf_counter()
    await r.reconcile_batch([SERVICE + keys.service("default", "s0")])
    print(f"full sync, {services} services x {endpoints} endpoints: {ms(start)}")
    key = feed.endpoint("new", PODS + services * endpoints + 1, "a5")
    start = time.perf_counter()
    await r.reconcile_batch([ENDPOINT + key])
    print(f"one endpoint change: {ms(start)}")
    key = feed.service(services + 1, "a7")  # a second service of 10 running endpoints
    start = time.perf_counter()
    await r.reconcile_batch([SERVICE + key])
    print(f"one new service: {ms(start)}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(*(args + [10_000, 10][len(args):])))

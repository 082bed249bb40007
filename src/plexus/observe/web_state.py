"""What the web view shows, as plain JSON-able data read from the agent's cache: hosts, networks
with their IPAM use, containers (with their front door, addresses and published ports), services
and policies, and per-container traffic rates. Pure: the page renderer (``web_html``) and
``GET /api/state`` both read this one shape, so the page and the API cannot disagree.

Containers are grouped from endpoints, as ``plexus ps`` does: a container another runtime
started (CNI, Docker) is known to plexus only through its endpoints, and its front door is theirs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from plexus.lb.spec import Service
from plexus.model.types import Endpoint, Network
from plexus.observe.model import capacity
from plexus.policy.model import Policy
from plexus.state.cache import Cache

# (container, namespace, network) -> received bytes, sent bytes, received packets, sent packets:
# the shape of ``TrafficCollector.per_container``.
Counters = dict[tuple[str, str, str], tuple[int, int, int, int]]
MIN_INTERVAL = 1.0  # seconds between two readings of the kernel's counters, however many tabs


@dataclass(frozen=True, slots=True)
class Rate:
    rx_bytes: float | None  # bytes a second the container received (None: one reading so far)
    tx_bytes: float | None  # and sent
    rx_total: int
    tx_total: int


class Rates:
    """Per-container bytes a second between the last two readings of the counters; a reading
    younger than ``MIN_INTERVAL`` is reused, so many open pages cost one dump a second."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: tuple[float, Counters] | None = None
        self.rates: dict[tuple[str, str, str], Rate] = {}

    def due(self) -> bool:
        return self._last is None or self._clock() - self._last[0] >= MIN_INTERVAL

    def add(self, counters: Counters) -> None:
        now = self._clock()
        before = self._last
        self._last = (now, counters)
        took = now - before[0] if before is not None else 0.0
        rates = {}
        for key, (rb, tb, _, _) in counters.items():
            was = before[1].get(key) if before is not None else None
            if was is None or took <= 0 or rb < was[0] or tb < was[1]:
                rates[key] = Rate(None, None, rb, tb)  # first seen, or its counters restarted
            else:
                rates[key] = Rate((rb - was[0]) / took, (tb - was[1]) / took, rb, tb)
        self.rates = rates


def snapshot(cache: Cache, rates: dict[tuple[str, str, str], Rate],
             now: float | None = None) -> dict[str, Any]:
    """Everything the page shows, from one read of the cache (the loop's own state)."""
    endpoints = list(cache.endpoints.values())
    return {
        "node": cache.node,
        "time": time.time() if now is None else now,
        "hosts": _hosts(cache, endpoints),
        "networks": [_network(n, endpoints) for n in
                     sorted(cache.networks.values(), key=lambda n: n.name)],
        "containers": _containers(cache, endpoints, rates),
        "services": [_service(s) for s in sorted(cache.services.values(), key=lambda s: s.ref)],
        "policies": [_policy(p) for p in
                     sorted(cache.policies.values(), key=lambda p: (int(p.tier), p.ref))],
    }


def _hosts(cache: Cache, endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    names = set(cache.hosts) | {cache.node} | {e.node for e in endpoints}
    out = []
    for name in sorted(names):
        h = cache.hosts.get(name)
        out.append({"name": name, "address": h.address if h else "",
                    "alive": name in cache.alive or name == cache.node,
                    "local": name == cache.node})
    return out


def _network(net: Network, endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    mine = [e for e in endpoints if e.network == net.name]
    pools = []
    for subnet in net.subnets:
        used = sum(1 for e in mine for a in e.addresses if a.ip in subnet.pool)
        pools.append({"subnet": str(subnet.cidr), "pool": str(subnet.pool),
                      "gateway": "" if subnet.gateway is None else str(subnet.gateway),
                      "used": used, "size": capacity(subnet)})
    return {"name": net.name, "driver": net.driver, "internal": net.internal,
            "spans_hosts": bool(net.vni), "endpoints": len(mine), "pools": pools}


def _containers(cache: Cache, endpoints: list[Endpoint],
                rates: dict[tuple[str, str, str], Rate]) -> list[dict[str, Any]]:
    by_id: dict[tuple[str, str], list[Endpoint]] = defaultdict(list)
    for ep in endpoints:
        by_id[(ep.node, ep.container_id)].append(ep)
    out = []
    for (node, cid), eps in by_id.items():
        eps.sort(key=lambda e: e.ifname)
        name = eps[0].name or cid[:12]
        out.append({
            "id": cid[:12], "name": name, "node": node, "front_door": eps[0].owner,
            "namespace": eps[0].namespace, "labels": dict(eps[0].labels),
            "state": _state(cache, node, cid, eps),
            "endpoints": [_endpoint(e, name, rates) for e in eps],
        })
    return sorted(out, key=lambda c: (c["node"], c["name"]))


def _state(cache: Cache, node: str, cid: str, eps: list[Endpoint]) -> str:
    if (node, cid) in cache.stopped:
        return "exited"
    return "running" if all(e.state == "ready" for e in eps) else "creating"


def _endpoint(ep: Endpoint, name: str, rates: dict[tuple[str, str, str], Rate]) -> dict[str, Any]:
    rate = rates.get((name, ep.namespace, ep.network))
    return {
        "network": ep.network, "ifname": ep.ifname,
        "addresses": [str(a.ip) for a in ep.addresses],
        "ports": [str(p) for p in ep.ports],
        "rx_rate": rate.rx_bytes if rate else None, "tx_rate": rate.tx_bytes if rate else None,
        "rx_bytes": rate.rx_total if rate else None, "tx_bytes": rate.tx_total if rate else None,
    }


def _service(svc: Service) -> dict[str, Any]:
    return {"ref": svc.ref, "network": svc.network,
            "selector": ",".join(f"{k}={v}" for k, v in sorted(svc.selector.items())),
            "vips": [str(v) for v in svc.vips], "ports": [str(p) for p in svc.ports],
            "publish": [str(p) for p in svc.publish], "headless": svc.headless}


def _policy(pol: Policy) -> dict[str, Any]:
    return {"ref": pol.ref, "kind": pol.kind, "tier": pol.tier.name.lower(),
            "subject": pol.subject.describe(), "ingress_rules": len(pol.ingress),
            "egress_rules": len(pol.egress), "audit": pol.audit}

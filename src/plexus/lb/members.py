"""Which endpoints back which services, kept up to date one change at a time, and the frontends
that follows from it. Pure (reads the cache, never writes it).

A service's endpoints are the ready endpoints, on any host, of its namespace and network whose
labels match every pair of its selector. An endpoint's change re-evaluates only the services it
backed and those its new labels are candidates of (``Cache.services_selecting``): O(its labels
and those services), whatever the number of services and endpoints elsewhere. A service's own
change re-evaluates it against the endpoints of its network.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable

from plexus.lb.model import Backend, Frontend, Published
from plexus.lb.spec import Service, ServicePort
from plexus.model.types import Endpoint, IPAddress
from plexus.state.cache import Cache


def backs(svc: Service, ep: Endpoint) -> bool:
    """Is ``ep`` one of ``svc``'s ready endpoints?"""
    return (ep.state == "ready" and bool(svc.selector) and ep.network == svc.network
            and ep.policy_namespace == svc.namespace and bool(ep.addresses)
            and all(ep.labels.get(k) == v for k, v in svc.selector.items()))


def selected(cache: Cache, svc: Service) -> list[Endpoint]:
    """Every host's endpoints ``svc``'s selector picks, ready or not (none without one): the
    endpoints indexed under its first selector pair, then the rest of the selector."""
    if not svc.selector:
        return []
    return [ep for ep in cache.labelled(svc.network, *min(svc.selector.items()))
            if ep.policy_namespace == svc.namespace
            and all(ep.labels.get(k) == v for k, v in svc.selector.items())]


def running(cache: Cache, ep: Endpoint) -> bool:
    """Not an endpoint of a `plexus run` container that exited (kept until `plexus rm`)."""
    return (ep.node, ep.container_id) not in cache.stopped


def serving(cache: Cache, key: str, svc: Service, ep: Endpoint) -> bool:
    """``backs``, its container running, and not failing the service's readiness check."""
    return backs(svc, ep) and running(cache, ep) and (key, ep.store_key) not in cache.failing


class Members:
    """``wanted``: which services to follow (the DNS reconciler follows headless ones only)."""

    def __init__(self, cache: Cache, wanted: Callable[[Service], bool] = lambda _: True) -> None:
        self._cache = cache
        self._wanted = wanted
        self._of_service: dict[str, set[str]] = {}  # service key -> endpoint store keys
        self._of_endpoint: dict[str, set[str]] = {}  # endpoint store key -> service keys

    def load(self) -> None:
        """Everything again, from the cache."""
        self._of_service = {k: set() for k, s in self._cache.services.items() if self._wanted(s)}
        self._of_endpoint = {}
        for key, ep in self._cache.endpoints.items():
            self._join(key, self._selecting(ep))

    def endpoint(self, key: str) -> set[str]:
        """The endpoint at ``key`` changed: the services whose endpoints may have changed."""
        before = self._of_endpoint.pop(key, set())
        for svc in before:
            self._of_service.get(svc, set()).discard(key)
        ep = self._cache.endpoint(key)
        now = set() if ep is None else self._selecting(ep)
        self._join(key, now)
        return before | now

    def service(self, key: str) -> None:
        """The service at ``key`` changed (or was created or removed)."""
        for ep_key in self._of_service.pop(key, set()):
            self._of_endpoint.get(ep_key, set()).discard(key)
        svc = self._cache.services.get(key)
        if svc is None or not self._wanted(svc):
            return
        self._of_service[key] = set()
        if not svc.selector:
            return
        for ep in self._cache.labelled(svc.network, *min(svc.selector.items())):
            if serving(self._cache, key, svc, ep):
                self._join(ep.store_key, {key})

    def of(self, key: str) -> list[Endpoint]:
        """The ready endpoints of a service, in store-key order."""
        found = (self._cache.endpoint(k) for k in sorted(self._of_service.get(key, ())))
        return [ep for ep in found if ep is not None]

    def _selecting(self, ep: Endpoint) -> set[str]:
        if ep.state != "ready" or not ep.addresses or not running(self._cache, ep):
            return set()
        services, failing = self._cache.services, self._cache.failing
        return {k for k in self._cache.services_selecting(ep)
                if self._wanted(services[k]) and (k, ep.store_key) not in failing}

    def _join(self, ep_key: str, services: set[str]) -> None:
        if not services:
            return
        self._of_endpoint.setdefault(ep_key, set()).update(services)
        for svc in services:
            self._of_service.setdefault(svc, set()).add(ep_key)


# -- frontends -----------------------------------------------------------------------------------


def target_of(port: ServicePort, ep: Endpoint) -> int | None:
    """The container port ``ep`` serves ``port`` on; None for a name it does not expose."""
    target = port.target_port
    if isinstance(target, int):
        return target
    return next((x.port for x in ep.exposes
                 if x.name == target and x.protocol == port.protocol), None)


def unresolved(svc: Service, endpoints: Iterable[Endpoint]) -> list[str]:
    """The named target ports of ``svc`` that some endpoint does not expose."""
    eps = list(endpoints)
    return [str(p) for p in svc.ports if isinstance(p.target_port, str)
            and (not eps or any(target_of(p, ep) is None for ep in eps))]


def frontends(svc: Service, endpoints: Iterable[Endpoint]) -> list[Frontend]:
    """One frontend per (VIP, port); none for a headless service."""
    eps = list(endpoints)
    out = []
    for vip in svc.vips:
        for port in svc.ports:
            out.append(Frontend(svc.ref, port.name, port.protocol, vip, port.port,
                                _backends(port, eps, vip.version), svc.affinity_seconds,
                                _published(svc, port, vip)))
    return out


def _backends(port: ServicePort, eps: list[Endpoint], version: int) -> tuple[Backend, ...]:
    found: dict[tuple[int, int], Backend] = {}
    for ep in eps:
        target = target_of(port, ep)
        if target is None:
            continue
        for a in ep.addresses:
            if a.version == version:
                # keyed by numbers: sorting the dataclasses themselves costs 3x (full syncs of
                # 10,000 services); one family per frontend, so the order is Backend's own
                n = int(a)
                found[(n, target)] = Backend(_address(version, n), target)
                break
    return tuple(found[k] for k in sorted(found))


@functools.lru_cache(maxsize=1 << 18)
def _address(version: int, value: int) -> IPAddress:
    """An interface's address, made once: ``IPv4Interface.ip`` builds a new one on each call,
    and hashing the interface to cache it would cost as much (a full sync of 10,000 services
    asks 100,000 times)."""
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)


def _published(svc: Service, port: ServicePort, vip: IPAddress) -> tuple[Published, ...]:
    return tuple(sorted(
        (Published(p.address, p.host_port) for p in svc.publish
         if p.port == port.port and p.protocol == port.protocol
         and (p.address is None or p.address.version == vip.version)),
        key=lambda p: (str(p.address), p.port)))


"""Links, addresses and routes: networks and this host's endpoints, through their drivers.

Objects are ``net:NAME`` and ``ep:STORE_KEY``. For each, the reconciler compares what the
cache wants with what it last applied and calls the network's driver only when they differ, so a
change that does not concern links (an endpoint turning "ready", a new alias) costs nothing
here. ``invalidate`` forgets what was applied (and so does it again), for the objects a kernel
event or the periodic pass found out of step; ``adopt`` records what a snapshot of the kernel
shows already right, so a restarted agent does not touch the links of running containers.

An endpoint whose network namespace has vanished (the container is gone without a detach) is
handed to ``on_gone``: releasing it is a change of desired state, which only services make.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

from plexus.dataplane.drivers import NetworkDriver
from plexus.errors import DataplaneError, NotFound
from plexus.model.types import Endpoint, Network
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")

Gone = Callable[[Endpoint], None]
"""Told (on the event loop, not awaited: releasing waits for this reconciler) of an endpoint
whose namespace vanished."""


KernelView = tuple[object, ...]


def _kernel_view(ep: Endpoint) -> KernelView:
    """The fields of an endpoint its links depend on (state, names, labels... do not). A tuple
    of references to the cached endpoint's own values: kept per endpoint, so it must be small."""
    return (ep.network, ep.netns, ep.ifname, ep.addresses, ep.gateways, ep.mac, ep.peer_in_host)


class LinkReconciler(Reconciler):
    name = "links"
    refreshes = True

    def __init__(self, cache: Cache, drivers: Mapping[str, NetworkDriver], on_gone: Gone,
                 workers: int = 16) -> None:
        super().__init__()
        self.workers = workers
        self._cache = cache
        self._drivers = drivers
        self._on_gone = on_gone
        self._nets: dict[str, Network] = {}
        # store key -> (the endpoint, its kernel view) as applied
        self._eps: dict[str, tuple[Endpoint, KernelView]] = {}
        self._net_locks: dict[str, asyncio.Lock] = {}

    def forget_applied(self, key: str) -> None:
        kind, _, name = key.partition(":")
        if kind == "net":
            self._nets.pop(name, None)
        else:
            self._eps.pop(name, None)

    def adopt_network(self, net: Network) -> None:
        self._nets[net.name] = net

    def adopt_endpoint(self, ep: Endpoint) -> None:
        self._eps[ep.store_key] = (ep, _kernel_view(ep))

    def driver(self, net: Network) -> NetworkDriver:
        return self._drivers[net.driver]

    async def reconcile(self, key: str) -> None:
        kind, _, name = key.partition(":")
        if kind == "net":
            await self._network(name)
        elif kind == "ep":
            await self._endpoint(name)

    async def _network(self, name: str) -> None:
        async with self._net_locks.setdefault(name, asyncio.Lock()):
            want, have = self._cache.network(name), self._nets.get(name)
            if want == have:
                return
            if want is None:
                assert have is not None
                await self.driver(have).delete_network(have)
                del self._nets[name]
                return
            await self.driver(want).ensure_network(want)
            self._nets[name] = want

    async def _endpoint(self, key: str) -> None:
        want, have = self._cache.endpoint(key), self._eps.get(key)
        if want is not None and want.node != self._cache.node:
            return  # another host's: its agent programs it
        if want is None:
            if have is not None:
                old = have[0]
                net = self._cache.network(old.network) or self._nets.get(old.network)
                if net is not None:
                    await self.driver(net).delete_endpoint(old, wait=False)
                del self._eps[key]
            return
        view = _kernel_view(want)
        if have is not None and view == have[1]:
            return
        net = self._cache.network(want.network)
        if net is None:
            raise DataplaneError(f"network {want.network} of endpoint {want.key} is missing")
        if self._nets.get(net.name) != net:
            await self._network(net.name)
        try:
            await self.driver(net).ensure_endpoint(net, want)
        except (NotFound, DataplaneError):
            if self._vanished(want):
                log.info("network namespace %s of %s is gone: releasing it", want.netns, want.key)
                self._on_gone(want)
                return
            raise
        self._eps[key] = (want, view)

    @staticmethod
    def _vanished(ep: Endpoint) -> bool:
        # Not Docker's: it joins an endpoint before runc has made the namespace that its
        # prestart hook then mounts at SandboxKey, and it says goodbye itself.
        return bool(ep.netns) and not ep.peer_in_host and not os.path.exists(ep.netns)

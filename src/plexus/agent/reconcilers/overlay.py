"""Overlay networks' other hosts: FDB entries, neighbours and routes towards their blocks.

Objects are ``overlay:NAME``, queued when a network that spans hosts changes, when a host's
record changes (its underlay address), when a block of such a network is claimed or released,
and when an endpoint holding addresses borrowed from another host's block comes or goes
(``objects``). For each, the network's driver (a ``SpanningDriver``) compares the
hosts and blocks of the cache with what it last applied and changes only the entries of the
hosts that changed, or synchronises the whole device when this host's own part changed or it
has no record (start-up, ``invalidate`` from the full pass). The link reconciler makes and
deletes the device with the network; this one only follows the other hosts.

A host whose agent died (its lease gone) stays routed: its containers keep working and the
other hosts keep reaching them. Only its removal (``plexus host rm``) takes its entries away,
so liveness is not an input here.

``CachePeers`` is the drivers' read view of the cache: the network, this host's address and
blocks, and every other host holding blocks of it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections import defaultdict
from collections.abc import Mapping

from plexus.dataplane.drivers import NetworkDriver, SpanningDriver
from plexus.dataplane.drivers.overlay import Peers
from plexus.dataplane.overlay.model import RemoteHost
from plexus.model import keys
from plexus.model.drivers import traits
from plexus.model.types import IPAddress, IPNetwork, Network
from plexus.state.cache import Cache
from plexus.state.work import Reconciler
from plexus.store.informer import Change

log = logging.getLogger("plexus.reconcile")
PREFIX = "overlay:"


def overlay_object(name: str) -> str:
    return PREFIX + name


def objects(cache: Cache, change: Change) -> list[str]:
    """The ``overlay:NAME`` objects a datastore change touches (the cache already has it)."""
    key = change.key
    if key.startswith(keys.ENDPOINTS):  # only one with borrowed addresses is routed on its own
        name = cache.borrowing_network(key)
        net = None if name is None else cache.network(name)
        return [overlay_object(net.name)] if net is not None and _spans(net) else []
    if key.startswith(keys.NETWORKS):
        net = cache.network(key[len(keys.NETWORKS):])
        return [overlay_object(net.name)] if net is not None and _spans(net) else []
    if key.startswith(keys.HOSTS):
        return [overlay_object(n.name) for n in cache.networks.values() if _spans(n)]
    if key.startswith(keys.HOST_BLOCKS):
        subnet = ipaddress.ip_network(keys.segment_cidr(key[len(keys.HOST_BLOCKS):]
                                                        .partition("/")[0]))
        return [overlay_object(n.name) for n in cache.networks.values()
                if _spans(n) and any(s.cidr == subnet for s in n.subnets)]
    return []


def _spans(net: Network) -> bool:
    return traits(net.driver).spans_hosts


class OverlayReconciler(Reconciler):
    name = "overlay"
    prefixes = (PREFIX,)

    def __init__(self, cache: Cache, drivers: Mapping[str, NetworkDriver]) -> None:
        super().__init__()
        self._cache = cache
        self._drivers = drivers

    def _driver(self, name: str) -> SpanningDriver | None:
        net = self._cache.network(name)
        driver = None if net is None else self._drivers.get(net.driver)
        return driver if isinstance(driver, SpanningDriver) else None

    async def reconcile(self, key: str) -> None:
        name = key[len(PREFIX):]
        driver = self._driver(name)
        if driver is not None:
            await driver.sync_peers(name)

    def forget_applied(self, key: str) -> None:
        name = key[len(PREFIX):]
        driver = self._driver(name)
        if driver is not None:
            driver.forget_peers(name)

    def invalidate_all(self) -> None:
        """The full pass: every spanning network is compared with the kernel again."""
        for net in list(self._cache.networks.values()):
            if _spans(net):
                self.invalidate(overlay_object(net.name))


class CachePeers:
    """The overlay drivers' read view of the cache (``OverlayPeers``)."""

    def __init__(self, cache: Cache, advertise_address: str) -> None:
        self._cache = cache
        self._underlay = _address(advertise_address)

    def network(self, name: str) -> Network | None:
        return self._cache.network(name)

    def peers(self, net: Network) -> Peers:
        """O(the network's blocks + hosts holding them + borrowed addresses)."""
        held: dict[str, list[IPNetwork]] = defaultdict(list)
        for subnet in net.subnets:
            for block, node in self._cache.blocks.get(subnet.cidr, {}).items():
                held[node].append(block)
        borrowed: dict[str, list[IPAddress]] = defaultdict(list)
        for ep in self._cache.borrowed_on(net.name):
            borrowed[ep.node] += ep.borrowed
        remotes: dict[str, RemoteHost] = {}
        for node in held.keys() | borrowed.keys():
            host = self._cache.hosts.get(node)
            underlay = None if host is None else _address(host.address)
            if node == self._cache.node:
                continue
            if underlay is None:  # removed, or it never had an address: nowhere to send to
                log.debug("overlay %s: host %s holds blocks but has no address", net.name, node)
                continue
            remotes[node] = RemoteHost(node, underlay, _ordered(held.get(node, [])),
                                       tuple(sorted(borrowed.get(node, ()), key=_order)))
        mine = tuple(sorted(borrowed.get(self._cache.node, ()), key=_order))
        return Peers(self._cache.node, self._underlay, _ordered(held.get(self._cache.node, [])),
                     remotes, mine)


def _ordered(blocks: list[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(blocks, key=lambda b: (b.version, int(b.network_address))))


def _order(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))


@functools.lru_cache(maxsize=1 << 16)
def _address(text: str) -> IPAddress | None:
    """Memoised: ``peers`` reads every host's address on every change of the overlay, and
    parsing 1,000 of them was most of its time (bench/cluster.py)."""
    try:
        return ipaddress.ip_address(text) if text else None
    except ValueError:
        return None

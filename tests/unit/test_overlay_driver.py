"""The overlay's wiring without a kernel: which datastore changes queue which overlay objects,
what the cache's view says of a network's hosts, and when the driver applies one host's entries
and when it synchronises the whole device (an in-memory applier records what it was asked)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest

from plexus.agent.reconcilers.overlay import CachePeers, OverlayReconciler, objects
from plexus.dataplane.drivers import SpanningDriver
from plexus.dataplane.drivers.overlay import OverlayDriver, block_gateways, stale_gateways
from plexus.dataplane.overlay.model import OverlayKernelState, RemoteHost
from plexus.dataplane.overlay.render import DeviceStep, OverlayDelta, diff
from plexus.errors import DataplaneError
from plexus.model import keys
from plexus.model.types import Host, IPAddress, Network, Subnet
from plexus.state.cache import Cache
from plexus.store.base import KeyValue
from plexus.store.informer import Change

net = ipaddress.ip_network
OV = Network("ov", "0123456789abcdef", driver="overlay", vni=4096, block_size=28,
             subnets=(Subnet(net("10.78.0.0/24"), ipaddress.ip_address("10.78.0.1")),))
BR = Network("br", "fedcba9876543210", subnets=(Subnet(net("10.80.0.0/24")),))


def put(key: str, value: str, rev: int = 1) -> Change:
    return Change(key, KeyValue(key, value, rev, rev, 1), rev)


def gone(key: str, rev: int = 1) -> Change:
    return Change(key, None, rev)


def host(name: str, address: str) -> Change:
    return put(keys.host(name), Host(name, address, name).to_json())


def block(cidr: str, node: str) -> Change:
    return put(keys.host_block("10.78.0.0/24", cidr), node)


def cache_of(*changes: Change) -> Cache:
    cache = Cache("n1")
    cache.apply([put(keys.network("ov"), OV.to_json()), put(keys.network("br"), BR.to_json()),
                 host("n1", "192.0.2.1"), host("n2", "192.0.2.2"), host("n3", "192.0.2.3"),
                 *changes])
    return cache


# -- which objects a change queues ---------------------------------------------------------------


def test_hosts_blocks_and_overlay_networks_queue_the_overlay_objects() -> None:
    cache = cache_of()
    assert objects(cache, block("10.78.0.16/28", "n2")) == ["overlay:ov"]
    assert objects(cache, host("n4", "192.0.2.4")) == ["overlay:ov"]  # every spanning network
    assert objects(cache, put(keys.network("ov"), OV.to_json())) == ["overlay:ov"]
    assert objects(cache, put(keys.network("br"), BR.to_json())) == []
    assert objects(cache, put(keys.host_lease("n2"), "id")) == []  # liveness routes nothing
    other = put(keys.host_block("10.99.0.0/24", "10.99.0.0/28"), "n2")
    assert objects(cache, other) == []


# -- the cache's view --------------------------------------------------------------------------


def test_peers_are_the_other_hosts_holding_blocks_with_their_addresses() -> None:
    cache = cache_of(block("10.78.0.0/28", "n1"), block("10.78.0.32/28", "n2"),
                     block("10.78.0.16/28", "n2"), block("10.78.0.48/28", "ghost"))
    peers = CachePeers(cache, "192.0.2.1").peers(OV)
    assert (peers.node, str(peers.underlay), [str(b) for b in peers.blocks]) == (
        "n1", "192.0.2.1", ["10.78.0.0/28"])
    # n3 holds nothing; "ghost" holds a block but has no host record: nowhere to send to
    assert dict(peers.remotes) == {"n2": RemoteHost(
        "n2", ipaddress.ip_address("192.0.2.2"), (net("10.78.0.16/28"), net("10.78.0.32/28")))}
    assert CachePeers(cache, "").peers(OV).underlay is None


# -- the driver's choices ------------------------------------------------------------------------


@dataclass
class RecordingApplier:
    """The applier's seam in memory: the kernel is whatever was last synced or updated."""

    held: OverlayKernelState = field(default_factory=OverlayKernelState)
    calls: list[str] = field(default_factory=list)
    fail_updates: bool = False

    async def sync(self, want: OverlayKernelState) -> OverlayDelta:
        self.calls.append("sync")
        delta = diff(self.held, want)
        self.held = want
        return delta

    async def update(self, delta: OverlayDelta) -> bool:
        self.calls.append("update")
        if self.fail_updates:
            return False
        self.held = OverlayKernelState(
            self.held.device, self.held.addresses,
            (self.held.fdb - set(delta.fdb.remove)) | set(delta.fdb.add) | set(delta.fdb.change),
            (self.held.neigh - set(delta.neigh.remove)) | set(delta.neigh.add),
            (self.held.routes - set(delta.routes.remove)) | set(delta.routes.add))
        assert delta.step is DeviceStep.KEEP
        return True

    async def underlay_mtu(self, ip: IPAddress) -> int:
        return 1500

    async def remove(self, name: str, alias: str = "") -> bool:
        self.calls.append("remove")
        return True

    def close(self) -> None:
        return None


def driver_of(cache: Cache, underlay: str = "192.0.2.1") -> tuple[OverlayDriver, RecordingApplier]:
    applier = RecordingApplier()
    # The host's netlink is not used by sync_peers: only ensure_network makes the bridge.
    return OverlayDriver(None, "n1@0000", CachePeers(cache, underlay), applier), applier  # type: ignore[arg-type]


async def test_a_remote_host_change_is_applied_alone_and_a_local_one_synchronises() -> None:
    cache = cache_of(block("10.78.0.0/28", "n1"), block("10.78.0.16/28", "n2"))
    driver, applier = driver_of(cache)
    assert isinstance(driver, SpanningDriver)
    await driver.sync_peers("ov")  # no record yet: read, compare, apply
    assert applier.calls == ["sync"]
    assert {str(r.dst) for r in applier.held.routes} == {"10.78.0.16/28"}
    cache.apply([block("10.78.0.32/28", "n3"), block("10.78.0.48/28", "n2")])
    await driver.sync_peers("ov")  # two other hosts changed: their own entries, no read
    assert applier.calls == ["sync", "update", "update"]
    assert {str(r.dst) for r in applier.held.routes} == {
        "10.78.0.16/28", "10.78.0.32/28", "10.78.0.48/28"}
    assert len(applier.held.fdb) == len(applier.held.neigh) == 2
    await driver.sync_peers("ov")  # nothing changed: nothing sent
    assert applier.calls == ["sync", "update", "update"]
    cache.apply([block("10.78.0.64/28", "n1")])  # this host's own blocks: the whole device
    await driver.sync_peers("ov")
    assert applier.calls[-1] == "sync"
    cache.apply([gone(keys.host("n3"))])  # removed (host rm): its entries go
    await driver.sync_peers("ov")
    assert {str(r.dst) for r in applier.held.routes} == {"10.78.0.16/28", "10.78.0.48/28"}


async def test_a_failed_update_or_a_forgotten_record_synchronises() -> None:
    cache = cache_of(block("10.78.0.0/28", "n1"))
    driver, applier = driver_of(cache)
    await driver.sync_peers("ov")
    applier.fail_updates = True
    cache.apply([block("10.78.0.16/28", "n2")])
    await driver.sync_peers("ov")
    assert applier.calls == ["sync", "update", "sync"]
    assert {str(r.dst) for r in applier.held.routes} == {"10.78.0.16/28"}
    driver.forget_peers("ov")
    await driver.sync_peers("ov")
    assert applier.calls[-1] == "sync"


async def test_networks_gone_or_not_overlays_are_left_alone() -> None:
    driver, applier = driver_of(cache_of())
    await driver.sync_peers("br")
    await driver.sync_peers("nothing")
    assert applier.calls == []


async def test_an_overlay_needs_this_hosts_advertise_address() -> None:
    driver, _ = driver_of(cache_of(), underlay="")
    with pytest.raises(DataplaneError, match="overlay network ov needs this host's "
                                             "--advertise-address"):
        await driver.sync_peers("ov")


async def test_the_reconciler_hands_overlay_objects_to_the_networks_driver() -> None:
    cache = cache_of(block("10.78.0.16/28", "n2"))
    driver, applier = driver_of(cache)
    r = OverlayReconciler(cache, {"overlay": driver, "bridge": object()})  # type: ignore[dict-item]
    await r.reconcile("overlay:ov")
    await r.reconcile("overlay:br")  # a bridge network: its driver follows no other host
    assert applier.calls == ["sync"]
    r.forget_applied("overlay:ov")
    await r.reconcile("overlay:ov")
    assert applier.calls == ["sync", "sync"]


# -- IPv6: a gateway per block on the bridge -----------------------------------------------------

OV6 = Network("ov6", "00112233445566778", driver="overlay", vni=4097, block_size=26,
              subnets=(Subnet(net("10.78.0.0/24"), ipaddress.ip_address("10.78.0.1")),
                       Subnet(net("fd00:78::/64"), ipaddress.ip_address("fd00:78::1"))))


def test_the_bridge_holds_the_last_address_of_each_ipv6_block_with_its_prefix() -> None:
    blocks = (net("10.78.0.64/26"), net("fd00:78::/122"), net("fd00:78::80/122"))
    assert {str(g) for g in block_gateways(OV6, blocks)} == {
        "fd00:78::3f/122", "fd00:78::bf/122"}  # none for IPv4 (proxy ARP)
    assert block_gateways(OV, (net("10.78.0.0/28"),)) == frozenset()


def test_only_gateways_of_blocks_no_longer_held_are_stale() -> None:
    iface = ipaddress.ip_interface
    want = block_gateways(OV6, (net("fd00:78::/122"),))
    have = [iface("fd00:78::3f/122"), iface("fd00:78::7f/122"),  # held, released
            iface("fd00:78::1/128"), iface("10.78.0.1/24"),  # the subnets' gateways
            iface("fd00:99::3f/122"), iface("fd00:78::7e/122"), iface("fd00:78::bf/64")]
    assert stale_gateways(OV6, have, want) == [iface("fd00:78::7f/122")]

"""Borrowed addresses in the overlay, without a kernel: every other host routes one borrowed
address (/32) to the borrower's VTEP, the borrower routes it to its bridge, and an endpoint's
arrival or departure with a borrowed address queues its network's overlay object (and one
without does not: only loans grow kernel state per container)."""

from __future__ import annotations

import ipaddress

from plexus.agent.reconcilers.overlay import CachePeers, objects
from plexus.dataplane.overlay.model import (
    HostVtep,
    OverlayKernelState,
    OverlayRoute,
    OverlaySpec,
    RemoteHost,
)
from plexus.dataplane.overlay.render import DeviceStep, desired, diff, host_delta
from plexus.model.types import Endpoint
from tests.unit.test_overlay_driver import OV, block, cache_of, driver_of, gone, put

ip = ipaddress.ip_address
net = ipaddress.ip_network
SPEC = OverlaySpec("ov", "0123456789abcdef", vni=4096, bridge="pxbr-0123456789")
LOCAL = HostVtep("n1", ip("192.0.2.1"), 1500, (net("10.78.0.0/28"),))


def test_other_hosts_route_a_borrowed_address_to_the_borrower() -> None:
    n2 = RemoteHost("n2", ip("192.0.2.2"), (net("10.78.0.16/28"),), (ip("10.78.0.5"),))
    state = desired(SPEC, LOCAL, [n2])
    assert state.routes == {OverlayRoute(net("10.78.0.16/28"), ip("10.78.0.16")),
                            OverlayRoute(net("10.78.0.5/32"), ip("10.78.0.16"))}
    assert state.delivered == frozenset()


def test_a_borrower_without_a_block_has_no_vtep_to_route_to() -> None:
    n2 = RemoteHost("n2", ip("192.0.2.2"), (), (ip("10.78.0.5"),))
    assert desired(SPEC, LOCAL, [n2]).routes == frozenset()


def test_the_borrower_delivers_its_borrowed_addresses_on_its_bridge() -> None:
    me = HostVtep("n1", ip("192.0.2.1"), 1500, (net("10.78.0.0/28"),), (ip("10.78.0.20"),))
    state = desired(SPEC, me, [RemoteHost("n2", ip("192.0.2.2"), (net("10.78.0.16/28"),))])
    assert (state.bridge, state.delivered) == (
        "pxbr-0123456789", {OverlayRoute(net("10.78.0.20/32"), None)})
    # the block's route to its holder stays: the /32 on the bridge is more specific
    assert OverlayRoute(net("10.78.0.16/28"), ip("10.78.0.16")) in state.routes
    delta = diff(OverlayKernelState(), state)
    assert (delta.bridge, delta.delivered.add) == (
        "pxbr-0123456789", (OverlayRoute(net("10.78.0.20/32"), None),))
    # a device made anew leaves the bridge's routes where they are
    again = diff(OverlayKernelState(bridge=state.bridge, delivered=state.delivered), state)
    assert again.step is DeviceStep.CREATE and len(again.delivered) == 0


def test_a_loan_and_its_return_are_one_route_each() -> None:
    device = desired(SPEC, LOCAL, []).device
    assert device is not None
    before = RemoteHost("n2", ip("192.0.2.2"), (net("10.78.0.16/28"),))
    after = RemoteHost("n2", ip("192.0.2.2"), (net("10.78.0.16/28"),), (ip("10.78.0.5"),))
    lent = host_delta(4096, device, before, after)
    assert (lent.routes.add, len(lent)) == ((OverlayRoute(net("10.78.0.5/32"),
                                                          ip("10.78.0.16")),), 1)
    back = host_delta(4096, device, after, before)
    assert (back.routes.remove, len(back)) == (lent.routes.add, 1)


def endpoint(node: str, address: str, borrowed: bool) -> Endpoint:
    a = ipaddress.ip_interface(f"{address}/24")
    return Endpoint("c-" + address, "eth0", "ov", node, "/x", addresses=(a,),
                    borrowed=(a.ip,) if borrowed else (), state="ready")


def test_endpoints_with_borrowed_addresses_queue_their_overlay_and_others_do_not() -> None:
    loan, own = endpoint("n2", "10.78.0.5", True), endpoint("n2", "10.78.0.17", False)
    cache = cache_of()
    for ep in (loan, own):
        cache.apply([put(ep.store_key, ep.to_json())])
    assert objects(cache, put(loan.store_key, loan.to_json())) == ["overlay:ov"]
    assert objects(cache, put(own.store_key, own.to_json())) == []
    cache.apply([gone(loan.store_key, 2), gone(own.store_key, 2)])
    assert objects(cache, gone(loan.store_key, 2)) == ["overlay:ov"]  # gone: told once
    assert objects(cache, gone(loan.store_key, 2)) == []
    assert objects(cache, gone(own.store_key, 2)) == []
    assert cache.borrowed_on("ov") == []


def test_peers_carry_the_borrowed_addresses_of_each_host() -> None:
    cache = cache_of(block("10.78.0.0/28", "n1"), block("10.78.0.16/28", "n2"))
    mine, theirs = endpoint("n1", "10.78.0.20", True), endpoint("n2", "10.78.0.5", True)
    cache.apply([put(e.store_key, e.to_json()) for e in (mine, theirs)])
    peers = CachePeers(cache, "192.0.2.1").peers(OV)
    assert peers.borrowed == (ip("10.78.0.20"),)
    assert peers.remotes["n2"].borrowed == (ip("10.78.0.5"),)


async def test_a_loan_of_this_host_synchronises_its_device_and_bridge() -> None:
    cache = cache_of(block("10.78.0.0/28", "n1"), block("10.78.0.16/28", "n2"))
    driver, applier = driver_of(cache)
    await driver.sync_peers("ov")
    mine = endpoint("n1", "10.78.0.20", True)
    cache.apply([put(mine.store_key, mine.to_json())])
    await driver.sync_peers("ov")
    assert applier.calls == ["sync", "sync"]  # this host's part changed: not an update
    assert applier.held.delivered == {OverlayRoute(net("10.78.0.20/32"), None)}
    assert applier.held.bridge == OV.bridge
    cache.apply([gone(mine.store_key, 3)])
    await driver.sync_peers("ov")
    assert applier.held.delivered == frozenset()

"""The overlay renderer and diff (pure): what a host's kernel must hold for an overlay network,
and how a change of hosts or blocks turns into a delta that touches only what changed."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.dataplane.overlay.model import (
    FdbEntry,
    HostVtep,
    NeighEntry,
    OverlayKernelState,
    OverlayRoute,
    OverlaySpec,
    RemoteHost,
    device_name,
    overlay_mtu,
    vtep_addresses,
    vtep_mac,
)
from plexus.dataplane.overlay.render import (
    DeviceStep,
    desired,
    device,
    diff,
    host_delta,
    remote_objects,
)
from plexus.errors import InvalidArgument

ip = ipaddress.ip_address
net = ipaddress.ip_network
SPEC = OverlaySpec("web", "0123456789abcdef", vni=4242)


def block(i: int, version: int = 4) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The i-th /26 of 10.100.0.0/16 (IPv4) or /122 of fd00:100::/64 (IPv6)."""
    if version == 4:
        return net(f"10.100.{i // 4}.{(i % 4) * 64}/26")
    return net(f"fd00:100::{i * 64:x}/122")


def host(n: int, *blocks: int, v6: bool = False) -> RemoteHost:
    held = tuple(block(i) for i in blocks) + (tuple(block(i, 6) for i in blocks) if v6 else ())
    return RemoteHost(f"node{n}", ip(f"192.0.2.{n}"), held)


LOCAL = HostVtep("node1", ip("192.0.2.1"), 1500, (block(0), block(1)))


def render(*remotes: RemoteHost, local: HostVtep = LOCAL) -> OverlayKernelState:
    return desired(SPEC, local, remotes)


# --- derivations ----------------------------------------------------------------------------


def test_mtu_is_the_underlays_less_vxlan_overhead() -> None:
    assert overlay_mtu(1500, 4) == 1450
    assert overlay_mtu(1500, 6) == 1430
    assert overlay_mtu(9000, 4) == 8950
    dev = render().device
    assert dev is not None and dev.mtu == 1450
    v6 = HostVtep("node1", ip("2001:db8::1"), 1500, (block(0),))
    dev6 = desired(SPEC, v6, [RemoteHost("node2", ip("2001:db8::2"), (block(4),))]).device
    assert dev6 is not None and dev6.mtu == 1430 and dev6.local == ip("2001:db8::1")


def test_an_explicit_mtu_wins_over_the_underlays() -> None:
    spec = OverlaySpec("web", "0123456789abcdef", vni=1, mtu=1400)
    dev = desired(spec, LOCAL, []).device
    assert dev is not None and dev.mtu == 1400


def test_an_underlay_too_small_for_ipv6_is_refused() -> None:
    local = HostVtep("node1", ip("192.0.2.1"), 1300, (block(0, 6),))
    with pytest.raises(InvalidArgument, match="overlay mtu 1250.*IPv6 needs at least 1280"):
        desired(SPEC, local, [])


def test_vtep_mac_is_stable_unicast_and_locally_administered() -> None:
    mac = vtep_mac("node1", 4242)
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)
    first = int(mac[:2], 16)
    assert first & 0x01 == 0, "unicast"
    assert first & 0x02 == 0x02, "locally administered"
    assert vtep_mac("node1", 4242) == mac
    # Pinned: every host of a cluster must derive the same MAC, whatever its plexus version.
    assert mac == "de:9a:2f:92:cc:3c"
    assert len({vtep_mac(f"node{i}", v) for i in range(200) for v in (1, 2)}) == 400


def test_vtep_address_is_the_lowest_blocks_network_address_per_version() -> None:
    found = vtep_addresses([block(5), block(2), block(3, 6), block(1, 6)])
    assert found == {4: ip("10.100.0.128"), 6: ip("fd00:100::40")}
    assert vtep_addresses([]) == {}


def test_device_name_fits_ifnamsiz() -> None:
    assert device_name("0123456789abcdef") == "pxvx-0123456789"
    assert len(device_name("f" * 64)) <= 15


def test_bad_vni_and_port_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidArgument, match="invalid vni 0"):
        OverlaySpec("web", "x", vni=0)
    with pytest.raises(InvalidArgument, match="invalid vni 16777216"):
        OverlaySpec("web", "x", vni=1 << 24)
    with pytest.raises(InvalidArgument, match="invalid vxlan port 0"):
        OverlaySpec("web", "x", vni=1, port=0)


# --- desired state --------------------------------------------------------------------------


def test_device_attributes() -> None:
    dev = render().device
    assert dev is not None
    assert (dev.name, dev.vni, dev.local, dev.port) == ("pxvx-0123456789", 4242,
                                                       ip("192.0.2.1"), 4789)
    assert not dev.learning and dev.remote is None and dev.up
    assert dev.mac == vtep_mac("node1", 4242)
    assert dev.tx_checksum is False  # offload off by default
    on = desired(OverlaySpec("web", "0123456789abcdef", vni=4242, offload=True), LOCAL, [])
    assert on.device is not None and on.device.tx_checksum is True


def test_each_remote_host_gets_one_fdb_entry_one_neighbour_and_a_route_per_block() -> None:
    state = render(host(2, 4, 5), host(3, 8))
    mac2, mac3 = vtep_mac("node2", 4242), vtep_mac("node3", 4242)
    assert state.fdb == {FdbEntry(mac2, ip("192.0.2.2")), FdbEntry(mac3, ip("192.0.2.3"))}
    assert state.neigh == {NeighEntry(ip("10.100.1.0"), mac2), NeighEntry(ip("10.100.2.0"), mac3)}
    assert state.routes == {
        OverlayRoute(block(4), ip("10.100.1.0")),
        OverlayRoute(block(5), ip("10.100.1.0")),
        OverlayRoute(block(8), ip("10.100.2.0")),
    }
    assert {str(a) for a in state.addresses} == {"10.100.0.0/32"}


def test_a_remote_host_without_blocks_gets_nothing() -> None:
    state = render(RemoteHost("node2", ip("192.0.2.2")))
    assert not state.fdb and not state.neigh and not state.routes


def test_ipv6_blocks_get_ipv6_neighbours_and_routes_over_an_ipv4_underlay() -> None:
    local = HostVtep("node1", ip("192.0.2.1"), 1500, (block(0), block(0, 6)))
    state = desired(SPEC, local, [host(2, 4, v6=True)])
    mac2 = vtep_mac("node2", 4242)
    assert state.fdb == {FdbEntry(mac2, ip("192.0.2.2"))}  # one per host, whatever the families
    assert state.neigh == {NeighEntry(ip("10.100.1.0"), mac2),
                           NeighEntry(ip("fd00:100::100"), mac2)}
    assert OverlayRoute(block(4, 6), ip("fd00:100::100")) in state.routes
    assert {str(a) for a in state.addresses} == {"10.100.0.0/32", "fd00:100::/128"}


def test_kernel_objects_grow_with_hosts_and_blocks_only() -> None:
    state = render(host(2, 4, 5), host(3, 8, 9))
    assert state.counts() == {"addresses": 1, "fdb": 2, "neigh": 2, "routes": 4,
                              "delivered": 0}


@pytest.mark.parametrize(("remotes", "match"), [
    ([host(2, 1)], "block '10.100.0.64/26': node2's overlaps 10.100.0.64/26 of node1"),
    ([host(2, 4), host(3, 4)], "overlaps 10.100.1.0/26"),
    ([RemoteHost("node2", ip("192.0.2.2"), (net("10.100.0.0/16"),))], "overlaps"),
    ([host(2, 4), host(2, 5)], "node 'node2': listed twice"),
    ([RemoteHost("node2", ip("192.0.2.1"))],
     "underlay address '192.0.2.1': node2 and node1 both have it"),
    ([RemoteHost("node2", ip("2001:db8::2"))], "node2's is IPv6, this host's IPv4"),
])
def test_hosts_that_cannot_coexist_are_refused(remotes: list[RemoteHost], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        render(*remotes)


# --- diff -----------------------------------------------------------------------------------


def test_the_same_state_makes_an_empty_delta() -> None:
    state = render(host(2, 4), host(3, 8))
    delta = diff(state, state)
    assert delta.empty and delta.step is DeviceStep.KEEP and delta.tx_checksum is None


def test_a_new_device_comes_with_every_entry_and_offload_turned_off() -> None:
    want = render(host(2, 4), host(3, 8))
    delta = diff(OverlayKernelState(), want)
    assert delta.step is DeviceStep.CREATE and delta.tx_checksum is False
    assert set(delta.fdb.add) == want.fdb and set(delta.routes.add) == want.routes
    assert len(delta) == 1 + 1 + 1 + 2 + 2 + 2  # device, offload, address, fdb, neigh, routes


def test_adding_a_remote_host_adds_only_its_objects() -> None:
    before, after = render(host(2, 4)), render(host(2, 4), host(3, 8, 9))
    delta = diff(before, after)
    fdb, neigh, routes = remote_objects(4242, host(3, 8, 9))
    assert delta.step is DeviceStep.KEEP and delta.tx_checksum is None
    assert (set(delta.fdb.add), set(delta.neigh.add), set(delta.routes.add)) == (fdb, neigh, routes)
    assert not (delta.fdb.remove or delta.neigh.remove or delta.routes.remove or delta.addresses)
    assert not (delta.fdb.change or delta.neigh.change or delta.routes.change)
    assert len(delta) == 4


def test_removing_a_remote_host_removes_exactly_its_objects() -> None:
    delta = diff(render(host(2, 4), host(3, 8, 9)), render(host(2, 4)))
    fdb, neigh, routes = remote_objects(4242, host(3, 8, 9))
    assert (set(delta.fdb.remove), set(delta.neigh.remove), set(delta.routes.remove)) == (
        fdb, neigh, routes)
    assert len(delta) == 4


def test_a_remote_block_above_its_vtep_block_adds_one_route() -> None:
    delta = diff(render(host(2, 4)), render(host(2, 4, 7)))
    assert delta.routes.add == (OverlayRoute(block(7), ip("10.100.1.0")),)
    assert len(delta) == 1


def test_a_local_block_changes_no_remote_entry() -> None:
    more = HostVtep("node1", ip("192.0.2.1"), 1500, (*LOCAL.blocks, block(12)))
    assert diff(render(host(2, 4)), render(host(2, 4), local=more)).empty


def test_a_moved_vtep_address_replaces_the_neighbour_and_reroutes_blocks() -> None:
    delta = diff(render(host(2, 4, 5)), render(host(2, 5)))  # its lowest block released
    mac2 = vtep_mac("node2", 4242)
    assert delta.neigh.add == (NeighEntry(ip("10.100.1.64"), mac2),)
    assert delta.neigh.remove == (NeighEntry(ip("10.100.1.0"), mac2),)
    assert delta.routes.change == (OverlayRoute(block(5), ip("10.100.1.64")),)
    assert delta.routes.remove == (OverlayRoute(block(4), ip("10.100.1.0")),)


def test_a_moved_remote_underlay_replaces_its_fdb_entry() -> None:
    moved = RemoteHost("node2", ip("192.0.2.99"), (block(4),))
    delta = diff(render(host(2, 4)), render(moved))
    assert delta.fdb.change == (FdbEntry(vtep_mac("node2", 4242), ip("192.0.2.99")),)
    assert len(delta) == 1


def test_a_fixed_attribute_recreates_the_device_with_all_its_entries() -> None:
    have = render(host(2, 4))
    want = desired(OverlaySpec("web", "0123456789abcdef", vni=7), LOCAL, [host(2, 4)])
    delta = diff(have, want)
    assert delta.step is DeviceStep.RECREATE
    assert len(delta.fdb.add) == 1 and len(delta.routes.add) == 1 and not delta.fdb.remove


def test_mtu_or_alias_are_set_in_place() -> None:
    have = render(host(2, 4))
    bigger = HostVtep("node1", ip("192.0.2.1"), 9000, LOCAL.blocks)
    delta = diff(have, render(host(2, 4), local=bigger))
    assert delta.step is DeviceStep.UPDATE and len(delta) == 1


def test_no_device_wanted_deletes_it_and_nothing_else() -> None:
    delta = diff(render(host(2, 4)), OverlayKernelState())
    assert delta.step is DeviceStep.DELETE and len(delta) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=8, unique=True), st.data())
def test_a_host_leaving_touches_only_its_own_objects(nodes: list[int], data: st.DataObject) -> None:
    remotes = [host(n + 1, 2 * n + 4, 2 * n + 5, v6=n % 2 == 0) for n in nodes]
    gone = data.draw(st.sampled_from(remotes))
    before, after = render(*remotes), render(*(r for r in remotes if r is not gone))
    fdb, neigh, routes = remote_objects(4242, gone)
    removed = diff(before, after)
    assert (set(removed.fdb.remove), set(removed.neigh.remove), set(removed.routes.remove)) == (
        fdb, neigh, routes)
    assert len(removed) == len(fdb) + len(neigh) + len(routes)
    added = diff(after, before)
    assert (set(added.fdb.add), set(added.neigh.add), set(added.routes.add)) == (fdb, neigh, routes)
    assert len(added) == len(removed)


def test_one_hosts_delta_equals_the_diff_of_whole_states() -> None:
    others = [host(n, 4 * n, 4 * n + 1) for n in range(2, 12)]
    dev = device(SPEC, LOCAL)
    new, moved = host(12, 60, 61, v6=True), RemoteHost("node5", ip("192.0.2.99"), (block(20),))
    assert host_delta(4242, dev, None, new) == diff(render(*others), render(*others, new))
    assert host_delta(4242, dev, new, None) == diff(render(*others, new), render(*others))
    changed = [moved if r.node == "node5" else r for r in others]
    assert host_delta(4242, dev, others[3], moved) == diff(render(*others), render(*changed))

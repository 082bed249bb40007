"""The overlay's netlink messages (pure): each request, read back by the parser of the dump
that would list it, gives back the object it was built from; framing is what the kernel wants."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence

import pytest

from plexus.dataplane import rtnl
from plexus.dataplane.overlay import wire
from plexus.dataplane.overlay.apply import _create
from plexus.dataplane.overlay.channel import OverlaySocket
from plexus.dataplane.overlay.model import FdbEntry, NeighEntry, OverlayRoute, VxlanDevice
from plexus.errors import DataplaneError

ip = ipaddress.ip_address
net = ipaddress.ip_network
DEV = VxlanDevice("pxvx-0123456789", 4242, ip("192.0.2.1"), 4789, "02:11:22:33:44:55", 1450,
                  "plexus:n1@abc:net:web", tx_checksum=False)


def body(message: bytes) -> tuple[int, int, memoryview]:
    """(type, flags, payload) of one request."""
    (kind, flags, _, payload), = list(rtnl.messages(memoryview(message)))
    return kind, flags, payload


def test_every_request_is_whole_words_long() -> None:
    # The kernel steps from message to message by NLMSG_ALIGN(len): a request whose header
    # struct is a byte short (ndmsg is 12 bytes) shifts every message after it in a batch.
    assert wire._NDMSG.size == 12 and wire._RTMSG.size == 12 and wire._IFINFOMSG.size == 16
    requests = [
        wire.create_vxlan_request(1, DEV), wire.setlink_request(1, DEV),
        wire.addrgen_none_request(1, DEV.name), wire.getlink_request(1, DEV.name),
        wire.fdb_request(1, 5, FdbEntry("02:00:00:00:00:01", ip("192.0.2.2"))),
        wire.neigh_request(1, 5, NeighEntry(ip("fd00::40"), "02:00:00:00:00:01"), delete=True),
        wire.route_request(1, 5, OverlayRoute(net("10.1.0.64/26"), ip("10.1.0.64"))),
        wire.delroute_request(1, 5, OverlayRoute(net("10.1.0.64/26"), None)),
        wire.deladdr_request(1, 5, ipaddress.ip_interface("10.1.0.0/32")),
    ]
    for request in requests:
        assert len(request) % 4 == 0
        assert struct.unpack_from("=I", request)[0] == len(request)


def test_the_vxlan_device_request_reads_back_as_the_device() -> None:
    kind, flags, payload = body(wire.create_vxlan_request(7, DEV))
    assert kind == wire.RTM_NEWLINK and flags & wire.NLM_F_EXCL and flags & wire.NLM_F_CREATE
    link = wire.parse_link(payload)
    assert link is not None and link.kind == "vxlan"
    assert not link.up  # created down: address generation is turned off before it comes up
    assert link.device(tx_checksum=False) == VxlanDevice(
        DEV.name, DEV.vni, DEV.local, DEV.port, DEV.mac, DEV.mtu, DEV.alias, False, up=False)


def test_an_ipv6_underlay_uses_local6() -> None:
    dev6 = VxlanDevice("pxvx-x", 1, ip("2001:db8::1"), 4789, "02:00:00:00:00:01", 1430, "", True)
    link = wire.parse_link(body(wire.create_vxlan_request(1, dev6))[2])
    assert link is not None and link.local == ip("2001:db8::1")


def test_a_link_of_another_kind_is_no_device() -> None:
    link = wire.LinkRead(3, "pxvx-x", "bridge", 1500, "02:00:00:00:00:01", "", True)
    assert link.device(tx_checksum=True) is None


@pytest.mark.parametrize("entry", [FdbEntry("02:00:00:00:00:01", ip("192.0.2.2")),
                                   FdbEntry("02:00:00:00:00:02", ip("2001:db8::2"))])
def test_fdb_entries_are_permanent_self_entries_on_the_device(entry: FdbEntry) -> None:
    kind, flags, payload = body(wire.fdb_request(1, 9, entry))
    assert kind == wire.RTM_NEWNEIGH and flags & wire.NLM_F_REPLACE
    family, index, state, ntf, _ = wire._NDMSG.unpack_from(payload)
    assert (family, index, state, ntf) == (wire.AF_BRIDGE, 9, wire.NUD_PERMANENT, wire.NTF_SELF)
    found = list(wire.parse_neighbours(iter([(kind, payload)]), 9, wire.AF_BRIDGE))
    assert found == [(entry.dst, entry.mac)]
    assert not list(wire.parse_neighbours(iter([(kind, payload)]), 8, wire.AF_BRIDGE))
    assert not list(wire.parse_neighbours(iter([(kind, payload)]), 9, socket.AF_UNSPEC))


@pytest.mark.parametrize("entry", [NeighEntry(ip("10.1.0.64"), "02:00:00:00:00:01"),
                                   NeighEntry(ip("fd00::40"), "02:00:00:00:00:01")])
def test_neighbours_read_back(entry: NeighEntry) -> None:
    kind, _, payload = body(wire.neigh_request(1, 9, entry))
    assert list(wire.parse_neighbours(iter([(kind, payload)]), 9, 0)) == [(entry.ip, entry.mac)]


def test_only_permanent_neighbours_are_plexuss() -> None:
    entry = NeighEntry(ip("10.1.0.64"), "02:00:00:00:00:01")
    kind, _, payload = body(wire.neigh_request(1, 9, entry))
    stale = bytearray(payload)
    struct.pack_into("=H", stale, 8, 0x04)  # NUD_STALE: the kernel's, not plexus's
    assert not list(wire.parse_neighbours(iter([(kind, memoryview(stale))]), 9, 0))


@pytest.mark.parametrize("route", [OverlayRoute(net("10.1.0.64/26"), ip("10.1.0.64")),
                                   OverlayRoute(net("fd00::100/122"), ip("fd00::100"))])
def test_routes_are_onlink_in_the_main_table_with_plexuss_protocol(route: OverlayRoute) -> None:
    _, flags, payload = body(wire.route_request(1, 9, route))
    assert flags & wire.NLM_F_EXCL and not flags & wire.NLM_F_REPLACE
    *_, table, proto, _, rtype, rflags = wire._RTMSG.unpack_from(payload)
    assert (table, proto, rtype, rflags) == (254, 112, 1, wire.RTNH_F_ONLINK)
    assert list(wire.parse_routes(iter([(wire.RTM_NEWROUTE, payload)]), 9)) == [route]
    assert not list(wire.parse_routes(iter([(wire.RTM_NEWROUTE, payload)]), 8))
    _, flags, _ = body(wire.route_request(1, 9, route, replace=True))
    assert flags & wire.NLM_F_REPLACE and not flags & wire.NLM_F_EXCL


def test_another_protocols_route_is_not_plexuss() -> None:
    payload = bytearray(body(wire.route_request(1, 9, OverlayRoute(net("10.1.0.64/26"), None)))[2])
    payload[5] = 4  # RTPROT_STATIC: someone's `ip route add`
    assert not list(wire.parse_routes(iter([(wire.RTM_NEWROUTE, memoryview(payload))]), 9))


def test_route_deletion_names_plexuss_protocol() -> None:
    # The kernel then refuses to delete a route of the same prefix that is not plexus's.
    payload = body(wire.delroute_request(1, 9, OverlayRoute(net("10.1.0.64/26"), None)))[2]
    assert wire._RTMSG.unpack_from(payload)[5] == wire.RTPROT_PLEXUS


class RefusingKernel(OverlaySocket):
    """A socket whose kernel has no vxlan module: every request fails with EOPNOTSUPP."""

    def __init__(self) -> None:
        super().__init__(socket.socketpair()[0])

    def batch(self, builds: Sequence[Callable[[int], bytes]],
              count: bool = True) -> list[rtnl.Reply]:
        return [rtnl.Reply(errno.EOPNOTSUPP, rtnl.NLMSG_ERROR, memoryview(b""),
                           "Unknown device type") for _ in builds]


def test_a_kernel_without_vxlan_is_a_clear_error() -> None:
    sock = RefusingKernel()
    try:
        with pytest.raises(DataplaneError, match="kernel has no VXLAN support.*modprobe vxlan"):
            _create(sock, DEV)
    finally:
        sock.close()

"""The endpoint path's hand-built rtnetlink requests, read back by an independent decoder
(pyroute2's message classes), and the blocking channel over a socketpair standing in for the
kernel. What the kernel does with each request: tests/integration/test_rtnl.py."""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from plexus.dataplane import rawnl, rtnl
from plexus.errors import DataplaneError, InvalidArgument

ACK, CREATE, EXCL, REPLACE = rtnl.NLM_F_ACK, rtnl.NLM_F_CREATE, rtnl.NLM_F_EXCL, rtnl.NLM_F_REPLACE


def decoded(cls: Callable[[bytes], Any], data: bytes) -> Any:
    msg = cls(data)
    msg.decode()
    assert msg["header"]["length"] == len(data) and len(data) % 4 == 0
    return msg


def header(msg: Any) -> tuple[int, int, int]:
    h = msg["header"]
    return h["type"], h["flags"], h["sequence_number"]


def test_link_up_changes_only_the_up_flag() -> None:
    msg = decoded(ifinfmsg, rtnl.link_up_request(3, 1))
    assert header(msg) == (rtnl.RTM_NEWLINK, rtnl.NLM_F_REQUEST | ACK, 3)
    assert (msg["index"], msg["flags"], msg["change"]) == (1, rtnl.IFF_UP, rtnl.IFF_UP)
    assert msg["attrs"] == []


def test_veth_with_its_peer_born_in_another_namespace() -> None:
    data = rtnl.veth_request(9, "pxv1", 1450, "eth0", 1400, "02:42:ac:11:00:02", 17)
    msg = decoded(ifinfmsg, data)
    assert header(msg) == (rtnl.RTM_NEWLINK, rtnl.NLM_F_REQUEST | ACK | CREATE | EXCL, 9)
    assert (msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_MTU")) == ("pxv1", 1450)
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert dict(peer["attrs"]) == {"IFLA_IFNAME": "eth0", "IFLA_MTU": 1400,
                                   "IFLA_ADDRESS": "02:42:ac:11:00:02", "IFLA_NET_NS_FD": 17}
    assert (peer["index"], peer["flags"]) == (0, 0)  # born down


def test_veth_without_mac_or_namespace_leaves_them_to_the_kernel() -> None:
    msg = decoded(ifinfmsg, rtnl.veth_request(1, "pxv2", 1500, "pxc2", 1500))
    peer = msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert dict(peer["attrs"]) == {"IFLA_IFNAME": "pxc2", "IFLA_MTU": 1500}


@pytest.mark.parametrize("mac", ["02:42:ac:11:00", "02-42-ac-11-00-02", "zz:42:ac:11:00:02", ""])
def test_a_bad_mac_is_refused_naming_the_field(mac: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid mac"):
        rtnl.mac_bytes(mac)


def test_getlink_asks_by_name_without_statistics() -> None:
    msg = decoded(ifinfmsg, rtnl.getlink_request(4, "br-x"))
    assert header(msg) == (rtnl.RTM_GETLINK, rtnl.NLM_F_REQUEST, 4)
    assert msg.get_attr("IFLA_IFNAME") == "br-x"
    assert msg.get_attr("IFLA_EXT_MASK") == rtnl.RTEXT_FILTER_SKIP_STATS


def test_getlink_by_index() -> None:
    msg = decoded(ifinfmsg, rtnl.getlink_request(4, index=12))
    assert (msg["index"], msg.get_attr("IFLA_IFNAME")) == (12, None)


def test_dellink_by_name() -> None:
    msg = decoded(ifinfmsg, rtnl.dellink_request(5, "pxv1"))
    assert header(msg) == (rtnl.RTM_DELLINK, rtnl.NLM_F_REQUEST | ACK, 5)
    assert (msg["index"], msg.get_attr("IFLA_IFNAME")) == (0, "pxv1")


@pytest.mark.parametrize(("address", "family", "flags"), [
    ("10.1.2.3/24", socket.AF_INET, 0),
    ("fd00:1::3/64", socket.AF_INET6, rtnl.IFA_F_NODAD),
])
def test_address_is_added_exclusively(address: str, family: int, flags: int) -> None:
    iface = ipaddress.ip_interface(address)
    msg = decoded(ifaddrmsg, rtnl.addaddr_request(6, 12, iface))
    assert header(msg) == (rtnl.RTM_NEWADDR, rtnl.NLM_F_REQUEST | ACK | CREATE | EXCL, 6)
    assert (msg["family"], msg["prefixlen"], msg["flags"], msg["scope"], msg["index"]) == (
        family, iface.network.prefixlen, flags, 0, 12)
    assert dict(msg["attrs"]) == {"IFA_LOCAL": str(iface.ip), "IFA_ADDRESS": str(iface.ip)}


@pytest.mark.parametrize(("gateway", "family"), [("10.1.0.1", socket.AF_INET),
                                                 ("fd00:1::1", socket.AF_INET6)])
def test_default_route_is_replaced_in_the_main_table(gateway: str, family: int) -> None:
    msg = decoded(rtmsg, rtnl.default_route_request(7, ipaddress.ip_address(gateway)))
    assert header(msg) == (rtnl.RTM_NEWROUTE, rtnl.NLM_F_REQUEST | ACK | CREATE | REPLACE, 7)
    assert (msg["family"], msg["dst_len"], msg["table"], msg["proto"], msg["type"]) == (
        family, 0, rtnl.RT_TABLE_MAIN, rtnl.RTPROT_STATIC, rtnl.RTN_UNICAST)
    assert dict(msg["attrs"]) == {"RTA_GATEWAY": gateway, "RTA_TABLE": rtnl.RT_TABLE_MAIN}


def test_enslave_sets_master_alias_and_up_by_name() -> None:
    msg = decoded(ifinfmsg, rtnl.enslave_request(8, "pxv1", 42, "plexus:ep:c1/eth0"))
    assert header(msg) == (rtnl.RTM_NEWLINK, rtnl.NLM_F_REQUEST | ACK, 8)
    assert (msg["index"], msg["flags"], msg["change"]) == (0, rtnl.IFF_UP, rtnl.IFF_UP)
    assert dict(msg["attrs"]) == {"IFLA_IFNAME": "pxv1", "IFLA_MASTER": 42,
                                  "IFLA_IFALIAS": "plexus:ep:c1/eth0"}


def test_hairpin_is_bridge_slave_data() -> None:
    msg = decoded(ifinfmsg, rtnl.hairpin_request(9, "pxv1"))
    assert header(msg) == (rtnl.RTM_NEWLINK, rtnl.NLM_F_REQUEST | ACK, 9)
    assert (msg["flags"], msg["change"]) == (0, 0)  # leaves the link's state alone
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_SLAVE_KIND") == "bridge"
    assert info.get_attr("IFLA_INFO_SLAVE_DATA").get_attr("IFLA_BRPORT_MODE") == 1


# --- answers -------------------------------------------------------------------------------------


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def nlmsg(kind: int, body: bytes, seq: int, flags: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def error(seq: int, code: int, text: str = "") -> bytes:
    """An NLMSG_ERROR as a socket with NETLINK_CAP_ACK and NETLINK_EXT_ACK gets it."""
    body = struct.pack("=i", -code) + struct.pack("=IHHII", 32, rtnl.RTM_NEWLINK, 5, seq, 0)
    flags = rtnl.NLM_F_CAPPED
    if text:
        body += attr(rtnl.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
        flags |= rtnl.NLM_F_ACK_TLVS
    return nlmsg(rtnl.NLMSG_ERROR, body, seq, flags)


def test_reply_reads_acknowledgements_errors_and_answers() -> None:
    ack = rtnl.reply(memoryview(error(3, 0)), 3)
    assert ack is not None and (ack.error, ack.kind) == (0, rtnl.NLMSG_ERROR)
    failed = rtnl.reply(memoryview(error(4, errno.EINVAL, "Master is not a bridge")), 4)
    assert failed is not None and failed.error == errno.EINVAL
    assert failed.why == "Invalid argument (Master is not a bridge)"
    plain = rtnl.reply(memoryview(error(4, errno.EEXIST)), 4)
    assert plain is not None and plain.why == "File exists"
    link = nlmsg(rtnl.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 7, 1, 0)
                 + attr(rtnl.IFLA_IFNAME, b"pxv1\0"), 5)
    answer = rtnl.reply(memoryview(link), 5)
    assert answer is not None and answer.kind == rtnl.RTM_NEWLINK
    parsed = rtnl.parse_link(answer.payload)
    assert parsed is not None and (parsed[0].index, parsed[0].ifname) == (7, "pxv1")


def test_reply_ignores_answers_to_other_requests() -> None:
    assert rtnl.reply(memoryview(error(3, 0)), 4) is None
    both = error(3, errno.EBUSY) + error(4, 0)
    answer = rtnl.reply(memoryview(both), 4)
    assert answer is not None and answer.error == 0


# --- the blocking channel, with a socketpair for a kernel ----------------------------------------


@pytest.fixture
def kernel() -> Iterator[tuple[rawnl.Channel, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    channel = rawnl.Channel(ours)  # the netlink socket options fail here, quietly
    theirs.settimeout(5)
    yield channel, theirs
    channel.close()
    theirs.close()


def answering(peer: socket.socket, answer: Callable[[list[tuple[int, int]]], list[bytes]],
              ) -> threading.Thread:
    """A thread that reads one datagram of requests and sends back ``answer([(seq, flags)])``,
    one datagram each, as the kernel does."""

    def run() -> None:
        data = peer.recv(65536)
        found, pos = [], 0
        while pos < len(data):
            length, _, flags, seq, _ = struct.unpack_from("=IHHII", data, pos)
            found.append((seq, flags))
            pos += length
        for datagram in answer(found):
            peer.send(datagram)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_channel_skips_stale_answers(kernel: tuple[rawnl.Channel, socket.socket]) -> None:
    channel, peer = kernel
    thread = answering(peer, lambda got: [error(got[0][0] + 100, errno.EBUSY),
                                          error(got[0][0], errno.EEXIST)])
    answer = channel.call(rtnl.dellink_request, "pxv1")
    thread.join(5)
    assert answer.error == errno.EEXIST


def test_a_batch_asks_only_its_last_request_for_an_ack(
        kernel: tuple[rawnl.Channel, socket.socket]) -> None:
    channel, peer = kernel
    sent: list[tuple[int, int]] = []

    def kernel_side(got: list[tuple[int, int]]) -> list[bytes]:
        sent.extend(got)
        (_, _), (second, _), (third, _) = got
        return [error(second, errno.ENETUNREACH), error(third, 0)]  # the first one worked

    thread = answering(peer, kernel_side)
    steps = [rawnl.up(1, "lo"), *rawnl.default_routes([ipaddress.ip_address("10.9.0.1")]),
             rawnl.up(5, "eth0")]
    with pytest.raises(DataplaneError, match=r"cannot add default route via 10.9.0.1: Network"):
        rawnl.run_steps(channel, steps)
    thread.join(5)
    assert [flags & rtnl.NLM_F_ACK for _, flags in sent] == [0, 0, rtnl.NLM_F_ACK]
    assert len({seq for seq, _ in sent}) == 3


def test_verbs_map_errnos(kernel: tuple[rawnl.Channel, socket.socket]) -> None:
    channel, peer = kernel

    def answer_each(code: int) -> threading.Thread:
        return answering(peer, lambda got: [error(seq, code) for seq, _ in got])

    thread = answer_each(errno.ENODEV)
    assert rawnl.link_index(channel, "nope") is None
    thread.join(5)
    thread = answer_each(errno.ENODEV)
    assert rawnl.delete_link(channel, "nope") is False
    thread.join(5)
    thread = answer_each(errno.EPERM)
    with pytest.raises(DataplaneError, match="cannot delete link pxv1: Operation not permitted"):
        rawnl.delete_link(channel, "pxv1")
    thread.join(5)
    thread = answer_each(errno.EEXIST)  # already there: done
    rawnl.run_steps(channel, rawnl.addresses(3, [ipaddress.ip_interface("10.0.0.2/24")]))
    thread.join(5)
    thread = answer_each(errno.ENODEV)
    with pytest.raises(DataplaneError, match="veth pxv1 vanished before it joined its bridge"):
        rawnl.join_bridge(channel, "pxv1", 4, "plexus:ep:c/eth0")
    thread.join(5)
    thread = answer_each(errno.EINVAL)  # no such bridge: the caller looks again
    assert rawnl.join_bridge(channel, "pxv1", 4, "plexus:ep:c/eth0") == errno.EINVAL
    thread.join(5)


def test_without_ack_changes_only_the_flag() -> None:
    request = rtnl.link_up_request(7, 1)
    stripped = rtnl.without_ack(request)
    assert len(stripped) == len(request) and stripped[8:] == request[8:]
    assert struct.unpack_from("=H", stripped, 6)[0] == rtnl.NLM_F_REQUEST

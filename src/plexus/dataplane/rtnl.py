"""rtnetlink's wire format, as much of it as plexus reads and writes: pure functions over
datagrams.

Reading: only the message header and the four link attributes (and three address attributes) a
reconciler uses are decoded (~11 us a link message, against ~250 us for pyroute2's full decode):
the events reader (``events.py``) decodes thousands of notifications in a burst, and the
snapshot parses thousands of links, so this is a measured hot path.

Writing: the requests that program an endpoint's veth (``drivers/bridge.py``, ~11 of them per
endpoint) are built here too. Through pyroute2 each cost ~0.6-0.8 ms of Python (building the
request from keyword arguments, then fully decoding the answer), 8.6 ms of an attach's 11.4 ms
(median, 100 attaches); built here, a request is a few struct.pack calls (2-7 us) and its
answer an acknowledgement whose errno is all that is read. Everything else (bridges, checks,
prefixes) stays on pyroute2, where the cost is not paid per endpoint.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from plexus.dataplane import links
from plexus.errors import DataplaneError, InvalidArgument
from plexus.model.types import IPAddress, IPInterface

# linux/netlink.h
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x4, 0x300, 0x10
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400  # modifiers of a NEW request
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # flags of an NLMSG_ERROR answer
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11  # socket options
NLMSGERR_ATTR_MSG = 1
# linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 18, 20, 21
RTM_NEWROUTE = 24
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
RTA_GATEWAY, RTA_TABLE = 5, 15
RTEXT_FILTER_SKIP_STATS = 1 << 3
# linux/if_link.h, linux/veth.h
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_OPERSTATE = 1, 3, 4, 10, 16
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD, IFLA_EXT_MASK = 18, 20, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_BRPORT_MODE = 4  # u8; 1: hairpin
VETH_INFO_PEER = 1
# linux/if_addr.h, linux/if.h
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
IFA_F_NODAD = 0x02
IFF_UP = 0x1
IFI_CHANGE_NEW = 0xFFFFFFFF
SO_RCVBUFFORCE = 33

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
#                                      type, flags
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_MAC = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_LINK_ATTRS = frozenset((IFLA_IFNAME, IFLA_MASTER, IFLA_OPERSTATE, IFLA_IFALIAS))
_ADDR_ATTRS = frozenset((IFA_ADDRESS, IFA_LOCAL, IFA_LABEL))


class OperState(enum.IntEnum):
    """RFC 2863 operational state (IFLA_OPERSTATE)."""

    UNKNOWN = 0
    NOTPRESENT = 1
    DOWN = 2
    LOWERLAYERDOWN = 3
    TESTING = 4
    DORMANT = 5
    UP = 6


@dataclass(frozen=True, slots=True)
class LinkInfo:
    index: int
    ifname: str
    alias: str | None  # plexus's alias, untagged ("net:NAME", "ep:CTR/IF"); None: not plexus's
    master: int | None
    admin_up: bool  # IFF_UP: what `ip link set up` sets
    oper_state: OperState
    owner: str | None = None  # the agent that made it (links.split); None: legacy or not plexus's

    @property
    def oper_up(self) -> bool:
        return self.oper_state == OperState.UP


# --- wire format: pure functions over one datagram --------------------------------------------


def messages(data: memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, payload) of each netlink message in a datagram."""
    pos, end = 0, len(data)
    while pos + _NLMSGHDR.size <= end:
        length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > end:
            return  # truncated: nothing after it can be trusted
        yield kind, flags, seq, data[pos + _NLMSGHDR.size : pos + length]
        pos += (length + 3) & ~3


def _attrs(payload: memoryview, pos: int, wanted: frozenset[int]) -> dict[int, memoryview]:
    found: dict[int, memoryview] = {}
    end = len(payload)
    while pos + 4 <= end and len(found) < len(wanted):
        length, kind = _NLATTR.unpack_from(payload, pos)
        if length < 4 or pos + length > end:
            break
        if kind & NLA_TYPE_MASK in wanted:
            found[kind & NLA_TYPE_MASK] = payload[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return found


def _text(value: memoryview | None) -> str | None:
    if value is None:
        return None
    return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_link(payload: memoryview) -> tuple[LinkInfo, bool] | None:
    """(link, marked new) from an RTM_NEWLINK/DELLINK payload; None for bridge-port messages."""
    if len(payload) < _IFINFOMSG.size:
        return None
    family, _, index, flags, change = _IFINFOMSG.unpack_from(payload, 0)
    if family != socket.AF_UNSPEC:
        return None
    a = _attrs(payload, _IFINFOMSG.size, _LINK_ATTRS)
    master = a.get(IFLA_MASTER)
    oper = a.get(IFLA_OPERSTATE)
    state = oper[0] if oper is not None and len(oper) else 0
    owner, alias = links.split(_text(a.get(IFLA_IFALIAS))) or (None, None)
    info = LinkInfo(
        index=index,
        ifname=_text(a.get(IFLA_IFNAME)) or "",
        alias=alias,
        master=(_U32.unpack_from(master)[0] or None) if master and len(master) >= 4 else None,
        admin_up=bool(flags & IFF_UP),
        oper_state=OperState(state) if state <= OperState.UP else OperState.UNKNOWN,
        owner=owner,
    )
    return info, change == IFI_CHANGE_NEW


def parse_address(payload: memoryview) -> tuple[int, str | None, IPInterface] | None:
    """(index, label, address) from an RTM_NEWADDR/DELADDR payload; None for other families."""
    if len(payload) < _IFADDRMSG.size:
        return None
    family, prefixlen, _, _, index = _IFADDRMSG.unpack_from(payload, 0)
    a = _attrs(payload, _IFADDRMSG.size, _ADDR_ATTRS)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point
    # links and the only one IPv6 sends otherwise.
    raw = a.get(IFA_LOCAL, a.get(IFA_ADDRESS))
    if raw is None:
        return None
    addr: IPInterface
    if family == socket.AF_INET and len(raw) == 4:
        addr = ipaddress.IPv4Interface((bytes(raw), prefixlen))
    elif family == socket.AF_INET6 and len(raw) == 16:
        addr = ipaddress.IPv6Interface((bytes(raw), prefixlen))
    else:
        return None
    return index, _text(a.get(IFA_LABEL)), addr


def dump_request(seq: int) -> bytes:
    """RTM_GETLINK, NLM_F_DUMP, every link, no attributes.

    No IFLA_EXT_MASK (RTEXT_FILTER_SKIP_STATS would save ~25% of the bytes): with one, the
    kernel sizes the dump by visiting every link inside the send() (rtnl_calcit), ~1.4 ms per
    2,000 links measured here, all of it in one syscall on the loop; without one it does not.
    """
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


def dump_chunk(data: memoryview, seq: int, into: list[LinkInfo]) -> tuple[bool, bool]:
    """Parse one datagram of a link dump into ``into``; returns (done, interrupted)."""
    done = interrupted = False
    for kind, flags, msg_seq, payload in messages(data):
        if msg_seq != seq:
            continue  # a late answer to an earlier, abandoned dump
        interrupted |= bool(flags & NLM_F_DUMP_INTR)
        if kind == NLMSG_ERROR or (kind == NLMSG_DONE and len(payload) >= 4):
            code = struct.unpack_from("=i", payload)[0]
            if code < 0:
                raise DataplaneError(f"link dump failed: {errno.errorcode.get(-code, -code)}")
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            done = True
        elif kind == RTM_NEWLINK:
            parsed = parse_link(payload)
            if parsed is not None:
                into.append(parsed[0])
    return done, interrupted



# --- requests: pure builders, one per change the endpoint path makes ---------------------------
#
# Each returns one complete message with NLM_F_ACK where the kernel would otherwise stay silent:
# the answer (``reply``) is then always exactly one message, an error or an acknowledgement, or
# (RTM_GETLINK) the link. Links are named by IFLA_IFNAME where the caller knows no index: the
# kernel resolves it in the same request, which saves a lookup.


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    flag = IFF_UP if up else 0
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flag, flag)  # change: only IFF_UP


def mac_bytes(mac: str) -> bytes:
    """"02:42:ac:11:00:02" -> its 6 bytes."""
    if not _MAC.fullmatch(mac):
        raise InvalidArgument("mac", mac, "not a MAC address (six hex pairs with colons)")
    return bytes.fromhex(mac.replace(":", ""))


def link_up_request(seq: int, index: int) -> bytes:
    """RTM_NEWLINK: set link ``index`` up (only IFF_UP changes)."""
    return _request(RTM_NEWLINK, NLM_F_ACK, seq, _ifinfo(index, up=True))


def veth_request(seq: int, name: str, mtu: int, peer: str, peer_mtu: int, peer_mac: str = "",
                 peer_netns_fd: int | None = None) -> bytes:
    """RTM_NEWLINK, NLM_F_CREATE|NLM_F_EXCL: a veth pair ``name``/``peer``, both ends down; the
    peer is born in the namespace of ``peer_netns_fd`` (an open /proc/PID/ns/net or /run/netns
    file) if given. EEXIST when either name is taken in its namespace; nothing is made then."""
    peer_attrs = _string(IFLA_IFNAME, peer) + _u32(IFLA_MTU, peer_mtu)
    if peer_mac:
        peer_attrs += _attr(IFLA_ADDRESS, mac_bytes(peer_mac))
    if peer_netns_fd is not None:
        peer_attrs += _u32(IFLA_NET_NS_FD, peer_netns_fd)
    # VETH_INFO_PEER holds an ifinfomsg and then attributes: not a plain nest, so no NLA_F_NESTED.
    info = _nest(IFLA_LINKINFO, _string(IFLA_INFO_KIND, "veth"),
                 _nest(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, _ifinfo() + peer_attrs)))
    body = _ifinfo() + _string(IFLA_IFNAME, name) + _u32(IFLA_MTU, mtu) + info
    return _request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def getlink_request(seq: int, name: str = "", index: int = 0) -> bytes:
    """RTM_GETLINK of the link named ``name`` (or else of link ``index``): answered by its
    RTM_NEWLINK (``parse_link``) or ENODEV. Without statistics, which nothing here reads."""
    body = _ifinfo(index) + (_string(IFLA_IFNAME, name) if name else b"")
    body += _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
    return _request(RTM_GETLINK, 0, seq, body)


def dellink_request(seq: int, name: str) -> bytes:
    """RTM_DELLINK of the link named ``name`` (a veth takes its peer with it)."""
    return _request(RTM_DELLINK, NLM_F_ACK, seq, _ifinfo() + _string(IFLA_IFNAME, name))


def addaddr_request(seq: int, index: int, address: IPInterface) -> bytes:
    """RTM_NEWADDR, NLM_F_CREATE|NLM_F_EXCL: ``address`` on link ``index``; EEXIST if it is
    there already. IPv6 with IFA_F_NODAD: the address is ours by construction (IPAM), and
    duplicate address detection would keep it "tentative", unusable, for about a second."""
    v6 = address.version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    head = _IFADDRMSG.pack(family, address.network.prefixlen, IFA_F_NODAD if v6 else 0,
                           RT_SCOPE_UNIVERSE, index)
    raw = address.ip.packed
    body = head + _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
    return _request(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def default_route_request(seq: int, gateway: IPAddress) -> bytes:
    """RTM_NEWROUTE, NLM_F_CREATE|NLM_F_REPLACE: the main table's default route of the
    gateway's family goes via ``gateway`` (proto static, as pyroute2 made it)."""
    family = socket.AF_INET6 if gateway.version == 6 else socket.AF_INET
    head = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE,
                       RTN_UNICAST, 0)
    body = head + _attr(RTA_GATEWAY, gateway.packed) + _u32(RTA_TABLE, RT_TABLE_MAIN)
    return _request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, body)


def enslave_request(seq: int, name: str, master: int, alias: str) -> bytes:
    """RTM_NEWLINK: link ``name`` gets master ``master``, IFLA_IFALIAS ``alias`` and goes up,
    in one request (the kernel announces an alias only on a link that is up, see events.py).
    ENODEV if there is no such link, EINVAL if there is no link ``master``."""
    body = (_ifinfo(up=True) + _string(IFLA_IFNAME, name) + _u32(IFLA_MASTER, master)
            + _string(IFLA_IFALIAS, alias))
    return _request(RTM_NEWLINK, NLM_F_ACK, seq, body)


def hairpin_request(seq: int, name: str) -> bytes:
    """RTM_NEWLINK: bridge port ``name`` in hairpin mode (IFLA_BRPORT_MODE 1), which lets the
    bridge send a frame back out of the port it came in on. Not in ``enslave_request``: the
    kernel applies a request's slave data (rtnl_changelink) before its IFLA_MASTER (do_setlink),
    so a port that joins its bridge in the same request is not a port yet (EOPNOTSUPP)."""
    info = _nest(IFLA_LINKINFO, _string(IFLA_INFO_SLAVE_KIND, "bridge"),
                 _nest(IFLA_INFO_SLAVE_DATA, _attr(IFLA_BRPORT_MODE, b"\x01")))
    return _request(RTM_NEWLINK, NLM_F_ACK, seq, _ifinfo() + _string(IFLA_IFNAME, name) + info)


# --- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """The kernel's answer to one request."""

    error: int  # errno; 0: done (an acknowledgement) or answered (``payload``)
    kind: int  # NLMSG_ERROR for an acknowledgement or an error, else the answer's type
    payload: memoryview  # the answer's payload (for RTM_GETLINK: the link)
    detail: str = ""  # the kernel's own words on an error (extended ack), if it gave any

    @property
    def why(self) -> str:
        text = os.strerror(self.error)
        return f"{text} ({self.detail})" if self.detail else text


def replies(data: memoryview) -> Iterator[tuple[int, Reply]]:
    """(sequence number, answer) of every message in datagram ``data``."""
    for kind, flags, seq, payload in messages(data):
        if kind != NLMSG_ERROR:
            yield seq, Reply(0, kind, payload)
        elif len(payload) < 4:
            yield seq, Reply(errno.EPROTO, kind, payload)
        else:
            code = -int(struct.unpack_from("=i", payload)[0])
            yield seq, Reply(code, kind, payload, _ack_detail(flags, payload) if code else "")


def reply(data: memoryview, seq: int) -> Reply | None:
    """The answer to request ``seq`` in datagram ``data``; None if it is not in it (answers to
    other requests are skipped: a late answer to an earlier, abandoned request)."""
    return next((answer for got, answer in replies(data) if got == seq), None)


def without_ack(request: bytes) -> bytes:
    """``request`` with NLM_F_ACK cleared: the kernel then answers it only if it fails."""
    length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(request)
    return _NLMSGHDR.pack(length, kind, flags & ~NLM_F_ACK, seq, pid) + request[_NLMSGHDR.size:]


def _ack_detail(flags: int, payload: memoryview) -> str:
    """NLMSGERR_ATTR_MSG of an error: after the errno and the echoed request (only its header
    when NETLINK_CAP_ACK capped it), if NETLINK_EXT_ACK asked for attributes."""
    if not flags & NLM_F_ACK_TLVS or len(payload) < 4 + _NLMSGHDR.size:
        return ""
    echoed = _NLMSGHDR.size if flags & NLM_F_CAPPED else _U32.unpack_from(payload, 4)[0]
    found = _attrs(payload, 4 + ((echoed + 3) & ~3), frozenset((NLMSGERR_ATTR_MSG,)))
    return _text(found.get(NLMSGERR_ATTR_MSG)) or ""

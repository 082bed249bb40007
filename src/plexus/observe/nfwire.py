"""The kernel's flow events as plain data (pure parsers): conntrack events (ctnetlink) and
packets logged by nftables' ``log group`` (nfnetlink_log).

Why not pyroute2's NFCTSocket: flow logging runs at the connection rate (the issue's load is
5,000 new connections a second) and its generic message classes cost tens of microseconds per
event; these parsers read the few attributes a flow needs with ``struct`` (a few us).

Wire facts (include/uapi/linux/netfilter/nfnetlink_conntrack.h, nfnetlink_log.h): every
message is a netlink header, a 4-byte ``nfgenmsg`` (family, version, res_id) and attributes;
attribute values in network order; nested attributes may carry NLA_F_NESTED.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from plexus.model.types import IPAddress

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_ULOG = 1, 4
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE = 0, 2
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
# Multicast groups (bind mask bits are 1 << (group - 1)).
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
NLMSG_ERROR, NLMSG_OVERRUN = 2, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4

# ctnetlink attributes
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_MARK = 1, 2, 3, 8
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID = 9, 10, 12
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
# nfnetlink_log attributes and configuration
NFULA_PACKET_HDR, NFULA_MARK, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 2, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 6
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
COPY_RANGE = 64  # bytes of each logged packet: the IP header and the ports, no payload

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_BE16, _BE32, _BE64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_NESTED_MASK = 0x3FFF  # the type without NLA_F_NESTED / NLA_F_NET_BYTEORDER


@dataclass(frozen=True, slots=True)
class Tuple5:
    src: IPAddress
    dst: IPAddress
    proto: str
    sport: int
    dport: int


@dataclass(frozen=True, slots=True)
class CtEvent:
    """A connection that began (``new``) or ended. ``reply`` tells the real destination of a
    DNATed connection (its source); counters only when conntrack accounting is on."""

    new: bool
    id: int
    orig: Tuple5
    reply: Tuple5 | None
    mark: int = 0
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class Logged:
    """A packet nftables logged: its prefix (which rule), meta mark, devices and 5-tuple."""

    prefix: str
    mark: int
    indev: int
    outdev: int
    packet: Tuple5 | None


def messages(data: bytes) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, family, attributes) of every message in a datagram."""
    view = memoryview(data)
    pos = 0
    while pos + _HDR.size <= len(view):
        length, kind, flags, _, _ = _HDR.unpack_from(view, pos)
        if length < _HDR.size or pos + length > len(view):
            break
        if length >= _HDR.size + _NFGEN.size:
            family = view[pos + _HDR.size]
            yield kind, flags, family, view[pos + _HDR.size + _NFGEN.size:pos + length]
        else:
            yield kind, flags, 0, view[pos + _HDR.size:pos + length]
        pos += (length + 3) & ~3


def attrs(view: memoryview) -> dict[int, memoryview]:
    out: dict[int, memoryview] = {}
    pos = 0
    while pos + _ATTR.size <= len(view):
        length, kind = _ATTR.unpack_from(view, pos)
        if length < _ATTR.size:
            break
        out[kind & _NESTED_MASK] = view[pos + _ATTR.size:pos + length]
        pos += (length + 3) & ~3
    return out


# The hot path: an IPv4 TCP or UDP tuple as the kernel lays it out (ctnetlink_dump_tuples:
# the addresses' nest, then the protocol's: number, source port, destination port), read with
# one struct and checked field by field; anything else takes the general parser. Half the
# cost of an event was the general parser's nested dicts (measured: 32 us an event before).
_V4_TUPLE = struct.Struct("=HH HH4s HH4s HH HHB3x HH2s2x HH2s2x")
_V4_SHAPE = (20, CTA_TUPLE_IP, 8, CTA_IP_V4_SRC, 8, CTA_IP_V4_DST, 28, CTA_TUPLE_PROTO,
             5, CTA_PROTO_NUM, 6, CTA_PROTO_SRC_PORT, 6, CTA_PROTO_DST_PORT)


def _tuple(view: memoryview) -> Tuple5 | None:
    if len(view) >= _V4_TUPLE.size:
        (l1, t1, l2, t2, src, l3, t3, dst, l4, t4, l5, t5, num, l6, t6, sport, l7, t7,
         dport) = _V4_TUPLE.unpack_from(view)
        shape = (l1, t1 & _NESTED_MASK, l2, t2, l3, t3, l4, t4 & _NESTED_MASK, l5, t5, l6, t6,
                 l7, t7)
        if shape == _V4_SHAPE:
            return Tuple5(_address(src), _address(dst), PROTOCOLS.get(num, str(num)),
                          _BE16.unpack(sport)[0], _BE16.unpack(dport)[0])
    return _tuple_any(view)


def _tuple_any(view: memoryview) -> Tuple5 | None:
    a = attrs(view)
    ip, proto = attrs(a.get(CTA_TUPLE_IP, memoryview(b""))), \
        attrs(a.get(CTA_TUPLE_PROTO, memoryview(b"")))
    v4 = CTA_IP_V4_SRC in ip
    src = ip.get(CTA_IP_V4_SRC if v4 else CTA_IP_V6_SRC)
    dst = ip.get(CTA_IP_V4_DST if v4 else CTA_IP_V6_DST)
    if src is None or dst is None or CTA_PROTO_NUM not in proto:
        return None
    num = proto[CTA_PROTO_NUM][0]
    sport = _BE16.unpack(proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else 0
    dport = _BE16.unpack(proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else 0
    return Tuple5(_address(bytes(src)), _address(bytes(dst)), PROTOCOLS.get(num, str(num)),
                  sport, dport)


@functools.lru_cache(maxsize=1 << 14)
def _address(packed: bytes) -> IPAddress:
    """Made once per address: an event names two, and ``ip_address`` is a Python call of some
    microseconds (a flood is thousands of events a second, most between the same few)."""
    return ipaddress.ip_address(packed)


def _counters(a: dict[int, memoryview], kind: int) -> tuple[int, int]:
    c = attrs(a[kind]) if kind in a else {}
    packets = _BE64.unpack(c[CTA_COUNTERS_PACKETS])[0] if CTA_COUNTERS_PACKETS in c else 0
    size = _BE64.unpack(c[CTA_COUNTERS_BYTES])[0] if CTA_COUNTERS_BYTES in c else 0
    return packets, size


def ct_event(kind: int, body: memoryview) -> CtEvent | None:
    """A ctnetlink event message (type and attributes), or None if it is not one."""
    if kind >> 8 != NFNL_SUBSYS_CTNETLINK or kind & 0xFF not in (IPCTNL_MSG_CT_NEW,
                                                                 IPCTNL_MSG_CT_DELETE):
        return None
    a = attrs(body)
    orig = _tuple(a[CTA_TUPLE_ORIG]) if CTA_TUPLE_ORIG in a else None
    if orig is None:
        return None
    reply = _tuple(a[CTA_TUPLE_REPLY]) if CTA_TUPLE_REPLY in a else None
    p1, b1 = _counters(a, CTA_COUNTERS_ORIG)
    p2, b2 = _counters(a, CTA_COUNTERS_REPLY)
    return CtEvent(kind & 0xFF == IPCTNL_MSG_CT_NEW,
                   _BE32.unpack(a[CTA_ID])[0] if CTA_ID in a else 0, orig, reply,
                   _BE32.unpack(a[CTA_MARK])[0] if CTA_MARK in a else 0, p1 + p2, b1 + b2)


def logged(kind: int, family: int, body: memoryview) -> Logged | None:
    """An nfnetlink_log packet message, or None if it is not one."""
    if kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
        return None
    a = attrs(body)
    prefix = bytes(a.get(NFULA_PREFIX, b"")).split(b"\0", 1)[0].decode(errors="replace")

    def u32(key: int) -> int:
        return _BE32.unpack(a[key])[0] if key in a and len(a[key]) >= 4 else 0

    payload = a.get(NFULA_PAYLOAD)
    return Logged(prefix, u32(NFULA_MARK), u32(NFULA_IFINDEX_INDEV), u32(NFULA_IFINDEX_OUTDEV),
                  packet_tuple(bytes(payload)) if payload is not None else None)


def packet_tuple(packet: bytes) -> Tuple5 | None:
    """The 5-tuple of an IPv4 or IPv6 packet (its first bytes suffice)."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        ihl = (packet[0] & 0x0F) * 4
        proto, src, dst, rest = packet[9], packet[12:16], packet[16:20], packet[ihl:]
    elif version == 6 and len(packet) >= 40:
        proto, src, dst, rest = packet[6], packet[8:24], packet[24:40], packet[40:]
    else:
        return None
    sport = dport = 0
    if proto in (6, 17, 132) and len(rest) >= 4:
        sport, dport = struct.unpack_from(">HH", rest)
    return Tuple5(ipaddress.ip_address(src), ipaddress.ip_address(dst),
                  PROTOCOLS.get(proto, str(proto)), sport, dport)


# -- requests ----------------------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    raw = _ATTR.pack(_ATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def log_config(seq: int, group: int, *parts: bytes, family: int = 0) -> bytes:
    body = _NFGEN.pack(family, 0, struct.unpack("=H", struct.pack(">H", group))[0]) + \
        b"".join(parts)
    return _HDR.pack(_HDR.size + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                     NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def bind_group(seq: int, group: int) -> bytes:
    """Receive the packets logged to ``group`` (each cut to ``COPY_RANGE`` bytes)."""
    return log_config(seq, group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
                      _attr(NFULA_CFG_MODE, struct.pack(">IBx", COPY_RANGE,
                                                        NFULNL_COPY_PACKET)))

"""rtnetlink messages of the overlay: pure builders of requests and parsers of dump answers.

Hand-built like ``dataplane/rtnl.py`` (whose framing, ``replies`` and ``without_ack``, and
address request this reuses): a few struct.pack calls per request, and dumps decoded only as
far as the applier reads them, so a resync of thousands of entries costs milliseconds.

Every object plexus makes here is recognisable without a table of its own: the VXLAN device by
its name and alias; its FDB entries and neighbours because the device is plexus's; its routes by
``RTPROT_PLEXUS`` in the route's protocol field (``ip route`` shows ``proto 112``) and their
device. Deletions name that protocol, so the kernel itself refuses to delete a route of anyone
else (fib_table_delete and ip6_route_del match the protocol when a request gives one).

Dumps ask the kernel to filter (device index, table, protocol) under NETLINK_GET_STRICT_CHK
(Linux 4.20+); the parsers filter again, for a kernel that ignores the request's filters.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from plexus.dataplane import rtnl
from plexus.dataplane.overlay.model import (
    FdbEntry,
    NeighEntry,
    OverlayRoute,
    VxlanDevice,
)
from plexus.model.types import IPAddress, IPInterface

# linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_DELADDR, RTM_GETADDR = 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RT_TABLE_MAIN, RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE, RTN_UNICAST = 254, 0, 255, 1
RT_SCOPE_LINK = 253
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
RTNH_F_ONLINK = 4
# The protocol field of plexus's routes: 112 is ASCII "p", and unused by linux/rtnetlink.h and
# iproute2's rt_protos (which stop at 99 below the routing daemons' 186-192; Calico uses 80).
RTPROT_PLEXUS = 112
# linux/neighbour.h
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NUD_PERMANENT, NTF_SELF = 0x80, 0x02
# linux/if_link.h
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_IFALIAS, IFLA_AF_SPEC = 1, 3, 4, 18, 20, 26
IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS = 29, 1 << 3
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1
IFLA_VXLAN_ID, IFLA_VXLAN_GROUP, IFLA_VXLAN_LOCAL, IFLA_VXLAN_LEARNING = 1, 2, 4, 7
IFLA_VXLAN_PORT, IFLA_VXLAN_GROUP6, IFLA_VXLAN_LOCAL6 = 15, 16, 17
IFF_UP = 0x1
NLA_F_NESTED = 0x8000
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
AF_BRIDGE = 7

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
#                                      type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, (pad), ifindex, state, flags, type
_NLATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_PORT = struct.Struct(">H")  # IFLA_VXLAN_PORT is in network byte order


# --- framing --------------------------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def _request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def attrs(payload: memoryview, pos: int) -> dict[int, memoryview]:
    """Every attribute from ``pos`` on: type (without flags) -> value."""
    found: dict[int, memoryview] = {}
    while pos + 4 <= len(payload):
        length, kind = _NLATTR.unpack_from(payload, pos)
        if length < 4 or pos + length > len(payload):
            break
        found[kind & rtnl.NLA_TYPE_MASK] = payload[pos + 4 : pos + length]
        pos += (length + 3) & ~3
    return found


def _u32_of(value: memoryview | None) -> int | None:
    return _U32.unpack_from(value)[0] if value is not None and len(value) >= 4 else None


def _ip(value: memoryview | None) -> IPAddress | None:
    if value is None or len(value) not in (4, 16):
        return None
    return ipaddress.ip_address(bytes(value))


def _mac(value: memoryview | None) -> str | None:
    return None if value is None or len(value) != 6 else ":".join(f"{b:02x}" for b in value)


def _family(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


# --- the device ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkRead:
    """A link as the applier reads it (``parse_link``)."""

    index: int
    name: str
    kind: str
    mtu: int
    mac: str
    alias: str
    up: bool
    vni: int | None = None
    local: IPAddress | None = None
    port: int | None = None
    learning: bool = True
    remote: IPAddress | None = None

    def device(self, tx_checksum: bool) -> VxlanDevice | None:
        if self.kind != "vxlan" or self.vni is None or self.local is None or self.port is None:
            return None
        return VxlanDevice(self.name, self.vni, self.local, self.port, self.mac, self.mtu,
                           self.alias, tx_checksum, self.learning, self.remote, self.up)


def getlink_request(seq: int, name: str = "", index: int = 0) -> bytes:
    """RTM_GETLINK of link ``name`` (or else ``index``), without statistics."""
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
    body += _string(IFLA_IFNAME, name) if name else b""
    return _request(RTM_GETLINK, 0, seq, body + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS))


def parse_link(payload: memoryview) -> LinkRead | None:
    if len(payload) < _IFINFOMSG.size:
        return None
    _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload, 0)
    top = attrs(payload, _IFINFOMSG.size)
    info = attrs(top[IFLA_LINKINFO], 0) if IFLA_LINKINFO in top else {}
    data = attrs(info[IFLA_INFO_DATA], 0) if IFLA_INFO_DATA in info else {}
    port = data.get(IFLA_VXLAN_PORT)
    learning = data.get(IFLA_VXLAN_LEARNING)
    return LinkRead(
        index=index,
        name=bytes(top.get(IFLA_IFNAME, b"")).split(b"\0", 1)[0].decode(),
        kind=bytes(info.get(IFLA_INFO_KIND, b"")).split(b"\0", 1)[0].decode(),
        mtu=_u32_of(top.get(IFLA_MTU)) or 0,
        mac=_mac(top.get(IFLA_ADDRESS)) or "",
        alias=bytes(top.get(IFLA_IFALIAS, b"")).split(b"\0", 1)[0].decode(),
        up=bool(flags & IFF_UP),
        vni=_u32_of(data.get(IFLA_VXLAN_ID)),
        local=_ip(data.get(IFLA_VXLAN_LOCAL6, data.get(IFLA_VXLAN_LOCAL))),
        port=_PORT.unpack_from(port)[0] if port is not None and len(port) >= 2 else None,
        learning=bool(learning[0]) if learning is not None and len(learning) else True,
        remote=_ip(data.get(IFLA_VXLAN_GROUP6, data.get(IFLA_VXLAN_GROUP))),
    )


def create_vxlan_request(seq: int, dev: VxlanDevice) -> bytes:
    """RTM_NEWLINK, NLM_F_CREATE|NLM_F_EXCL: the device, down (``setlink_request`` brings it up
    after ``addrgen_none_request``: a link that comes up with the default mode gets an IPv6
    link-local address at once). EEXIST if the name is taken; EOPNOTSUPP without the vxlan
    module. No group, no remote: the FDB holds every destination."""
    local = _attr(IFLA_VXLAN_LOCAL6 if dev.local.version == 6 else IFLA_VXLAN_LOCAL,
                  dev.local.packed)
    data = _nest(IFLA_INFO_DATA, _u32(IFLA_VXLAN_ID, dev.vni), local,
                 _attr(IFLA_VXLAN_PORT, _PORT.pack(dev.port)),
                 _attr(IFLA_VXLAN_LEARNING, bytes((int(dev.learning),))))
    body = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _string(IFLA_IFNAME, dev.name)
            + _u32(IFLA_MTU, dev.mtu) + _attr(IFLA_ADDRESS, rtnl.mac_bytes(dev.mac))
            + _nest(IFLA_LINKINFO, _string(IFLA_INFO_KIND, "vxlan"), data))
    if dev.alias:
        body += _string(IFLA_IFALIAS, dev.alias)
    return _request(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def addrgen_none_request(seq: int, name: str) -> bytes:
    """RTM_NEWLINK: IPv6 address generation mode "none" (no link-local address: the device
    needs none, and it would only send router solicitations and MLD reports into VXLAN)."""
    spec = _nest(IFLA_AF_SPEC, _nest(socket.AF_INET6,
                 _attr(IFLA_INET6_ADDR_GEN_MODE, bytes((IN6_ADDR_GEN_MODE_NONE,)))))
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _string(IFLA_IFNAME, name) + spec
    return _request(RTM_NEWLINK, NLM_F_ACK, seq, body)


def setlink_request(seq: int, dev: VxlanDevice) -> bytes:
    """RTM_NEWLINK: MTU, MAC, alias and up/down of the device, in place."""
    flag = IFF_UP if dev.up else 0
    body = (_IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, flag, IFF_UP) + _string(IFLA_IFNAME, dev.name)
            + _u32(IFLA_MTU, dev.mtu) + _attr(IFLA_ADDRESS, rtnl.mac_bytes(dev.mac))
            + _string(IFLA_IFALIAS, dev.alias))
    return _request(RTM_NEWLINK, NLM_F_ACK, seq, body)


def dellink_request(seq: int, index: int) -> bytes:
    return _request(RTM_DELLINK, NLM_F_ACK, seq, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))


# --- addresses ----------------------------------------------------------------------------------


def addr_dump_request(seq: int, index: int) -> bytes:
    return _request(RTM_GETADDR, NLM_F_DUMP, seq,
                    _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index))


def parse_addresses(messages: Iterator[tuple[int, memoryview]],
                    index: int) -> frozenset[IPInterface]:
    found: set[IPInterface] = set()
    for _, payload in messages:
        parsed = rtnl.parse_address(payload)
        if parsed is not None and parsed[0] == index:
            found.add(parsed[2])
    return frozenset(found)


def address_links(messages: Iterator[tuple[int, memoryview]]) -> dict[IPAddress, int]:
    """Address -> the index of the link that holds it, of every address dumped."""
    found: dict[IPAddress, int] = {}
    for _, payload in messages:
        parsed = rtnl.parse_address(payload)
        if parsed is not None:
            found[parsed[2].ip] = parsed[0]
    return found


def deladdr_request(seq: int, index: int, address: IPInterface) -> bytes:
    head = _IFADDRMSG.pack(_family(address.ip), address.network.prefixlen, 0, 0, index)
    return _request(RTM_DELADDR, NLM_F_ACK, seq, head + _attr(rtnl.IFA_LOCAL, address.ip.packed)
                    + _attr(rtnl.IFA_ADDRESS, address.ip.packed))


# --- FDB and neighbours -------------------------------------------------------------------------


def neigh_dump_request(seq: int, family: int, index: int) -> bytes:
    """RTM_GETNEIGH dump: ``family`` AF_BRIDGE for the FDB (filtered by ndm_ifindex), AF_UNSPEC
    for IPv4 and IPv6 neighbours (filtered by NDA_IFINDEX): each family's strict check wants
    the device where it looks for it."""
    if family == AF_BRIDGE:
        return _request(RTM_GETNEIGH, NLM_F_DUMP, seq, _NDMSG.pack(family, index, 0, 0, 0))
    body = _NDMSG.pack(family, 0, 0, 0, 0) + _u32(NDA_IFINDEX, index)
    return _request(RTM_GETNEIGH, NLM_F_DUMP, seq, body)


def parse_neighbours(messages: Iterator[tuple[int, memoryview]], index: int,
                     family: int) -> Iterator[tuple[IPAddress, str]]:
    """(ip, mac) of every permanent entry of ``family`` (AF_BRIDGE: FDB entries, whose ip is
    the underlay destination) on device ``index``."""
    for kind, payload in messages:
        if kind != RTM_NEWNEIGH or len(payload) < _NDMSG.size:
            continue
        got_family, ifindex, state, _, _ = _NDMSG.unpack_from(payload, 0)
        if ifindex != index or not state & NUD_PERMANENT or (
                (got_family == AF_BRIDGE) != (family == AF_BRIDGE)):
            continue
        a = attrs(payload, _NDMSG.size)
        ip, mac = _ip(a.get(NDA_DST)), _mac(a.get(NDA_LLADDR))
        if ip is not None and mac is not None:
            yield ip, mac


def fdb_request(seq: int, index: int, entry: FdbEntry, delete: bool = False) -> bytes:
    """RTM_NEWNEIGH (NLM_F_REPLACE: one destination per MAC) or RTM_DELNEIGH of an FDB entry
    of the VXLAN device itself (NTF_SELF), permanent: never aged, never learnt over."""
    head = _NDMSG.pack(AF_BRIDGE, index, 0 if delete else NUD_PERMANENT, NTF_SELF, 0)
    body = head + _attr(NDA_LLADDR, rtnl.mac_bytes(entry.mac)) + _attr(NDA_DST, entry.dst.packed)
    if delete:
        return _request(RTM_DELNEIGH, NLM_F_ACK, seq, body)
    return _request(RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, body)


def neigh_request(seq: int, index: int, entry: NeighEntry, delete: bool = False) -> bytes:
    """RTM_NEWNEIGH (permanent, replacing) or RTM_DELNEIGH of a neighbour on the device."""
    head = _NDMSG.pack(_family(entry.ip), index, 0 if delete else NUD_PERMANENT, 0, 0)
    body = head + _attr(NDA_DST, entry.ip.packed)
    if delete:
        return _request(RTM_DELNEIGH, NLM_F_ACK, seq, body)
    body += _attr(NDA_LLADDR, rtnl.mac_bytes(entry.mac))
    return _request(RTM_NEWNEIGH, NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq, body)


# --- routes -------------------------------------------------------------------------------------


def route_dump_request(seq: int, family: int, index: int) -> bytes:
    head = _RTMSG.pack(family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_PLEXUS, 0, 0, 0)
    return _request(RTM_GETROUTE, NLM_F_DUMP, seq, head + _u32(RTA_OIF, index))


def parse_routes(messages: Iterator[tuple[int, memoryview]],
                 index: int) -> Iterator[OverlayRoute]:
    """plexus's routes in the main table through device ``index``."""
    for kind, payload in messages:
        if kind != RTM_NEWROUTE or len(payload) < _RTMSG.size:
            continue
        family, dst_len, _, _, table, proto, _, _, _ = _RTMSG.unpack_from(payload, 0)
        a = attrs(payload, _RTMSG.size)
        table = _u32_of(a.get(RTA_TABLE)) or table
        if proto != RTPROT_PLEXUS or table != RT_TABLE_MAIN or _u32_of(a.get(RTA_OIF)) != index:
            continue
        dst = _ip(a.get(RTA_DST)) or ipaddress.ip_address(
            b"\0" * (16 if family == socket.AF_INET6 else 4))
        yield OverlayRoute(ipaddress.ip_network((dst, dst_len)), _ip(a.get(RTA_GATEWAY)))


def route_request(seq: int, index: int, route: OverlayRoute, replace: bool = False) -> bytes:
    """RTM_NEWROUTE ``dst via via dev INDEX onlink proto plexus``: NLM_F_EXCL (a route to the
    block that is not plexus's stays, and the request fails) unless ``replace`` (changing the
    gateway of plexus's own route: found by the dump)."""
    family = _family(route.dst.network_address)
    head = _RTMSG.pack(family, route.dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_PLEXUS,
                       RT_SCOPE_UNIVERSE, RTN_UNICAST, RTNH_F_ONLINK)
    body = head + _attr(RTA_DST, route.dst.network_address.packed) + _u32(RTA_OIF, index)
    if route.via is not None:
        body += _attr(RTA_GATEWAY, route.via.packed)
    body += _u32(RTA_TABLE, RT_TABLE_MAIN)
    flags = NLM_F_ACK | NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    return _request(RTM_NEWROUTE, flags, seq, body)


def link_route_request(seq: int, index: int, route: OverlayRoute) -> bytes:
    """RTM_NEWROUTE ``dst dev INDEX scope link proto plexus``: a directly connected address
    (a borrowed one, on the bridge). No gateway, so no onlink either (the kernel refuses it)."""
    family = _family(route.dst.network_address)
    head = _RTMSG.pack(family, route.dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_PLEXUS,
                       RT_SCOPE_LINK, RTN_UNICAST, 0)
    body = head + _attr(RTA_DST, route.dst.network_address.packed) + _u32(RTA_OIF, index)
    body += _u32(RTA_TABLE, RT_TABLE_MAIN)
    return _request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq, body)


def delroute_request(seq: int, index: int, route: OverlayRoute) -> bytes:
    """RTM_DELROUTE of plexus's route to ``route.dst`` through device ``index``, any scope."""
    family = _family(route.dst.network_address)
    head = _RTMSG.pack(family, route.dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_PLEXUS,
                       RT_SCOPE_NOWHERE, RTN_UNICAST, 0)
    body = head + _attr(RTA_DST, route.dst.network_address.packed) + _u32(RTA_OIF, index)
    return _request(RTM_DELROUTE, NLM_F_ACK, seq, body + _u32(RTA_TABLE, RT_TABLE_MAIN))

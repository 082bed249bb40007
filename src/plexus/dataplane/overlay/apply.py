"""The thin half: read one overlay network's kernel state, apply a delta.

Blocking, over one netlink socket bound to the host's namespace (``channel.OverlaySocket``), for a
worker thread: ``OverlayApplier`` runs it on a thread of its own for the event loop. Namespaces
are parameters: the socket is opened in the namespace at the path it is given (``netns.py``
tells why no long-lived thread ever enters one).

- ``sync(want)``: read (seven requests whatever the number of hosts: the link, its tx checksum,
  addresses, FDB, neighbours, IPv4 and IPv6 routes; each dump filtered to the device by the
  kernel), ``diff``, then apply the delta in one datagram. A resync, a restart, a flushed table
  all take this path; when nothing differs it sends no change at all.
- ``update(delta)``: a delta computed without reading the kernel (``render.host_delta``: one
  remote host's objects, whatever the number of hosts), applied to the device the last sync
  left: adding or removing a remote host is one datagram of its FDB entry, neighbours and
  routes. If it cannot (a request failed), the caller syncs.

Nothing outside the device is touched: FDB entries and neighbours are read and changed only on
plexus's own VXLAN device, routes only with plexus's protocol (``wire.RTPROT_PLEXUS``) through
it, and a link of the device's name that another agent (or no plexus agent) made is refused.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from plexus.dataplane import links, rtnl
from plexus.dataplane.overlay import ethtool, wire
from plexus.dataplane.overlay.channel import Build, OverlaySocket
from plexus.dataplane.overlay.model import (
    FdbEntry,
    NeighEntry,
    OverlayKernelState,
    OverlayRoute,
    VxlanDevice,
)
from plexus.dataplane.overlay.render import DeviceStep, OverlayDelta, diff
from plexus.errors import DataplaneError
from plexus.model.types import IPAddress

T = TypeVar("T")
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observed:
    link: wire.LinkRead | None  # whatever link bears the device's name (None: no such link)
    state: OverlayKernelState


def read_link(sock: OverlaySocket, name: str = "", index: int = 0) -> wire.LinkRead | None:
    answer = sock.ask(lambda seq: wire.getlink_request(seq, name, index))
    if answer.error == errno.ENODEV:
        return None
    if answer.error or answer.kind != wire.RTM_NEWLINK:
        raise DataplaneError(f"cannot look up link {name or index}: {answer.why}")
    return wire.parse_link(answer.payload)


def read_routes(sock: OverlaySocket, index: int) -> frozenset[OverlayRoute]:
    """plexus's routes through link ``index``, both families."""
    return frozenset(route for family in (socket.AF_INET, socket.AF_INET6)
                     for route in wire.parse_routes(iter(sock.dump(functools.partial(
                         wire.route_dump_request, family=family, index=index))), index))


def read_delivered(sock: OverlaySocket, bridge: str) -> frozenset[OverlayRoute]:
    """plexus's routes through the bridge (to borrowed addresses; none if no bridge)."""
    link = read_link(sock, bridge) if bridge else None
    return frozenset() if link is None else read_routes(sock, link.index)


def read_state(sock: OverlaySocket, name: str, bridge: str = "") -> Observed:
    """The device ``name`` and every object plexus keeps on it, as the kernel holds them, and
    plexus's routes through ``bridge``."""
    delivered = read_delivered(sock, bridge)
    link = read_link(sock, name)
    if link is None or link.kind != "vxlan":
        return Observed(link, OverlayKernelState(bridge=bridge, delivered=delivered))
    device = link.device(ethtool.tx_checksum(sock.fileno(), name))
    index = link.index
    fdb = wire.parse_neighbours(iter(sock.dump(
        lambda seq: wire.neigh_dump_request(seq, wire.AF_BRIDGE, index))), index, wire.AF_BRIDGE)
    neigh = wire.parse_neighbours(iter(sock.dump(
        lambda seq: wire.neigh_dump_request(seq, socket.AF_UNSPEC, index))), index, 0)
    routes = read_routes(sock, index)
    return Observed(link, OverlayKernelState(
        device=device,
        addresses=wire.parse_addresses(iter(sock.dump(
            lambda seq: wire.addr_dump_request(seq, index))), index),
        fdb=frozenset(FdbEntry(mac, dst) for dst, mac in fdb),
        neigh=frozenset(NeighEntry(ip, mac) for ip, mac in neigh),
        routes=routes,
        bridge=bridge,
        delivered=delivered,
    ))


def underlay_mtu(sock: OverlaySocket, ip: IPAddress) -> int:
    """The MTU of the link that holds underlay address ``ip`` in this namespace."""
    held = wire.address_links(iter(sock.dump(lambda seq: wire.addr_dump_request(seq, 0))))
    index = held.get(ip)
    link = None if index is None else read_link(sock, index=index)
    if link is None:
        raise DataplaneError(f"no link holds the underlay address {ip} in this namespace")
    return link.mtu


def check_owner(link: wire.LinkRead | None, name: str, alias: str) -> None:
    """Refuse a link of the device's ``name`` that plexus may not change: one tagged for
    another agent (``alias``: the tag this caller writes, ``links.tag``), or one that is not
    plexus's at all (no plexus tag, or, for a caller that tags nothing, not a VXLAN device)."""
    if link is None:
        return
    found = links.split(link.alias)
    if alias:
        mine = links.split(alias)
        if found is None:
            raise DataplaneError(f"link {name} exists and is not plexus's: refusing to take it "
                                 "over")
        if mine is not None:
            links.check_owner(name, found[0], mine[0] or "")
    elif link.kind != "vxlan":
        raise DataplaneError(f"link {name} exists and is a {link.kind or 'plain'} link, not "
                             "plexus's VXLAN device: refusing to take it over")


# --- applying -------------------------------------------------------------------------------


def sync(sock: OverlaySocket, want: OverlayKernelState) -> tuple[OverlayDelta, int]:
    """Make the kernel hold ``want`` (which has a device: ``remove`` deletes one); returns
    what was changed and the device's index."""
    if want.device is None:
        raise ValueError("sync() makes a device; remove() deletes one")
    seen = read_state(sock, want.device.name, want.bridge)
    check_owner(seen.link, want.device.name, want.device.alias)
    delta = diff(seen.state, want)
    return delta, apply_delta(sock, delta, seen.link)


def remove(sock: OverlaySocket, name: str, alias: str = "") -> bool:
    """Delete the device ``name`` (its FDB entries, neighbours and routes go with it); False
    if there was none. ``alias``: the caller's tag, as for ``check_owner``."""
    link = read_link(sock, name)
    if link is None:
        return False
    check_owner(link, name, alias)
    if link.kind != "vxlan":
        raise DataplaneError(f"link {name} is a {link.kind or 'plain'} link, not a VXLAN device")
    _delete_link(sock, link.index, name)
    return True


def apply_delta(sock: OverlaySocket, delta: OverlayDelta, link: wire.LinkRead | None) -> int:
    """Apply ``delta`` to the device (``link``: as read; None if there is none); returns the
    device's index. All entries' failures are collected and raised together, after the rest."""
    index = 0 if link is None else link.index
    dev = delta.device
    if dev is None:  # DELETE, or KEEP of no device
        if link is not None:
            _delete_link(sock, index, link.name)
        return 0
    if delta.step in (DeviceStep.CREATE, DeviceStep.RECREATE):
        if link is not None:
            _delete_link(sock, index, link.name)
        index = _create(sock, dev)
    elif delta.step is DeviceStep.UPDATE:
        _check(sock.batch([lambda seq: wire.setlink_request(seq, dev)]), [f"cannot set {dev.name}"])
    if delta.tx_checksum is not None:
        ethtool.set_tx_checksum(sock.fileno(), dev.name, delta.tx_checksum)
    builds, whats, fine = entry_requests(index, delta)
    if delta.delivered:
        _add(delivered_requests(sock, delta), builds, whats, fine)
    if builds:
        _check(sock.batch(builds), whats, fine)
    return index


def delivered_requests(sock: OverlaySocket, delta: OverlayDelta) -> tuple[
        list[Build], list[str], list[tuple[int, ...]]]:
    """The bridge's routes to borrowed addresses, removed and added."""
    bridge = read_link(sock, delta.bridge) if delta.bridge else None
    if bridge is None:
        raise DataplaneError(f"no bridge {delta.bridge or '(unnamed)'} to deliver borrowed "
                             "addresses to")
    index = bridge.index
    steps: list[tuple[Build, str, tuple[int, ...]]] = []
    for route in delta.delivered.remove:
        steps.append((functools.partial(wire.delroute_request, index=index, route=route),
                      f"cannot delete route {route.dst} dev {delta.bridge}", _GONE))
    for route in delta.delivered.add:
        steps.append((functools.partial(wire.link_route_request, index=index, route=route),
                      f"cannot add route {route.dst} dev {delta.bridge}", ()))
    return [s[0] for s in steps], [s[1] for s in steps], [s[2] for s in steps]


def _add(more: tuple[list[Build], list[str], list[tuple[int, ...]]], builds: list[Build],
         whats: list[str], fine: list[tuple[int, ...]]) -> None:
    builds += more[0]
    whats += more[1]
    fine += more[2]


def entry_requests(index: int, delta: OverlayDelta) -> tuple[
        list[Build], list[str], list[tuple[int, ...]]]:
    """The delta's entry requests: removals first (routes before the neighbours they use),
    then additions (neighbours before the routes that use them)."""
    steps: list[tuple[Build, str, tuple[int, ...]]] = []
    for route in delta.routes.remove:
        steps.append((functools.partial(wire.delroute_request, index=index, route=route),
                      f"cannot delete route {route.dst}", _GONE))
    for n in delta.neigh.remove:
        steps.append((functools.partial(wire.neigh_request, index=index, entry=n, delete=True),
                      f"cannot delete neighbour {n.ip}", _GONE))
    for f in delta.fdb.remove:
        steps.append((functools.partial(wire.fdb_request, index=index, entry=f, delete=True),
                      f"cannot delete fdb entry {f.mac}", _GONE))
    for a in delta.addresses.remove:
        steps.append((functools.partial(wire.deladdr_request, index=index, address=a),
                      f"cannot delete address {a}", _GONE))
    for a in delta.addresses.add:
        steps.append((functools.partial(rtnl.addaddr_request, index=index, address=a),
                      f"cannot add address {a}", (errno.EEXIST,)))
    for f in (*delta.fdb.add, *delta.fdb.change):
        steps.append((functools.partial(wire.fdb_request, index=index, entry=f),
                      f"cannot add fdb entry {f.mac} dst {f.dst}", ()))
    for n in (*delta.neigh.add, *delta.neigh.change):
        steps.append((functools.partial(wire.neigh_request, index=index, entry=n),
                      f"cannot add neighbour {n.ip} lladdr {n.mac}", ()))
    for route in delta.routes.add:
        steps.append((functools.partial(wire.route_request, index=index, route=route),
                      f"cannot add route {route.dst} via {route.via} (one that is not plexus's "
                      "is in the way?)", ()))
    for route in delta.routes.change:
        steps.append((functools.partial(wire.route_request, index=index, route=route,
                                        replace=True),
                      f"cannot change route {route.dst} to via {route.via}", ()))
    return [s[0] for s in steps], [s[1] for s in steps], [s[2] for s in steps]


def _check(answers: Sequence[rtnl.Reply], whats: Sequence[str],
           fine: Sequence[tuple[int, ...]] = ()) -> None:
    failed = [f"{what}: {answer.why}"
              for i, (answer, what) in enumerate(zip(answers, whats, strict=True))
              if answer.error and answer.error not in (fine[i] if fine else ())]
    if failed:
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise DataplaneError("; ".join(failed[:5]) + more)


def _create(sock: OverlaySocket, dev: VxlanDevice) -> int:
    """The device, down, address generation off, then up; returns its index."""
    made, *rest = sock.batch([
        lambda seq: wire.create_vxlan_request(seq, dev),
        lambda seq: wire.addrgen_none_request(seq, dev.name),
        lambda seq: wire.setlink_request(seq, dev),
    ])
    if made.error == errno.EOPNOTSUPP:
        raise DataplaneError(f"cannot create VXLAN device {dev.name}: this kernel has no VXLAN "
                             f"support ({made.why}); load the vxlan module (modprobe vxlan)")
    _check([made, *rest], [f"cannot create VXLAN device {dev.name}",
                           f"cannot turn IPv6 address generation off on {dev.name}",
                           f"cannot set {dev.name} up"])
    link = read_link(sock, dev.name)
    if link is None:
        raise DataplaneError(f"VXLAN device {dev.name} vanished right after it was created")
    return link.index


def _delete_link(sock: OverlaySocket, index: int, name: str) -> None:
    answer = sock.batch([lambda seq: wire.dellink_request(seq, index)])[0]
    if answer.error and answer.error not in _GONE:
        raise DataplaneError(f"cannot delete link {name}: {answer.why}")


# --- for the event loop ---------------------------------------------------------------------


class OverlayApplier:
    """The overlay networks of one namespace: every call runs on one thread of its own, with
    one socket opened (once) in the namespace at ``netns_path`` (None: the agent's own)."""

    def __init__(self, netns_path: str | None) -> None:
        self._path = netns_path
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "plexus-overlay")
        self._sock: OverlaySocket | None = None
        self._index: dict[str, int] = {}  # device name -> ifindex, as the last sync left it

    async def _run(self, fn: Callable[[OverlaySocket], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[OverlaySocket], T]) -> T:
        if self._sock is None:
            self._sock = OverlaySocket.open(self._path)
        return fn(self._sock)

    async def sync(self, want: OverlayKernelState) -> OverlayDelta:
        """Read, compare, apply: see ``sync``."""
        delta, index = await self._run(lambda sock: sync(sock, want))
        if want.device is not None:
            self._index[want.device.name] = index
        return delta

    async def remove(self, name: str, alias: str = "") -> bool:
        """Delete a network's device: see ``remove``."""
        self._index.pop(name, None)
        return await self._run(lambda sock: remove(sock, name, alias))

    async def update(self, delta: OverlayDelta) -> bool:
        """Apply a delta computed without reading the kernel (``render.host_delta``, or
        ``diff`` of two desired states) to the device the last ``sync`` left: one datagram.
        False if it could not (no sync made the device yet, or a request failed): the caller
        then syncs, which reads the kernel and repairs whatever the delta assumed wrongly."""
        dev = delta.device
        index = None if dev is None else self._index.get(dev.name)
        if dev is None or index is None or delta.step is not DeviceStep.KEEP:
            return False
        link = wire.LinkRead(index, dev.name, "vxlan", dev.mtu, dev.mac, dev.alias, dev.up)
        try:
            await self._run(lambda sock: apply_delta(sock, delta, link))
        except DataplaneError:
            self._index.pop(dev.name, None)
            return False
        return True

    async def underlay_mtu(self, ip: IPAddress) -> int:
        return await self._run(lambda sock: underlay_mtu(sock, ip))

    def counters(self) -> tuple[int, int]:
        """(requests sent, changes sent) so far."""
        return (0, 0) if self._sock is None else (self._sock.sent, self._sock.changes)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

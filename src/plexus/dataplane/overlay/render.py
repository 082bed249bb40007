"""The pure half: (network, this host, the other hosts) -> the kernel state, and state -> delta.

``desired`` renders what one overlay network needs on this host; ``diff`` compares two states
(what the kernel holds, read by ``apply.read_state``, or the previous desired state) and says
what to add, change and remove. Both are pure: unit tests run them without root.

Per remote host with blocks: one FDB entry (its VTEP MAC -> its underlay address), one
neighbour per IP version (its VTEP address -> its VTEP MAC) and one route per block (``BLOCK
via VTEP_ADDRESS dev pxvx-.. onlink``). Nothing per container: a host's kernel state grows with
the number of hosts and blocks. A remote host's objects depend on nothing but that host, so
adding or removing one changes only its own objects (``remote_objects``).

Borrowed addresses (ipam.plans.borrow: an endpoint whose address comes from another host's
block, when the pool had no free block left) are the exception, as in Calico: every other host,
the block's holder included, routes that one address (/32, /128) to the borrower's VTEP, more
specific than the block's route, and the borrower routes it to its bridge (``delivered``),
where the block's route through the VXLAN device would otherwise take it. Only these grow
with containers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from plexus.dataplane.overlay.model import (
    MIN_MTU,
    FdbEntry,
    HostVtep,
    NeighEntry,
    OverlayKernelState,
    OverlayRoute,
    OverlaySpec,
    RemoteHost,
    VxlanDevice,
    device_name,
    host_interface,
    host_network,
    overlay_mtu,
    vtep_addresses,
    vtep_mac,
)
from plexus.errors import InvalidArgument
from plexus.model.types import IPInterface, IPNetwork

T = TypeVar("T", bound=Hashable)


def device(overlay: OverlaySpec, local: HostVtep) -> VxlanDevice:
    """The network's VXLAN device on this host.

    tx checksum offload is off unless ``overlay.offload``: with it on, the kernel leaves the
    inner TCP/UDP checksum to the device that finally sends the outer packet, and some paths
    (NATed packets, some kernels, NIC drivers and hypervisors' virtual NICs) then send VXLAN
    packets whose inner checksum is wrong, which the receiver drops silently: the "63-second
    delays" of projectcalico/calico#3145 and flannel-io/flannel#1279, whose fix is ``ethtool
    -K DEV tx off`` (flannel-io/flannel#1282). Calico turns it off only on kernels before 5.7
    (felix#2815), but it is still reported on 6.8 (flannel-io/flannel#2152) and behind a NATed
    underlay (flannel-io/flannel#1929), hence off unless asked. Off costs computing the inner
    checksum, and segmenting before encapsulation (the kernel drops TSO with checksum offload):
    bench/overlay.py measured 3.9 Gbit/s against 9.3 with it on (one TCP stream, median, 2-CPU
    VM, veth underlay), where a bare VXLAN pair made 9.9.
    """
    mtu = overlay.mtu or overlay_mtu(local.underlay_mtu, local.underlay_ip.version)
    return VxlanDevice(
        name=device_name(overlay.network_id),
        vni=overlay.vni,
        local=local.underlay_ip,
        port=overlay.port,
        mac=vtep_mac(local.node, overlay.vni),
        mtu=mtu,
        alias=overlay.alias,
        tx_checksum=overlay.offload,
    )


def remote_objects(vni: int, remote: RemoteHost) -> tuple[
        frozenset[FdbEntry], frozenset[NeighEntry], frozenset[OverlayRoute]]:
    """One remote host's FDB entry, neighbours and routes: one per block, one per borrowed
    address (none if it holds no block: it has no VTEP address to route to)."""
    vteps = vtep_addresses(remote.blocks)
    if not vteps:
        return frozenset(), frozenset(), frozenset()
    mac = vtep_mac(remote.node, vni)
    borrowed = (OverlayRoute(host_network(ip), vteps[ip.version])
                for ip in remote.borrowed if ip.version in vteps)
    return (
        frozenset((FdbEntry(mac, remote.underlay_ip),)),
        frozenset(NeighEntry(ip, mac) for ip in vteps.values()),
        frozenset((*(OverlayRoute(block, vteps[block.version]) for block in remote.blocks),
                   *borrowed)),
    )


def desired(overlay: OverlaySpec, local: HostVtep,
            remotes: Sequence[RemoteHost]) -> OverlayKernelState:
    """What the kernel of ``local`` must hold for ``overlay``; InvalidArgument (naming the
    field and value) for hosts or blocks that cannot coexist."""
    check_hosts(local, remotes)
    dev = device(overlay, local)
    check_mtu(dev.mtu, [*local.blocks, *(b for r in remotes for b in r.blocks)])
    fdb: set[FdbEntry] = set()
    neigh: set[NeighEntry] = set()
    routes: set[OverlayRoute] = set()
    for remote in remotes:
        f, n, r = remote_objects(overlay.vni, remote)
        fdb |= f
        neigh |= n
        routes |= r
    return OverlayKernelState(
        device=dev,
        addresses=frozenset(host_interface(ip) for ip in vtep_addresses(local.blocks).values()),
        fdb=frozenset(fdb),
        neigh=frozenset(neigh),
        routes=frozenset(routes),
        bridge=overlay.bridge,
        delivered=frozenset(OverlayRoute(host_network(ip), None) for ip in local.borrowed)
        if overlay.bridge else frozenset(),
    )


def check_hosts(local: HostVtep, remotes: Sequence[RemoteHost]) -> None:
    """Hosts are distinct, share the underlay's IP version, and hold disjoint blocks."""
    seen_nodes: set[str] = {local.node}
    seen_ips = {local.underlay_ip: local.node}
    for remote in remotes:
        if remote.node in seen_nodes:
            raise InvalidArgument("node", remote.node, "listed twice among the overlay's hosts")
        if remote.underlay_ip in seen_ips:
            raise InvalidArgument("underlay address", str(remote.underlay_ip),
                                  f"{remote.node} and {seen_ips[remote.underlay_ip]} both have it")
        if remote.underlay_ip.version != local.underlay_ip.version:
            raise InvalidArgument("underlay address", str(remote.underlay_ip),
                                  f"{remote.node}'s is IPv{remote.underlay_ip.version}, "
                                  f"this host's IPv{local.underlay_ip.version}")
        seen_nodes.add(remote.node)
        seen_ips[remote.underlay_ip] = remote.node
    check_blocks([(local.node, b) for b in local.blocks]
                 + [(r.node, b) for r in remotes for b in r.blocks])


def check_blocks(held: Iterable[tuple[str, IPNetwork]]) -> None:
    """No two blocks overlap (sorted by start, each compared with the furthest end so far)."""
    ordered = sorted(held, key=lambda nb: (nb[1].version, nb[1].network_address, nb[1].prefixlen))
    last: tuple[str, IPNetwork] | None = None
    for node, block in ordered:
        if last is not None and last[1].version == block.version and (
                block.network_address <= last[1].broadcast_address):  # type: ignore[operator]
            raise InvalidArgument("block", str(block),
                                  f"{node}'s overlaps {last[1]} of {last[0]}")
        if last is None or last[1].version != block.version or (
                block.broadcast_address > last[1].broadcast_address):  # type: ignore[operator]
            last = (node, block)


def check_mtu(mtu: int, blocks: Iterable[IPNetwork]) -> None:
    for version in sorted({b.version for b in blocks}):
        if mtu < MIN_MTU[version]:
            raise InvalidArgument("overlay mtu", mtu, f"IPv{version} needs at least "
                                  f"{MIN_MTU[version]} (the underlay's MTU less VXLAN's overhead)")


# --- diff ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Changes(Generic[T]):
    """Objects to add, to change in place (the desired version; same key, other details) and
    to remove (as they are now)."""

    add: tuple[T, ...] = ()
    change: tuple[T, ...] = ()
    remove: tuple[T, ...] = ()

    def __len__(self) -> int:
        return len(self.add) + len(self.change) + len(self.remove)


class DeviceStep(enum.Enum):
    KEEP = "keep"
    CREATE = "create"
    RECREATE = "recreate"  # a fixed attribute differs (VNI, local address, port, learning)
    UPDATE = "update"  # MTU, MAC, alias or up differ: set in place
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class OverlayDelta:
    device: VxlanDevice | None  # the desired device (None: none wanted)
    step: DeviceStep
    tx_checksum: bool | None = None  # set tx checksum offload to this (None: leave it)
    addresses: Changes[IPInterface] = field(default_factory=Changes)
    fdb: Changes[FdbEntry] = field(default_factory=Changes)
    neigh: Changes[NeighEntry] = field(default_factory=Changes)
    routes: Changes[OverlayRoute] = field(default_factory=Changes)
    bridge: str = ""  # where ``delivered`` routes go
    delivered: Changes[OverlayRoute] = field(default_factory=Changes)

    def __len__(self) -> int:
        """The number of kernel changes (one netlink request or ioctl each)."""
        steps = {DeviceStep.KEEP: 0, DeviceStep.RECREATE: 2}.get(self.step, 1)
        return (steps + (self.tx_checksum is not None) + len(self.addresses) + len(self.fdb)
                + len(self.neigh) + len(self.routes) + len(self.delivered))

    @property
    def empty(self) -> bool:
        return len(self) == 0


def diff(current: OverlayKernelState, want: OverlayKernelState) -> OverlayDelta:
    """What turns ``current`` into ``want``. A device that is made anew comes without any
    entries (the kernel deletes a link's routes, neighbours and FDB entries with it)."""
    step = _device_step(current.device, want.device)
    if step is DeviceStep.DELETE:
        return OverlayDelta(None, step)
    if step in (DeviceStep.CREATE, DeviceStep.RECREATE):  # the bridge's routes stay
        current = OverlayKernelState(bridge=current.bridge, delivered=current.delivered)
    return OverlayDelta(
        device=want.device,
        step=step,
        tx_checksum=_tx_checksum(current.device, want.device),
        addresses=changes(current.addresses, want.addresses, lambda a: a),
        fdb=changes(current.fdb, want.fdb, lambda f: f.mac),
        neigh=changes(current.neigh, want.neigh, lambda n: n.ip),
        routes=changes(current.routes, want.routes, lambda r: r.dst),
        bridge=want.bridge,
        delivered=changes(current.delivered, want.delivered, lambda r: r.dst),
    )


def _device_step(have: VxlanDevice | None, want: VxlanDevice | None) -> DeviceStep:
    if want is None:
        return DeviceStep.KEEP if have is None else DeviceStep.DELETE
    if have is None:
        return DeviceStep.CREATE
    if have.identity() != want.identity():
        return DeviceStep.RECREATE
    mutable = (have.mtu, have.mac, have.alias, have.up)
    return DeviceStep.KEEP if mutable == (want.mtu, want.mac, want.alias, want.up) \
        else DeviceStep.UPDATE


def _tx_checksum(have: VxlanDevice | None, want: VxlanDevice | None) -> bool | None:
    if want is None:
        return None
    now = True if have is None else have.tx_checksum  # a new VXLAN device has it on
    return None if now == want.tx_checksum else want.tx_checksum


def host_delta(vni: int, device: VxlanDevice, old: RemoteHost | None,
               new: RemoteHost | None) -> OverlayDelta:
    """What one remote host's arrival (``old`` None), departure (``new`` None) or change of
    blocks or underlay address does to a device: its own objects only, computed in O(its
    blocks) whatever the number of hosts (``desired`` and ``diff`` are O(hosts)). It checks
    nothing against the other hosts: the periodic ``desired``/``sync`` does."""
    empty: tuple[frozenset[FdbEntry], frozenset[NeighEntry], frozenset[OverlayRoute]] = (
        frozenset(), frozenset(), frozenset())
    f0, n0, r0 = empty if old is None else remote_objects(vni, old)
    f1, n1, r1 = empty if new is None else remote_objects(vni, new)
    return OverlayDelta(
        device=device,
        step=DeviceStep.KEEP,
        fdb=changes(f0, f1, lambda f: f.mac),
        neigh=changes(n0, n1, lambda n: n.ip),
        routes=changes(r0, r1, lambda r: r.dst),
    )


def changes(have: Iterable[T], want: Iterable[T], key: Callable[[T], Hashable]) -> Changes[T]:
    """Keyed set difference, in a stable order (``str`` of the objects)."""
    old = {key(x): x for x in have}
    new = {key(x): x for x in want}
    return Changes(
        add=tuple(sorted((x for k, x in new.items() if k not in old), key=str)),
        change=tuple(sorted((x for k, x in new.items() if k in old and old[k] != x), key=str)),
        remove=tuple(sorted((x for k, x in old.items() if k not in new), key=str)),
    )

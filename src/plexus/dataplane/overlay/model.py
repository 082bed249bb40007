"""What the overlay renderer reads and writes: pure, immutable data.

Inputs (what the datastore says): ``OverlaySpec`` (one overlay network), ``HostVtep`` (this
host in it) and ``RemoteHost`` (every other host holding blocks of it). Output (what the kernel
should hold for that network on this host): ``OverlayKernelState``. The same types describe what
the applier reads back, so desired and current compare with ``==``.

The derivations every host must agree on without asking each other live here too: the VTEP MAC
of a host (``vtep_mac``), its VTEP addresses (``vtep_addresses``), the device's MTU
(``overlay_mtu``) and name (``device_name``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from plexus.errors import InvalidArgument
from plexus.model.types import IPAddress, IPInterface, IPNetwork

VXLAN_PORT = 4789  # IANA (RFC 7348); the kernel's own default is still Linux's old 8472
VNI_MAX = (1 << 24) - 1
# Outer IP + UDP (8) + VXLAN (8) + the inner Ethernet header (14): RFC 7348 section 5.
OVERLAY_OVERHEAD = {4: 20 + 8 + 8 + 14, 6: 40 + 8 + 8 + 14}
MIN_MTU = {4: 576, 6: 1280}  # the least each inner family must be able to send unfragmented
DEVICE_PREFIX = "pxvx-"


@dataclass(frozen=True, slots=True)
class OverlaySpec:
    """One overlay network, as every host sees it."""

    network: str  # the network's name (for messages)
    network_id: str  # names the device, as ``Network.bridge`` names the bridge
    vni: int
    port: int = VXLAN_PORT
    offload: bool = False  # tx checksum offload on the VXLAN device (off: see render.py)
    mtu: int = 0  # 0: from the underlay (``overlay_mtu``)
    alias: str = ""  # IFLA_IFALIAS written on the device (links.tag(owner, "net:NAME"))
    bridge: str = ""  # the network's bridge: where this host delivers addresses it borrowed

    def __post_init__(self) -> None:
        if not 1 <= self.vni <= VNI_MAX:
            raise InvalidArgument("vni", self.vni, f"a VXLAN network identifier is 1-{VNI_MAX}")
        if not 1 <= self.port <= 65535:
            raise InvalidArgument("vxlan port", self.port, "a UDP port is 1-65535")
        if not self.network_id:
            raise InvalidArgument("network id", self.network_id, "must not be empty")


@dataclass(frozen=True, slots=True)
class HostVtep:
    """This host: its name, its underlay address (and that link's MTU), its blocks."""

    node: str
    underlay_ip: IPAddress
    underlay_mtu: int
    blocks: tuple[IPNetwork, ...] = ()
    borrowed: tuple[IPAddress, ...] = ()  # its endpoints' addresses of other hosts' blocks


@dataclass(frozen=True, slots=True)
class RemoteHost:
    """Another host holding blocks of the network (or addresses borrowed from others')."""

    node: str
    underlay_ip: IPAddress
    blocks: tuple[IPNetwork, ...] = ()
    borrowed: tuple[IPAddress, ...] = ()  # its endpoints' addresses of other hosts' blocks


# --- kernel objects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VxlanDevice:
    """The VXLAN link of one network. ``vni``, ``local``, ``port``, ``learning`` and ``remote``
    are fixed at creation (a change means a new device); the rest is set in place."""

    name: str
    vni: int
    local: IPAddress
    port: int
    mac: str
    mtu: int
    alias: str
    tx_checksum: bool  # ethtool's tx-checksumming
    learning: bool = False
    remote: IPAddress | None = None  # a default destination (group/remote): never plexus's
    up: bool = True

    def identity(self) -> tuple[object, ...]:
        return (self.vni, self.local, self.port, self.learning, self.remote)


@dataclass(frozen=True, slots=True)
class FdbEntry:
    """``bridge fdb`` on the VXLAN device: frames for ``mac`` go to underlay address ``dst``."""

    mac: str
    dst: IPAddress


@dataclass(frozen=True, slots=True)
class NeighEntry:
    """A permanent neighbour on the VXLAN device: overlay address ``ip`` is at ``mac``."""

    ip: IPAddress
    mac: str


@dataclass(frozen=True, slots=True)
class OverlayRoute:
    """``dst via via dev DEVICE onlink proto plexus`` in the main table."""

    dst: IPNetwork
    via: IPAddress | None  # None only when read back from a route someone altered


@dataclass(frozen=True, slots=True)
class OverlayKernelState:
    device: VxlanDevice | None = None
    addresses: frozenset[IPInterface] = frozenset()  # this host's VTEP addresses on the device
    fdb: frozenset[FdbEntry] = frozenset()
    neigh: frozenset[NeighEntry] = frozenset()
    routes: frozenset[OverlayRoute] = frozenset()
    # Routes through ``bridge`` (via None) to this host's borrowed addresses: the other
    # hosts' block routes would otherwise send them to the block's holder.
    bridge: str = ""
    delivered: frozenset[OverlayRoute] = frozenset()

    def counts(self) -> dict[str, int]:
        return {"addresses": len(self.addresses), "fdb": len(self.fdb),
                "neigh": len(self.neigh), "routes": len(self.routes),
                "delivered": len(self.delivered)}


# --- derivations every host agrees on ---------------------------------------------------------


def device_name(network_id: str) -> str:
    """Kernel name of a network's VXLAN device (at most 15 characters, like the bridge's)."""
    return f"{DEVICE_PREFIX}{network_id[:10]}"


def vtep_mac(node: str, vni: int) -> str:
    """The MAC of ``node``'s VXLAN device for ``vni``: derived, so that every host computes its
    peers' without reading their kernels or storing it. Unicast and locally administered (the
    two low bits of the first byte: 0b10), so it never collides with a vendor's address."""
    digest = hashlib.sha256(f"plexus-vtep\0{node}\0{vni}".encode()).digest()
    first = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


def overlay_mtu(underlay_mtu: int, underlay_version: int) -> int:
    """The overlay's MTU over an underlay link of ``underlay_mtu``: VXLAN adds 50 bytes over
    IPv4 and 70 over IPv6, which must fit without fragmenting the outer packet."""
    return underlay_mtu - OVERLAY_OVERHEAD[underlay_version]


def vtep_addresses(blocks: Iterable[IPNetwork]) -> dict[int, IPAddress]:
    """IP version -> the VTEP address of a host with ``blocks``: the network address of its
    lowest block of that version (as flannel uses its lease's). It is nobody's container
    address: the block's first address (IPv4 network address, IPv6 subnet-router anycast) is
    never handed out, since containers see the block's prefix. "Lowest" makes it deterministic
    when a host holds several blocks; it changes only when that block is released."""
    found: dict[int, IPAddress] = {}
    for block in sorted(blocks, key=lambda b: (b.version, b.network_address)):
        found.setdefault(block.version, block.network_address)
    return found


def host_network(ip: IPAddress) -> IPNetwork:
    """``ip`` alone as a prefix (/32, /128): the route of one borrowed address."""
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


def host_interface(ip: IPAddress) -> IPInterface:
    """``ip`` as a host address (/32, /128): a VTEP address routes nothing by itself."""
    return ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}")

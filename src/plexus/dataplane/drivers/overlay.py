"""Overlay networks on this host: the bridge driver's bridge and veths, plus the network's VXLAN
device and, per other host holding blocks of it, an FDB entry, a neighbour and a route per block
(``dataplane/overlay``: the renderer and the applier).

Design notes
------------
Anycast gateway. Containers get addresses with the *subnet's* prefix and the subnet's gateway
as default route, exactly as on a bridge network (Docker and CNI containers configure the
prefix themselves), and every host's bridge holds that same gateway address. A container that
talks to a container of another host's block therefore ARPs for it directly. The bridge
answers in its place with proxy ARP (``proxy_arp=1``): the kernel answers an ARP request on an
interface for an address it routes out of *another* interface, which is exactly the other
hosts' blocks (routed via the VXLAN device); the local containers, on the bridge's own
connected route, answer for themselves. ``proxy_delay=0`` answers at once (the default holds
broadcast requests back up to 0.8 s); ``send_redirects=0`` keeps the host from sending ICMP
redirects for what it routes back out of the bridge it came in on (an address of the subnet no
block holds). Checked on kernel 6.18 (tests/integration/test_overlay_hosts.py).

IPv6: a gateway per block, no proxy NDP. Proxy ARP has no IPv6 counterpart that scales:
the kernel's proxy NDP answers only for addresses listed one by one (``ip -6 neigh add proxy``),
an entry per remote container on every host. So a container's IPv6 address has its *block's*
prefix (/122 for ``--block-size 26``; ``ipam/hostblocks.interface``) and its default route goes
via the block's gateway, the block's last address (``hostblocks.block_gateway``), which the
holder's bridge holds with the block's prefix (``_ensure_block_gateways``): every other block,
of this host or another, is off-link for the container and routed by its host, which knows the
other hosts' blocks by one route each (the VXLAN device) and its own by the bridge's connected
routes. No neighbour discovery crosses hosts. Why a gateway inside the block, and not the
link-local anycast ``fe80::1`` of Calico and Cilium: a global, on-link gateway is what CNI
results (``ips[].gateway``) and Docker's Join (``GatewayIPv6``) express without an interface
scope, so a runtime that configures the container itself gets it right; and why not
``noprefixroute`` plus a route for the subnet: neither CNI results nor Docker can ask for it.
The subnet's own gateway stays on every bridge, as a /128 (``gateway_addresses``): the DNS
server listens there, and a container reaches it through its gateway (in block 0, on-link).
Not with the subnet's prefix as on a bridge network: its connected route would cover the other
hosts' VTEP addresses, and the kernel refuses an IPv6 ``onlink`` route whose gateway another
route sends out of another device ("Nexthop has invalid gateway or device mismatch",
``ip6_route_check_nh_onlink``; IPv4 has no such check. Checked on kernel 6.18). The bridge
thus holds one address per block this host holds (O(blocks)); IPv4 is unchanged.

MTU. The bridge and the veths get the overlay's MTU (the underlay link's less VXLAN's 50
bytes), or the network's ``--mtu`` if that is smaller: a container never sends a frame that
the VXLAN device would have to refuse.

This host's part comes from ``OverlayPeers`` (a read view of desired state: the cache, given by
the composition root). ``ensure_network`` synchronises the whole device (read, diff, apply);
``sync_peers`` follows the other hosts: when only remote hosts changed since the last sync, it
applies each one's own entries (``render.host_delta``) without reading the kernel, else it
synchronises. A per-network lock keeps the two (and ``delete_network``) from interleaving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from plexus.dataplane import links, netns
from plexus.dataplane.drivers.bridge import BridgeDriver, network_alias
from plexus.dataplane.host import HostNetlink, kernel_errors
from plexus.dataplane.overlay.apply import OverlayApplier
from plexus.dataplane.overlay.model import (
    HostVtep,
    OverlaySpec,
    RemoteHost,
    VxlanDevice,
    device_name,
    overlay_mtu,
)
from plexus.dataplane.overlay.render import desired, host_delta
from plexus.errors import DataplaneError, PlexusError
from plexus.ipam import hostblocks
from plexus.model.drivers import DRIVERS, OFFLOAD_OPTION
from plexus.model.types import Endpoint, IPAddress, IPInterface, IPNetwork, Network

log = logging.getLogger("plexus.dataplane")


@dataclass(frozen=True, slots=True)
class Peers:
    """One overlay network's hosts as desired state has them."""

    node: str  # this host
    underlay: IPAddress | None  # this host's advertise address (None: it has none)
    blocks: tuple[IPNetwork, ...]  # this host's blocks of the network's subnets
    remotes: Mapping[str, RemoteHost] = field(default_factory=dict)  # other hosts with blocks
    borrowed: tuple[IPAddress, ...] = ()  # this host's addresses of other hosts' blocks


class OverlayPeers(Protocol):
    """What the driver reads of desired state: networks, and the hosts and blocks of one."""

    def network(self, name: str) -> Network | None: ...

    def peers(self, net: Network) -> Peers: ...


# This host: node, underlay, blocks, borrowed addresses.
LocalKey = tuple[str, IPAddress | None, tuple[IPNetwork, ...], tuple[IPAddress, ...]]


@dataclass(frozen=True, slots=True)
class _Synced:
    """What the last sync of a network applied: an update starts from it."""

    spec: OverlaySpec
    local: LocalKey
    device: VxlanDevice
    remotes: Mapping[str, RemoteHost]


class OverlayDriver(BridgeDriver):
    traits = DRIVERS["overlay"]

    def __init__(self, host: HostNetlink, owner: str, peers: OverlayPeers,
                 applier: OverlayApplier | None = None) -> None:
        super().__init__(host, owner)
        self._peers = peers
        self._applier = applier if applier is not None else OverlayApplier(None)
        self._synced: dict[str, _Synced] = {}  # network name -> its last sync
        self._mtus: dict[str, int] = {}  # network name -> the MTU of its bridge and veths
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _alias(self, net: Network) -> str:
        return links.tag(self._owner, network_alias(net))

    def network_links(self, net: Network) -> Mapping[str, str]:
        """Both links carry the network's tag: the full pass keeps (and repairs) either."""
        return {net.bridge: self._alias(net), device_name(net.id): self._alias(net)}

    # -- the network ---------------------------------------------------------------------------

    async def ensure_network(self, net: Network) -> None:
        async with self._lock(net.name):
            peers = self._peers.peers(net)
            local = await self._local(net, peers)
            mtu = _link_mtu(net, local)
            await super().ensure_network(replace(net, mtu=mtu))
            self._mtus[net.name] = mtu
            self._answer_for_others(net.bridge)
            await self._sync(net, peers, local)

    async def delete_network(self, net: Network) -> None:
        """The VXLAN device (its entries go with it) and the bridge; both attempted."""
        async with self._lock(net.name):
            self._synced.pop(net.name, None)
            self._mtus.pop(net.name, None)
            failed: PlexusError | None = None
            try:
                await self._applier.remove(device_name(net.id), self._alias(net))
            except PlexusError as exc:
                failed = exc
            await super().delete_network(net)
            if failed is not None:
                raise failed

    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        mtu = self._mtus.get(net.name)
        if mtu is None:  # adopted at start-up: ensure_network did not run
            mtu = _link_mtu(net, await self._local(net, self._peers.peers(net)))
            self._mtus[net.name] = mtu
        await super().ensure_endpoint(replace(net, mtu=mtu), _as_configured(net, ep))

    async def check_endpoint(self, net: Network, ep: Endpoint) -> list[str]:
        return await super().check_endpoint(net, _as_configured(net, ep))

    @staticmethod
    def _answer_for_others(bridge: str) -> None:
        """Proxy ARP on the bridge, at once, and no redirects (see the design notes)."""
        netns.write_sysctl(None, f"net.ipv4.conf.{bridge}.proxy_arp", "1")
        netns.write_sysctl(None, f"net.ipv4.neigh.{bridge}.proxy_delay", "0")
        netns.write_sysctl(None, f"net.ipv4.conf.{bridge}.send_redirects", "0")

    # -- the other hosts -----------------------------------------------------------------------

    async def sync_peers(self, name: str) -> None:
        """Bring network ``name``'s entries for the other hosts in step with desired state:
        one host's entries per changed host when nothing else changed, else a sync."""
        async with self._lock(name):
            net = self._peers.network(name)
            if net is None or net.driver != self.traits.name:
                return  # gone (delete_network removes the device) or not an overlay
            peers = self._peers.peers(net)
            last = self._synced.get(name)
            if last is None or last.spec != self._spec(net) or last.local != _local_key(peers):
                await self._sync(net, peers, await self._local(net, peers))
            elif not await self._update(last, peers.remotes):
                log.info("overlay %s: an update failed, synchronising the device", name)
                await self._sync(net, peers, await self._local(net, peers))
            else:
                self._synced[name] = replace(last, remotes=peers.remotes)

    def forget_peers(self, name: str) -> None:
        """The next ``sync_peers`` reads the kernel and repairs whatever differs."""
        self._synced.pop(name, None)

    async def _update(self, last: _Synced, remotes: Mapping[str, RemoteHost]) -> bool:
        for node in sorted(set(last.remotes) | set(remotes)):
            old, new = last.remotes.get(node), remotes.get(node)
            if old == new:
                continue
            delta = host_delta(last.spec.vni, last.device, old, new)
            if not delta.empty and not await self._applier.update(delta):
                return False
        return True

    async def _sync(self, net: Network, peers: Peers, local: HostVtep) -> None:
        await self._ensure_block_gateways(net, peers.blocks)
        spec = self._spec(net)
        want = desired(spec, local, [peers.remotes[n] for n in sorted(peers.remotes)])
        assert want.device is not None
        delta = await self._applier.sync(want)
        self._synced[net.name] = _Synced(spec, _local_key(peers), want.device, peers.remotes)
        if not delta.empty:
            log.info("overlay %s: %d kernel changes (%s)", net.name, len(delta),
                     ", ".join(f"{k} {v}" for k, v in want.counts().items()))

    @staticmethod
    def gateway_addresses(net: Network) -> list[IPInterface]:
        """As the bridge driver's, but an IPv6 subnet's gateway as a /128 (design notes)."""
        return [ipaddress.ip_interface(f"{s.gateway}/{s.cidr.prefixlen}"
                                       if not hostblocks.per_block(net, s.version)
                                       else f"{s.gateway}/128")
                for s in net.subnets if s.gateway is not None]

    @kernel_errors
    async def _ensure_block_gateways(self, net: Network, blocks: tuple[IPNetwork, ...]) -> None:
        """The bridge holds the gateway of each IPv6 block this host holds, and no other
        (a released block's goes); a network without IPv6 is left alone. No bridge yet:
        ``ensure_network`` makes it and comes here again."""
        if not any(hostblocks.per_block(net, s.version) for s in net.subnets):
            return
        ipr = await self._host.ipr()
        index = await links.link_index(ipr, net.bridge)
        if index is None:
            return
        have = {ipaddress.ip_interface(f"{a.get('address')}/{a['prefixlen']}")
                async for a in await ipr.addr("dump")
                if a["index"] == index and a["family"] == socket.AF_INET6}
        want = block_gateways(net, blocks)
        await links.ensure_addresses(ipr, index, want - have)
        for iface in stale_gateways(net, have, want):
            await links.delete_address(ipr, index, iface)

    def _spec(self, net: Network) -> OverlaySpec:
        offload = net.options.get(OFFLOAD_OPTION, "off") == "on"
        return OverlaySpec(net.name, net.id, net.vni, offload=offload, alias=self._alias(net),
                           bridge=net.bridge)

    async def _local(self, net: Network, peers: Peers) -> HostVtep:
        if peers.underlay is None:
            raise DataplaneError(f"overlay network {net.name} needs this host's "
                                 "--advertise-address")
        mtu = await self._applier.underlay_mtu(peers.underlay)
        return HostVtep(peers.node, peers.underlay, mtu, peers.blocks, peers.borrowed)

    async def close(self) -> None:
        self._applier.close()


def _link_mtu(net: Network, local: HostVtep) -> int:
    """The MTU of the network's bridge and veths: the overlay's, or ``--mtu`` if smaller."""
    return min(net.mtu, overlay_mtu(local.underlay_mtu, local.underlay_ip.version))


def _local_key(peers: Peers) -> LocalKey:
    return (peers.node, peers.underlay, peers.blocks, peers.borrowed)


def _as_configured(net: Network, ep: Endpoint) -> Endpoint:
    """``ep`` with its addresses as the container's interface holds them (IPv6: the block's
    prefix, see the design notes)."""
    return replace(ep, addresses=tuple(hostblocks.interface(net, a) for a in ep.addresses))


def block_gateways(net: Network, blocks: Iterable[IPNetwork]) -> frozenset[IPInterface]:
    """The bridge's gateway of each of this host's ``blocks`` that has one (IPv6)."""
    return frozenset(
        ipaddress.ip_interface(f"{hostblocks.block_gateway(b)}/{b.prefixlen}")
        for b in blocks if hostblocks.per_block(net, b.version))


def stale_gateways(net: Network, have: Iterable[IPInterface],
                   want: frozenset[IPInterface]) -> list[IPInterface]:
    """Addresses of the bridge that are block gateways of ``net`` but not ``want``ed: a block's
    last address with the block's prefix, in one of its subnets, not a subnet's gateway."""
    subnet_gateways = {s.gateway for s in net.subnets}
    stale = []
    for iface in have:
        if iface in want or iface.ip in subnet_gateways or not hostblocks.per_block(
                net, iface.version):
            continue
        block = hostblocks.block_of(net, iface.ip)
        if (iface.network == block and iface.ip == hostblocks.block_gateway(block)
                and any(iface.ip in s.cidr for s in net.subnets)):
            stale.append(iface)
    return sorted(stale, key=str)

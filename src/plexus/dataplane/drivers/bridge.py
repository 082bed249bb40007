"""The bridge driver: a Linux bridge per network (with its gateways), a veth per endpoint.

The container end of a veth is born inside the container's namespace (see
``links.create_veth``); for a runtime that moves the end itself (Docker, ``peer_in_host``) the
pair is made in the host's namespace and the end is left there as ``ep.peer_ifname`` until the
runtime takes it. Every link carries an alias (``plexus:net:NAME`` / ``plexus:ep:CID/IF``) by
which a restarted agent knows its own links.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Mapping

from pyroute2 import AsyncIPRoute

from plexus.dataplane import links, netns
from plexus.dataplane.host import HostNetlink, container_netlink, kernel_errors
from plexus.errors import AlreadyExists, DataplaneError, NotFound
from plexus.model.drivers import DRIVERS
from plexus.model.types import Endpoint, Network

log = logging.getLogger("plexus.dataplane")
LOOPBACK_INDEX = 1  # lo is ifindex 1 in every network namespace


def owner_alias(ep: Endpoint) -> str:
    return f"ep:{ep.container_id}/{ep.ifname}"


def network_alias(net: Network) -> str:
    return f"net:{net.name}"


def quiet_port(name: str) -> None:
    """No IPv6 on a bridge port's host end, before it comes up: it only bridges frames (the
    bridge holds the gateways), and an IPv6 stack per port costs each one a link-local address,
    duplicate address detection, MLD reports and router solicitations: with thousands of ports
    the kernel's IPv6 workers hold the networking lock for seconds (measured at 1,000+)."""
    with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
        netns.write_sysctl(None, f"net.ipv6.conf.{name}.disable_ipv6", "1")


class BridgeDriver:
    traits = DRIVERS["bridge"]

    def __init__(self, host: HostNetlink) -> None:
        self._host = host

    def network_links(self, net: Network) -> Mapping[str, str]:
        return {net.bridge: network_alias(net)}

    def endpoint_links(self, ep: Endpoint) -> Mapping[str, str]:
        return {ep.host_ifname: owner_alias(ep)}

    @kernel_errors
    async def ensure_network(self, net: Network) -> None:
        ipr = await self._host.ipr()
        index = await links.ensure_bridge(ipr, net.bridge, net.mtu, network_alias(net))
        gateways = [
            ipaddress.ip_interface(f"{s.gateway}/{s.cidr.prefixlen}")
            for s in net.subnets
            if s.gateway is not None
        ]
        await links.ensure_addresses(ipr, index, gateways)
        # Localhost publishing DNATs 127.0.0.1 to a container; the kernel drops such packets as
        # martians on their way out of the bridge unless route_localnet is set on it.
        netns.write_sysctl(None, f"net.ipv4.conf.{net.bridge}.route_localnet", "1")
        for version in {s.version for s in net.subnets}:
            self._host.ensure_forwarding(version)

    async def delete_network(self, net: Network) -> None:
        await self._host.delete_link(net.bridge)

    @kernel_errors
    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        await self._host.settle(ep.host_ifname)
        if ep.peer_in_host:
            await self._ensure_detached(net, ep)
            return
        async with container_netlink(ep.netns) as ctr:
            await ctr.link("set", index=LOOPBACK_INDEX, state="up")
            await self._ensure_veth(net, ep, ctr)
            link = await links.get_link_by_name(ctr, ep.ifname)
            if link is None:
                raise DataplaneError(f"{ep.ifname} missing in {ep.netns} after creation")
            index = link["index"]
            await links.ensure_addresses(ctr, index, ep.addresses)
            await ctr.link("set", index=index, state="up")
            await links.ensure_default_routes(ctr, ep.gateways)

    async def _bridge_index(self, net: Network) -> int:
        index = await links.link_index(await self._host.ipr(), net.bridge)
        if index is None:
            raise DataplaneError(f"bridge {net.bridge} of network {net.name} is missing")
        return index

    async def _ensure_veth(self, net: Network, ep: Endpoint, ctr: AsyncIPRoute) -> None:
        host, bridge = await self._host.ipr(), await self._bridge_index(net)
        name = ep.host_ifname
        try:
            # The common case, a new endpoint: create first, look only if that fails.
            await links.create_veth(host, name, ep.netns, ep.ifname, net.mtu, ep.mac)
        except AlreadyExists:
            have_host = await links.link_index(host, name) is not None
            have_ctr = await links.link_index(ctr, ep.ifname) is not None
            if have_ctr and not have_host:
                raise  # the container already has an interface of that name
            if have_host and not have_ctr:
                await links.delete_link(host, name)  # half a pair: start again
                await links.create_veth(host, name, ep.netns, ep.ifname, net.mtu, ep.mac)
        quiet_port(name)
        await links.attach_to_bridge(host, name, bridge, owner_alias(ep))

    async def _ensure_detached(self, net: Network, ep: Endpoint) -> None:
        """Before the runtime took the container end (``ep.netns`` empty) both ends must be
        here; after, only the host end, which is all plexus can still repair."""
        host, bridge = await self._host.ipr(), await self._bridge_index(net)
        have_host = await links.link_index(host, ep.host_ifname) is not None
        if not ep.netns:
            have_peer = await links.link_index(host, ep.peer_ifname) is not None
            if not (have_host and have_peer):
                await links.delete_link(host, ep.host_ifname)  # a stale pair of an earlier life
                await links.delete_link(host, ep.peer_ifname)
                await links.create_veth(host, ep.host_ifname, None, ep.peer_ifname, net.mtu,
                                        ep.mac)
                quiet_port(ep.host_ifname)
        elif not have_host:
            log.warning("veth %s of joined endpoint %s is gone; the runtime must join again",
                        ep.host_ifname, ep.key)
            return
        await links.attach_to_bridge(host, ep.host_ifname, bridge, owner_alias(ep))

    async def check_endpoint(self, net: Network, ep: Endpoint) -> list[str]:
        try:
            async with container_netlink(ep.netns) as ctr:
                state = await links.link_state(ctr, ep.ifname)
        except (NotFound, OSError) as exc:
            return [f"network namespace {ep.netns} is gone ({exc})"]
        if state is None:
            return [f"interface {ep.ifname} is missing in {ep.netns}"]
        problems = [] if state["up"] else [f"interface {ep.ifname} is down"]
        missing = {str(a) for a in ep.addresses} - set(state["addresses"])
        if missing:
            problems.append(f"{ep.ifname} lacks {sorted(missing)}")
        if not await self._host.has_link(ep.host_ifname):
            problems.append(f"host veth {ep.host_ifname} is missing")
        return problems

    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        # Deleting the host end removes the peer too; if the container's namespace is already
        # gone, the kernel destroyed the pair with it and there is nothing to do.
        await self._host.delete_link(ep.host_ifname, wait=wait)

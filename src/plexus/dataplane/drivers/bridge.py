"""The bridge driver: a Linux bridge per network (with its gateways), a veth per endpoint.

The container end of a veth is born inside the container's namespace (see
``rawnl.create_veth``); for a runtime that moves the end itself (Docker, ``peer_in_host``) the
pair is made in the host's namespace and the end is left there as ``ep.peer_ifname`` until the
runtime takes it. Every link carries an alias (``plexus:OWNER:net:NAME`` /
``plexus:OWNER:ep:CID/IF``, ``links.tag``) by which a restarted agent knows its own links, and
by which it leaves alone those of another agent (another state directory or datastore): a link
of the name it wants that is another agent's is refused, never adopted.

An endpoint's links are programmed on a worker thread with hand-built requests (``rawnl``,
``rtnl``) in five round trips: ~11 requests, each of which pyroute2 spent ~0.7 ms of Python on,
on the event loop, which the veth's creation also held for the kernel's time. Networks, checks
and deletions of networks stay on pyroute2: they are not per endpoint.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
from collections.abc import Mapping

from plexus.dataplane import links, netns, rawnl
from plexus.dataplane.host import HostNetlink, container_netlink, kernel_errors
from plexus.dataplane.overlay import wire
from plexus.dataplane.overlay.model import NeighEntry
from plexus.dataplane.rawnl import Channel
from plexus.errors import AlreadyExists, DataplaneError, NotFound
from plexus.model.drivers import DRIVERS
from plexus.model.types import Endpoint, IPInterface, Network

log = logging.getLogger("plexus.dataplane")
LOOPBACK_INDEX = 1  # lo is ifindex 1 in every network namespace


def endpoint_alias(ep: Endpoint) -> str:
    return f"ep:{ep.container_id}/{ep.ifname}"


def network_alias(net: Network) -> str:
    return f"net:{net.name}"


def forget_neighbours(host: Channel, bridge: int, ep: Endpoint) -> None:
    """The host forgets what its neighbour cache on the bridge says of the endpoint's
    addresses: an address given again to a new container (a new MAC) would otherwise stay bound
    to the old container's MAC until the entry fails its probes, and the new container be
    unreachable meanwhile (seen on overlays, where a released address comes back at once)."""
    rawnl.run_steps(host, [
        (functools.partial(wire.neigh_request, index=bridge, entry=NeighEntry(a.ip, ""),
                           delete=True), f"cannot forget neighbour {a.ip}", (errno.ENOENT,))
        for a in ep.addresses])


def quiet_port(name: str) -> None:
    """No IPv6 on a bridge port's host end, before it comes up: it only bridges frames (the
    bridge holds the gateways), and an IPv6 stack per port costs each one a link-local address,
    duplicate address detection, MLD reports and router solicitations: with thousands of ports
    the kernel's IPv6 workers hold the networking lock for seconds (measured at 1,000+)."""
    with contextlib.suppress(FileNotFoundError):  # a kernel without IPv6
        netns.write_sysctl(None, f"net.ipv6.conf.{name}.disable_ipv6", "1")


class BridgeDriver:
    traits = DRIVERS["bridge"]

    def __init__(self, host: HostNetlink, owner: str) -> None:
        self._host = host
        self._owner = owner
        # bridge name -> ifindex, as ensure_network made or found it: an endpoint's master
        # without a lookup. A stale index (the bridge deleted and made again behind our back)
        # fails the request that uses it, which then looks again (_join_bridge).
        self._bridges: dict[str, int] = {}

    def network_links(self, net: Network) -> Mapping[str, str]:
        return {net.bridge: links.tag(self._owner, network_alias(net))}

    def endpoint_links(self, ep: Endpoint) -> Mapping[str, str]:
        return {ep.host_ifname: links.tag(self._owner, endpoint_alias(ep))}

    @kernel_errors
    async def ensure_network(self, net: Network) -> None:
        ipr = await self._host.ipr()
        index = await links.ensure_bridge(ipr, net.bridge, net.mtu, self._owner,
                                          network_alias(net))
        self._bridges[net.bridge] = index
        await links.ensure_addresses(ipr, index, self.gateway_addresses(net))
        # Localhost publishing DNATs 127.0.0.1 to a container; the kernel drops such packets as
        # martians on their way out of the bridge unless route_localnet is set on it.
        netns.write_sysctl(None, f"net.ipv4.conf.{net.bridge}.route_localnet", "1")
        for version in {s.version for s in net.subnets}:
            self._host.ensure_forwarding(version)

    @staticmethod
    def gateway_addresses(net: Network) -> list[IPInterface]:
        """The bridge's addresses: each subnet's gateway with the subnet's prefix."""
        return [ipaddress.ip_interface(f"{s.gateway}/{s.cidr.prefixlen}")
                for s in net.subnets if s.gateway is not None]

    async def delete_network(self, net: Network) -> None:
        self._bridges.pop(net.bridge, None)
        await self._host.delete_link(net.bridge)

    @kernel_errors
    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> None:
        await self._host.settle(ep.host_ifname)
        cached = self._bridges.get(net.bridge)
        program = self._program_detached if ep.peer_in_host else self._program
        bridge = await self._host.offload(program, net, ep, cached)
        if bridge != cached:
            self._bridges[net.bridge] = bridge

    # -- on a worker thread (HostNetlink.offload): blocking requests, host channel first --------

    def _program(self, host: Channel, net: Network, ep: Endpoint, bridge: int | None) -> int:
        """The endpoint's veth, its container end configured; returns the bridge's index."""
        if bridge is None:
            bridge = self._lookup_bridge(host, net)
        with Channel.open(ep.netns) as ctr:  # NotFound: the namespace is gone
            self._make_veth(host, ctr, net, ep)
            quiet_port(ep.host_ifname)
            bridge = self._join_bridge(host, net, ep, bridge)
            forget_neighbours(host, bridge, ep)
            index = rawnl.link_index(ctr, ep.ifname)
            if index is None:
                raise DataplaneError(f"{ep.ifname} missing in {ep.netns} after creation")
            rawnl.run_steps(ctr, [
                rawnl.up(LOOPBACK_INDEX, "lo"),
                *rawnl.addresses(index, ep.addresses),
                rawnl.up(index, ep.ifname),
                *rawnl.default_routes(ep.gateways),  # (once the addresses make them reachable)
            ])
        return bridge

    def _make_veth(self, host: Channel, ctr: Channel, net: Network, ep: Endpoint) -> None:
        name = ep.host_ifname
        try:
            # The common case, a new endpoint: create first, look only if that fails.
            rawnl.create_veth(host, name, net.mtu, ep.ifname, ep.mac, ep.netns)
        except AlreadyExists:
            have_host = self._host_end(host, name)
            have_ctr = rawnl.link_index(ctr, ep.ifname) is not None
            if have_ctr and not have_host:
                raise  # the container already has an interface of that name
            if have_host and not have_ctr:
                rawnl.delete_link(host, name)  # half a pair: start again
                rawnl.create_veth(host, name, net.mtu, ep.ifname, ep.mac, ep.netns)

    def _program_detached(self, host: Channel, net: Network, ep: Endpoint,
                          bridge: int | None) -> int:
        """Before the runtime took the container end (``ep.netns`` empty) both ends must be
        here; after, only the host end, which is all plexus can still repair."""
        if bridge is None:
            bridge = self._lookup_bridge(host, net)
        have_host = self._host_end(host, ep.host_ifname)
        if not ep.netns:
            if not (have_host and rawnl.link_index(host, ep.peer_ifname) is not None):
                rawnl.delete_link(host, ep.host_ifname)  # a stale pair of an earlier life
                rawnl.delete_link(host, ep.peer_ifname)
                rawnl.create_veth(host, ep.host_ifname, net.mtu, ep.peer_ifname, ep.mac)
                quiet_port(ep.host_ifname)
        elif not have_host:
            log.warning("veth %s of joined endpoint %s is gone; the runtime must join again",
                        ep.host_ifname, ep.key)
            return bridge
        return self._join_bridge(host, net, ep, bridge)

    def _host_end(self, host: Channel, name: str) -> bool:
        """Whether the host end ``name`` of a veth exists; DataplaneError if it is another
        agent's (it would otherwise be deleted or enslaved here)."""
        link = rawnl.get_link(host, name)
        if link is None:
            return False
        links.check_owner(name, link.owner, self._owner)
        return True

    def _join_bridge(self, host: Channel, net: Network, ep: Endpoint, bridge: int) -> int:
        """The endpoint's host end becomes a port of the bridge (up, with its alias), in
        hairpin mode; returns the bridge's index, looked up again if ``bridge`` was stale.

        Hairpin mode lets the bridge send a frame back out of the port it came in on. A
        container connecting to its own published port needs it: its SYN enters through its
        port, is DNATed back to itself, and must leave through the same port (Docker does the
        same when its userland proxy is off)."""
        name, alias = ep.host_ifname, links.tag(self._owner, endpoint_alias(ep))
        error = rawnl.join_bridge(host, name, bridge, alias)
        if error:
            fresh = self._lookup_bridge(host, net)
            if fresh != bridge:
                bridge, error = fresh, rawnl.join_bridge(host, name, fresh, alias)
        if error:
            raise DataplaneError(f"cannot attach {name} to bridge {net.bridge}: "
                                 f"{os.strerror(error)}")
        return bridge

    @staticmethod
    def _lookup_bridge(host: Channel, net: Network) -> int:
        index = rawnl.link_index(host, net.bridge)
        if index is None:
            raise DataplaneError(f"bridge {net.bridge} of network {net.name} is missing")
        return index

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

"""The Dataplane seam: what the agent asks of the kernel's links, addresses and routes.

``NetlinkDataplane`` programs the namespace the agent runs in (the "host") and, through sockets
opened inside them, the containers' namespaces. ``FakeDataplane`` records the same calls in memory
for unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.dataplane import links, netns
from plexus.errors import AlreadyExists, DataplaneError
from plexus.model.types import Endpoint, IPNetwork, Network

log = logging.getLogger("plexus.dataplane")
LOOPBACK_INDEX = 1


def host_ifname(ep: Endpoint) -> str:
    """Deterministic host-side veth name, so every ensure/delete finds the same link."""
    digest = hashlib.sha256(f"{ep.container_id}/{ep.ifname}".encode()).hexdigest()
    return f"pxv{digest[:12]}"


def peer_ifname(ep: Endpoint) -> str:
    """Name of a container end left in the host namespace, for a runtime that moves it itself."""
    digest = hashlib.sha256(f"{ep.container_id}/{ep.ifname}".encode()).hexdigest()
    return f"pxc{digest[:12]}"


def owner_alias(ep: Endpoint) -> str:
    return f"ep:{ep.container_id}/{ep.ifname}"


def network_alias(net: Network) -> str:
    return f"net:{net.name}"


class Dataplane(Protocol):
    async def ensure_network(self, net: Network) -> None: ...

    async def delete_network(self, net: Network) -> None: ...

    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> Endpoint:
        """Programs the endpoint; returns it with ``host_ifname`` and ``mac`` filled in."""
        ...

    async def ensure_detached_veth(self, net: Network, ep: Endpoint) -> Endpoint:
        """A veth whose container end stays in the host namespace, named ``peer_ifname(ep)``
        (Docker moves and renames it at Join); returns ``ep`` with ``host_ifname`` set."""
        ...

    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        """``wait=False``: return once the deletion is under way (a CNI DEL); an ensure of the
        same endpoint waits for it to finish."""
        ...

    async def owned_links(self) -> dict[str, str]:
        """Links plexus made in the host namespace: name → owner alias."""
        ...

    async def delete_link(self, name: str) -> None: ...

    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]: ...

    async def has_link(self, name: str) -> bool: ...

    async def close(self) -> None: ...


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _kernel_errors(fn: F) -> F:
    """The seam's boundary: whatever netlink or the OS refuses leaves as a DataplaneError (a
    PlexusError), never as a raw NetlinkError/OSError that front doors cannot map."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except NetlinkError as exc:
            raise DataplaneError(f"{fn.__name__}: netlink: {exc}") from exc
        except OSError as exc:
            raise DataplaneError(f"{fn.__name__}: {exc}") from exc

    return cast(F, wrapper)


class NetlinkDataplane:
    """Programs the agent's namespace through one netlink socket and each container's through a
    socket opened inside it.

    Two kernel facts shape it: a netlink socket serves one dump at a time (a second concurrent
    dump fails with EBUSY), hence ``_dump_lock``; and deleting a veth costs ~15-20 ms of the
    kernel's time (unregistering under RTNL), which a CNI DEL need not wait for, hence
    ``delete_endpoint(wait=False)`` with ``_deleting``, which a later ADD of the same endpoint
    waits on before it creates the pair again.
    """

    def __init__(self) -> None:
        self._host: AsyncIPRoute | None = None
        self._forwarding: set[int] = set()
        self._dump_lock = asyncio.Lock()
        self._deleting: dict[str, asyncio.Task[None]] = {}

    async def _ipr(self) -> AsyncIPRoute:
        if self._host is None:
            self._host = AsyncIPRoute()
            await self._host.setup_endpoint()
        return self._host

    async def close(self) -> None:
        for task in list(self._deleting.values()):
            with contextlib.suppress(Exception):
                await task
        if self._host is not None:
            self._host.close()
            self._host = None

    @_kernel_errors
    async def ensure_network(self, net: Network) -> None:
        if net.driver != "bridge":
            return
        ipr = await self._ipr()
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
            self._ensure_forwarding(version)

    def _ensure_forwarding(self, version: int) -> None:
        if version in self._forwarding:
            return
        key = "net.ipv4.ip_forward" if version == 4 else "net.ipv6.conf.all.forwarding"
        if netns.read_sysctl(key) != "1":
            netns.write_sysctl(None, key, "1")
        self._forwarding.add(version)

    @_kernel_errors
    async def delete_network(self, net: Network) -> None:
        if net.driver == "bridge":
            await links.delete_link(await self._ipr(), net.bridge)

    async def _settle(self, name: str) -> None:
        """Wait for a background deletion of link ``name`` (a DEL just before this ADD)."""
        task = self._deleting.get(name)
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    @_kernel_errors
    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> Endpoint:
        if net.driver == "host":
            return replace(ep, host_ifname="", mac="")
        name = host_ifname(ep)
        await self._settle(name)
        async with container_netlink(ep.netns) as ctr:
            # lo is ifindex 1 in every network namespace: no lookup needed.
            await ctr.link("set", index=LOOPBACK_INDEX, state="up")
            if net.driver == "none":
                return ep
            await self._ensure_veth(net, ep, name, ctr)
            link = await links.get_link_by_name(ctr, ep.ifname)
            if link is None:
                raise DataplaneError(f"{ep.ifname} missing in {ep.netns} after creation")
            index = link["index"]
            await links.ensure_addresses(ctr, index, ep.addresses)
            await ctr.link("set", index=index, state="up")
            await links.ensure_default_routes(ctr, ep.gateways)
        return replace(ep, host_ifname=name, mac=str(link.get("address") or ""))

    async def _ensure_veth(self, net: Network, ep: Endpoint, name: str, ctr: AsyncIPRoute) -> None:
        host = await self._ipr()
        bridge = await links.link_index(host, net.bridge)
        if bridge is None:
            raise DataplaneError(f"bridge {net.bridge} of network {net.name} is missing")
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
        await links.attach_to_bridge(host, name, bridge, owner_alias(ep))

    @_kernel_errors
    async def ensure_detached_veth(self, net: Network, ep: Endpoint) -> Endpoint:
        host = await self._ipr()
        bridge = await links.link_index(host, net.bridge)
        if bridge is None:
            raise DataplaneError(f"bridge {net.bridge} of network {net.name} is missing")
        name, peer = host_ifname(ep), peer_ifname(ep)
        await self._settle(name)  # a background delete of the last life must not hit this one
        await links.delete_link(host, name)  # a stale pair from an earlier life of the endpoint
        await links.delete_link(host, peer)
        await links.create_veth(host, name, None, peer, net.mtu, ep.mac)
        await links.attach_to_bridge(host, name, bridge, owner_alias(ep))
        index = await links.link_index(host, peer)
        if index is None:
            raise DataplaneError(f"veth end {peer} vanished right after it was created")
        mac = (await links.get_link(host, index)).get("address")
        return replace(ep, host_ifname=name, mac=mac)

    @_kernel_errors
    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        # Deleting the host end removes the peer too; if the container's namespace is already
        # gone, the kernel destroyed the pair with it and there is nothing to do.
        name = ep.host_ifname or host_ifname(ep)
        await self._settle(name)
        log.debug("deleting %s of endpoint %s (wait=%s)", name, ep.key, wait)
        if wait:
            await links.delete_link(await self._ipr(), name)
            return
        task = asyncio.create_task(self._delete_later(name))
        self._deleting[name] = task
        task.add_done_callback(lambda t: self._deleting.pop(name, None))

    async def _delete_later(self, name: str) -> None:
        try:
            await links.delete_link(await self._ipr(), name)
        except (NetlinkError, OSError, DataplaneError) as exc:
            # The periodic reconcile deletes it as an orphan if this did not.
            log.warning("background delete of %s failed: %s", name, exc)

    @_kernel_errors
    async def has_link(self, name: str) -> bool:
        return await links.link_index(await self._ipr(), name) is not None

    @_kernel_errors
    async def owned_links(self) -> dict[str, str]:
        async with self._dump_lock:
            return await links.owned_links(await self._ipr())

    @_kernel_errors
    async def delete_link(self, name: str) -> None:
        log.info("deleting link %s (not wanted by any network or endpoint)", name)
        await links.delete_link(await self._ipr(), name)

    @_kernel_errors
    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]:
        async with self._dump_lock:
            found = await links.local_prefixes(await self._ipr())
        return [(ipaddress.ip_network(p, strict=False), where) for p, where in found]


@contextlib.asynccontextmanager
async def container_netlink(path: str) -> AsyncIterator[AsyncIPRoute]:
    sock = netns.netlink_socket(path)
    ipr = AsyncIPRoute(fileno=sock.detach())
    try:
        await ipr.setup_endpoint()
        yield ipr
    finally:
        ipr.close()


@dataclass
class FakeDataplane:
    """In-memory double: records what would be in the kernel."""

    bridges: dict[str, Network] = field(default_factory=dict)
    veths: dict[str, Endpoint] = field(default_factory=dict)
    prefixes: list[tuple[IPNetwork, str]] = field(default_factory=list)
    fail_endpoint: bool = False

    async def ensure_network(self, net: Network) -> None:
        if net.driver == "bridge":
            self.bridges[net.bridge] = net

    async def delete_network(self, net: Network) -> None:
        self.bridges.pop(net.bridge, None)

    async def ensure_endpoint(self, net: Network, ep: Endpoint) -> Endpoint:
        if self.fail_endpoint:
            raise DataplaneError("fake: endpoint programming failed")
        if net.driver != "bridge":
            return ep
        name = host_ifname(ep)
        done = replace(ep, host_ifname=name, mac="02:00:00:00:00:01")
        self.veths[name] = done
        return done

    async def ensure_detached_veth(self, net: Network, ep: Endpoint) -> Endpoint:
        return await self.ensure_endpoint(net, ep)

    async def delete_endpoint(self, ep: Endpoint, wait: bool = True) -> None:
        self.veths.pop(ep.host_ifname or host_ifname(ep), None)

    async def owned_links(self) -> dict[str, str]:
        owned = {name: network_alias(net) for name, net in self.bridges.items()}
        owned.update({name: owner_alias(ep) for name, ep in self.veths.items()})
        return owned

    async def delete_link(self, name: str) -> None:
        self.bridges.pop(name, None)
        self.veths.pop(name, None)

    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]:
        return list(self.prefixes)

    async def has_link(self, name: str) -> bool:
        return name in self.bridges or name in self.veths

    async def close(self) -> None:
        return None

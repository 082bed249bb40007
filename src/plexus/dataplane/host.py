"""The agent's own network namespace (the "host"), as the drivers share it.

One pyroute2 netlink socket for requests that are not per endpoint, opened once. A netlink
socket serves one dump at a time (a second concurrent dump fails with EBUSY), hence
``_dump_lock``. The requests of the endpoint path run on worker threads with sockets of their
own (``offload``, ``rawnl.py`` has why). Deleting a veth costs ~15-20 ms of the kernel's time
(unregistering under RTNL), which a CNI DEL need not wait for, hence
``delete_link(wait=False)`` with ``_deleting``, which a later creation of the same link waits on
(``settle``) before it makes it again; deletions have a thread of their own, so that they never
hold up a creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.dataplane import events, links, netns, rawnl
from plexus.errors import DataplaneError
from plexus.model.types import IPAddress, IPNetwork

log = logging.getLogger("plexus.dataplane")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
P = ParamSpec("P")
T = TypeVar("T")
LINK_WORKERS = 2  # threads programming endpoints: the kernel serializes them (RTNL) anyway


class LinkTable(Protocol):
    """The links this agent made in the host's namespace, as the full pass sees them."""

    owner: str  # this agent's mark on its links (``links.tag``)

    async def owned_links(self) -> dict[str, str]:
        """name -> alias as the kernel holds it (``links.tag``) of every link this agent made,
        or an agent before owners (a legacy alias); never another agent's."""
        ...

    async def delete_link(self, name: str, wait: bool = True, why: str = "") -> None: ...

    async def close(self) -> None: ...


def kernel_errors(fn: F) -> F:
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


class HostNetlink:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._ipr: AsyncIPRoute | None = None
        self._dump_lock = asyncio.Lock()
        self._deleting: dict[str, asyncio.Task[None]] = {}
        self._forwarding: set[int] = set()
        self._links = rawnl.NetlinkThreads(LINK_WORKERS, "plexus-links")
        self._deleter = rawnl.NetlinkThreads(1, "plexus-dellink")  # see _delete_off_loop

    async def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            self._ipr = AsyncIPRoute()
            await self._ipr.setup_endpoint()
        return self._ipr

    async def close(self) -> None:
        for task in list(self._deleting.values()):
            with contextlib.suppress(Exception):
                await task
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        self._links.close()
        self._deleter.close()

    async def offload(self, fn: Callable[Concatenate[rawnl.Channel, P], T], *args: P.args,
                      **kwargs: P.kwargs) -> T:
        """``fn(channel, ...)`` on a worker thread, with a channel into this namespace of that
        thread's own: blocking requests (``rawnl``) that must not run on the event loop."""
        return await self._links.run(fn, *args, **kwargs)

    async def settle(self, name: str) -> None:
        """Wait for a background deletion of link ``name`` (a DEL just before this ADD)."""
        task = self._deleting.get(name)
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    @kernel_errors
    async def delete_link(self, name: str, wait: bool = True, why: str = "") -> None:
        await self.settle(name)
        if why:
            log.info("deleting link %s (%s)", name, why)
        if wait:
            await self._delete_off_loop(name)
            return
        task = asyncio.create_task(self._delete_later(name))
        self._deleting[name] = task
        task.add_done_callback(lambda t: self._deleting.pop(name, None))

    async def _delete_later(self, name: str) -> None:
        try:
            await self._delete_off_loop(name)
        except (OSError, DataplaneError) as exc:
            # The periodic pass deletes it as an orphan if this did not.
            log.warning("background delete of %s failed: %s", name, exc)

    async def _delete_off_loop(self, name: str) -> None:
        """Delete link ``name`` on a thread of its own. rtnetlink handles a request inside the
        sender's send(): deleting a veth unregisters it under the networking lock and waits
        for RCU, ~15-20 ms in that one syscall, which on the agent's socket would hold the
        whole event loop (every API call, every DNS update) as long."""
        await self._deleter.run(rawnl.delete_link, name)

    @kernel_errors
    async def link_state(self, index: int) -> tuple[bool, int | None] | None:
        """(up, master index) of link ``index`` now, or None if there is none. Asked once per
        new endpoint (the kernel watcher looks again at a veth it saw up before it joined its
        bridge), so on a worker thread, like the endpoint's own requests."""
        link = await self.offload(rawnl.get_link, index=index)
        return None if link is None else (link.admin_up, link.master)

    @kernel_errors
    async def has_link(self, name: str) -> bool:
        return await links.link_index(await self.ipr(), name) is not None

    @kernel_errors
    async def owned_links(self) -> dict[str, str]:
        # A dump of its own, parsed on a worker thread: thousands of links never stall the
        # event loop (dataplane/events.py has the measurements).
        snapshot = await events.owned_links_snapshot(None, owner=self.owner)
        return {name: links.tag(link.owner, link.alias) for name, link in snapshot.items()
                if link.alias is not None}

    @kernel_errors
    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]:
        async with self._dump_lock:
            found = await links.local_prefixes(await self.ipr())
        return [(ipaddress.ip_network(p, strict=False), where) for p, where in found]

    @kernel_errors
    async def has_address(self, ip: IPAddress) -> bool:
        if ip.is_loopback:
            return True  # the kernel holds all of 127.0.0.0/8 (and ::1) as local
        async with self._dump_lock:
            found = [a.get("address") async for a in await (await self.ipr()).addr("dump")]
        return str(ip) in found

    @kernel_errors
    async def default_route_address(self) -> IPAddress | None:
        """The address of the interface that holds the default route (IPv4 first, then IPv6):
        where other hosts reach this one, unless told otherwise (``--advertise-address``)."""
        async with self._dump_lock:
            ipr = await self.ipr()
            for family in (socket.AF_INET, socket.AF_INET6):
                routes = [r async for r in await ipr.route("dump", family=family)]
                default = next((r for r in routes if r.get("dst_len") == 0
                                and r.get("table") == 254 and r.get("oif")), None)
                if default is None:
                    continue
                if default.get("prefsrc"):
                    return ipaddress.ip_address(default.get("prefsrc"))
                addrs = [a async for a in await ipr.addr("dump", family=family)]
                for a in addrs:
                    ip = ipaddress.ip_address(a.get("address"))
                    if a.get("index") == default.get("oif") and not ip.is_link_local:
                        return ip
        return None

    def check_netns(self, path: str) -> None:
        """Raise InvalidArgument unless ``path`` is a network namespace (``HostView``)."""
        netns.check_netns(path)

    def ensure_forwarding(self, version: int) -> None:
        if version in self._forwarding:
            return
        key = "net.ipv4.ip_forward" if version == 4 else "net.ipv6.conf.all.forwarding"
        if netns.read_sysctl(key) != "1":
            netns.write_sysctl(None, key, "1")
        self._forwarding.add(version)


@contextlib.asynccontextmanager
async def container_netlink(path: str) -> AsyncIterator[AsyncIPRoute]:
    """A netlink handle inside the namespace at ``path``, closed on exit."""
    sock = netns.netlink_socket(path)
    ipr = AsyncIPRoute(fileno=sock.detach())
    try:
        await ipr.setup_endpoint()
        yield ipr
    finally:
        ipr.close()

"""The agent's own network namespace (the "host"), as the drivers share it.

One netlink socket for requests, opened once. Two kernel facts shape this class: a netlink
socket serves one dump at a time (a second concurrent dump fails with EBUSY), hence
``_dump_lock``; and deleting a veth costs ~15-20 ms of the kernel's time (unregistering under
RTNL), which a CNI DEL need not wait for, hence ``delete_link(wait=False)`` with ``_deleting``,
which a later creation of the same link waits on (``settle``) before it makes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.dataplane import events, links, netns
from plexus.errors import DataplaneError
from plexus.model.types import IPNetwork

log = logging.getLogger("plexus.dataplane")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class LinkTable(Protocol):
    """The links plexus made in the host's namespace, as the full pass sees them."""

    async def owned_links(self) -> dict[str, str]:
        """name -> alias (without the "plexus:" prefix) of every link plexus made."""
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
    def __init__(self) -> None:
        self._ipr: AsyncIPRoute | None = None
        self._dump_lock = asyncio.Lock()
        self._deleting: dict[str, asyncio.Task[None]] = {}
        self._forwarding: set[int] = set()

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
            await links.delete_link(await self.ipr(), name)
            return
        task = asyncio.create_task(self._delete_later(name))
        self._deleting[name] = task
        task.add_done_callback(lambda t: self._deleting.pop(name, None))

    async def _delete_later(self, name: str) -> None:
        try:
            await links.delete_link(await self.ipr(), name)
        except (NetlinkError, OSError, DataplaneError) as exc:
            # The periodic pass deletes it as an orphan if this did not.
            log.warning("background delete of %s failed: %s", name, exc)

    @kernel_errors
    async def has_link(self, name: str) -> bool:
        return await links.link_index(await self.ipr(), name) is not None

    @kernel_errors
    async def owned_links(self) -> dict[str, str]:
        # A dump of its own, parsed on a worker thread: thousands of links never stall the
        # event loop (dataplane/events.py has the measurements).
        snapshot = await events.owned_links_snapshot(None)
        return {name: link.alias for name, link in snapshot.items() if link.alias is not None}

    @kernel_errors
    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]:
        async with self._dump_lock:
            found = await links.local_prefixes(await self.ipr())
        return [(ipaddress.ip_network(p, strict=False), where) for p, where in found]

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

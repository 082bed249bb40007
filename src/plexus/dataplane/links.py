"""Idempotent netlink verbs over pyroute2 handles.

Every function takes the ``AsyncIPRoute`` of the namespace it acts in: namespaces are parameters.
``ensure_*`` creates or confirms; ``delete_*`` tolerates "not found".
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.errors import DataplaneError
from plexus.model.types import IPInterface

IFA_F_NODAD = 0x02
# Alias written on every link plexus creates: how a restarted agent tells its own links apart.
ALIAS_PREFIX = "plexus:"


async def link_index(ipr: AsyncIPRoute, name: str) -> int | None:
    found = await ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


async def get_link(ipr: AsyncIPRoute, index: int) -> Any:
    return (await ipr.link("get", index=index))[0]


async def ensure_bridge(ipr: AsyncIPRoute, name: str, mtu: int, alias: str) -> int:
    """The bridge ``name`` exists, is up, has ``mtu`` and carries ``alias``; returns its index."""
    index = await link_index(ipr, name)
    if index is None:
        try:
            await ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot create bridge {name}: {exc}") from exc
        index = await link_index(ipr, name)
        if index is None:
            raise DataplaneError(f"bridge {name} vanished right after it was created")
    await ipr.link("set", index=index, mtu=mtu, IFLA_IFALIAS=ALIAS_PREFIX + alias, state="up")
    return index


async def ensure_addresses(ipr: AsyncIPRoute, index: int, addrs: Iterable[IPInterface]) -> None:
    """Every address in ``addrs`` is on link ``index`` (others are left alone)."""
    for iface in addrs:
        # NODAD: the address is ours by construction (IPAM), and duplicate address detection
        # would keep an IPv6 address "tentative", unusable, for about a second.
        flags = IFA_F_NODAD if iface.version == 6 else 0
        try:
            await ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                flags=flags,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot add address {iface}: {exc}") from exc


async def owned_links(ipr: AsyncIPRoute) -> dict[str, str]:
    """Links in this namespace that plexus made: name → alias (without the prefix)."""
    owned: dict[str, str] = {}
    async for link in await ipr.link("dump"):
        alias = link.get("ifalias") or ""
        if alias.startswith(ALIAS_PREFIX):
            owned[link.get("ifname")] = alias[len(ALIAS_PREFIX) :]
    return owned


async def link_state(ipr: AsyncIPRoute, name: str) -> dict[str, Any] | None:
    """What a CHECK or an inspect wants to know of one link, or None if it is absent."""
    index = await link_index(ipr, name)
    if index is None:
        return None
    link = await get_link(ipr, index)
    addrs = [
        f"{a.get('address')}/{a['prefixlen']}"
        async for a in await ipr.addr("dump")
        if a["index"] == index
    ]
    return {
        "index": index,
        "mac": link.get("address"),
        "mtu": link.get("mtu"),
        "up": link.get("state") == "up",
        "master": link.get("master"),
        "addresses": addrs,
    }


async def local_prefixes(ipr: AsyncIPRoute) -> list[tuple[str, str]]:
    """(prefix, where) for every address and route of this namespace: what a new subnet must
    not overlap."""
    names = {link["index"]: link.get("ifname") async for link in await ipr.link("dump")}
    found: list[tuple[str, str]] = []
    async for a in await ipr.addr("dump"):
        found.append(
            (f"{a.get('address')}/{a['prefixlen']}", f"address on {names.get(a['index'])}")
        )
    for family in (2, 10):
        async for r in await ipr.route("dump", family=family):
            dst = r.get("dst")
            if dst is None or r["dst_len"] == 0 or r.get("table") not in (254, None):
                continue  # default routes overlap everything; only the main table matters
            found.append((f"{dst}/{r['dst_len']}", f"route via {names.get(r.get('oif'))}"))
    return found

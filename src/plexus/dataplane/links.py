"""Idempotent netlink verbs over pyroute2 handles.

Every function takes the ``AsyncIPRoute`` of the namespace it acts in: namespaces are parameters.
``ensure_*`` creates or confirms; ``delete_*`` tolerates "not found".
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.errors import AlreadyExists, DataplaneError
from plexus.model.types import IPAddress, IPInterface

IFA_F_NODAD = 0x02
# Alias written on every link plexus creates: how a restarted agent tells its own links apart.
ALIAS_PREFIX = "plexus:"


async def link_index(ipr: AsyncIPRoute, name: str) -> int | None:
    found = await ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


async def get_link_by_name(ipr: AsyncIPRoute, name: str) -> dict[str, Any] | None:
    """index and address of link ``name`` in one request (None if absent)."""
    try:
        msg = (await ipr.link("get", ifname=name))[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return {"index": msg["index"], "address": msg.get("address")}


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


async def ensure_default_routes(ipr: AsyncIPRoute, gateways: Iterable[IPAddress]) -> None:
    for gw in gateways:
        dst = "0.0.0.0/0" if gw.version == 4 else "::/0"
        try:
            await ipr.route("replace", dst=dst, gateway=str(gw))
        except NetlinkError as exc:
            raise DataplaneError(f"cannot add default route via {gw}: {exc}") from exc


async def set_up(ipr: AsyncIPRoute, name: str) -> None:
    index = await link_index(ipr, name)
    if index is not None:
        await ipr.link("set", index=index, state="up")


async def create_veth(
    host: AsyncIPRoute,
    host_ifname: str,
    netns_path: str | None,
    ifname: str,
    mtu: int,
    mac: str = "",
) -> None:
    """A veth pair whose peer is born inside the container's namespace as ``ifname``.

    Creating the peer directly in the target namespace (rather than creating both ends here and
    moving one) means no temporary name can collide with a host interface, and a container that
    already has ``ifname`` makes the whole call fail without leaving half a pair behind.
    """
    peer: dict[str, Any] = {"ifname": ifname, "mtu": mtu}
    if mac:
        peer["address"] = mac
    fd = -1 if netns_path is None else os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fd >= 0:
            peer["net_ns_fd"] = fd
        await host.link("add", ifname=host_ifname, kind="veth", mtu=mtu, peer=peer)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            raise AlreadyExists(
                f"interface {ifname} already exists in {netns_path} (or {host_ifname} on host)"
            ) from exc
        raise DataplaneError(f"cannot create veth {host_ifname}/{ifname}: {exc}") from exc
    finally:
        if fd >= 0:
            os.close(fd)


async def attach_to_bridge(
    host: AsyncIPRoute, host_ifname: str, bridge_index: int, alias: str
) -> None:
    index = await link_index(host, host_ifname)
    if index is None:
        raise DataplaneError(f"veth {host_ifname} vanished before it joined its bridge")
    await host.link(
        "set", index=index, master=bridge_index, state="up", IFLA_IFALIAS=ALIAS_PREFIX + alias
    )
    # Hairpin mode lets the bridge send a frame back out of the port it came in on. A container
    # connecting to its own published port needs it: its SYN enters through its port, is DNATed
    # back to itself, and must leave through the same port (Docker does the same when its
    # userland proxy is off).
    await host.brport("set", index=index, mode=1)  # IFLA_BRPORT_MODE: 1 = hairpin


async def delete_link(ipr: AsyncIPRoute, name: str) -> bool:
    """Delete link ``name``; False if it was not there."""
    index = await link_index(ipr, name)
    if index is None:
        return False
    try:
        await ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise DataplaneError(f"cannot delete link {name}: {exc}") from exc
    return True


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

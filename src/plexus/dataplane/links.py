"""Idempotent netlink verbs over pyroute2 handles.

Every function takes the ``AsyncIPRoute`` of the namespace it acts in: namespaces are parameters.
``ensure_*`` creates or confirms; ``delete_*`` tolerates "not found".
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from plexus.errors import DataplaneError
from plexus.model.types import IPInterface

IFA_F_NODAD = 0x02
# Alias written on every link plexus creates: how a restarted agent tells its own links apart.
ALIAS_PREFIX = "plexus:"
_KINDS = frozenset(("net", "ep"))


# --- ownership: which agent made a link ----------------------------------------------------
#
# A link's alias (IFLA_IFALIAS, at most 255 bytes) is ``plexus:OWNER:KIND:NAME``: OWNER is the
# agent's token (``NODE@STOREID8``, agent/identity.py), KIND:NAME says which object wants it
# (``net:NETWORK``, ``ep:CONTAINER/IFNAME``). Agents before owners wrote ``plexus:KIND:NAME``
# ("legacy"): such links count as any agent's and are re-tagged by the one that wants them.
# Network names, container ids and interface names hold no ":" (model/parse.py), so KIND:NAME
# has exactly one, and the owner is whatever lies before it: a node name may hold anything.


def tag(owner: str | None, alias: str) -> str:
    """The IFLA_IFALIAS that marks a link as ``owner``'s ``alias`` (``net:NAME`` /
    ``ep:CID/IF``); None: the legacy form, without an owner. The inverse of ``split``."""
    return f"{ALIAS_PREFIX}{owner}:{alias}" if owner else ALIAS_PREFIX + alias


def split(raw: str | None) -> tuple[str | None, str] | None:
    """(owner, alias) of a link's IFLA_IFALIAS (owner None: a legacy alias); None if it is
    not one plexus writes."""
    # Slices of ``raw`` rather than a regular expression: the kernel events' hot path (rtnl.py).
    if not raw or not raw.startswith(ALIAS_PREFIX):
        return None
    colon = raw.rfind(":")  # before NAME
    cut = raw.rfind(":", 0, colon)  # before KIND
    if raw[cut + 1 : colon] not in _KINDS or colon == len(raw) - 1:
        return None
    if cut == len(ALIAS_PREFIX) - 1:
        return None, raw[cut + 1 :]
    return (raw[len(ALIAS_PREFIX) : cut], raw[cut + 1 :]) if cut > len(ALIAS_PREFIX) else None


def untag(raw: str | None) -> str | None:
    """The alias (``net:NAME`` / ``ep:CID/IF``) of a plexus link, whoever owns it."""
    found = split(raw)
    return None if found is None else found[1]


def owned_by(found: str | None, owner: str) -> bool:
    """Whether a link tagged ``found`` (None: legacy) is ``owner``'s to change or delete."""
    return found is None or found == owner


def is_owned(raw: str | None, owner: str) -> bool:
    """Whether a link whose IFLA_IFALIAS is ``raw`` is a plexus link of ``owner`` (or legacy)."""
    found = split(raw)
    return found is not None and owned_by(found[0], owner)


def check_owner(name: str, found: str | None, owner: str) -> None:
    """Refuse to take over link ``name`` when its alias names another agent (``found``)."""
    if not owned_by(found, owner):
        raise DataplaneError(f"link {name} belongs to another plexus agent ({found}), not to "
                             f"this one ({owner}): refusing to take it over")


async def link_index(ipr: AsyncIPRoute, name: str) -> int | None:
    found = await ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


async def get_link(ipr: AsyncIPRoute, index: int) -> Any:
    return (await ipr.link("get", index=index))[0]


def bridge_mac(owner: str, name: str) -> str:
    """The MAC a bridge is made with: derived (the same after a re-creation) and locally
    administered unicast. Given explicitly, it stays: a bridge whose MAC the kernel chose
    takes its lowest port's instead (br_stp_recalculate_bridge_id) and changes when that port
    goes, so a container's removal would leave its neighbours' ARP entries for the gateway
    and for proxied addresses (overlays) pointing at a MAC nobody has; on kernel 6.18 the
    other containers of the host lost their traffic to other hosts for 15 s and more
    (tests/integration/test_overlay_blocks.py)."""
    digest = hashlib.sha256(f"plexus-bridge\0{owner}\0{name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in ((digest[0] & 0xFC) | 0x02, *digest[1:6]))


async def ensure_bridge(ipr: AsyncIPRoute, name: str, mtu: int, owner: str, alias: str) -> int:
    """The bridge ``name`` exists, is up, has ``mtu`` and carries ``alias`` tagged ``owner``;
    returns its index. DataplaneError if a bridge of that name is another agent's."""
    index = await link_index(ipr, name)
    if index is not None:
        found = split((await get_link(ipr, index)).get("ifalias"))
        check_owner(name, found[0] if found else None, owner)
    else:
        try:
            await ipr.link("add", ifname=name, kind="bridge", address=bridge_mac(owner, name))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise DataplaneError(f"cannot create bridge {name}: {exc}") from exc
        index = await link_index(ipr, name)
        if index is None:
            raise DataplaneError(f"bridge {name} vanished right after it was created")
    await ipr.link("set", index=index, mtu=mtu, IFLA_IFALIAS=tag(owner, alias), state="up")
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


async def delete_address(ipr: AsyncIPRoute, index: int, iface: IPInterface) -> None:
    """``iface`` is not on link ``index`` (already gone: fine)."""
    try:
        await ipr.addr("del", index=index, address=str(iface.ip),
                       prefixlen=iface.network.prefixlen)
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise DataplaneError(f"cannot delete address {iface}: {exc}") from exc


async def owned_links(ipr: AsyncIPRoute, owner: str) -> dict[str, str]:
    """Links in this namespace that ``owner`` made (or a legacy agent): name → alias, as the
    kernel holds it. (On the event loop: the agent uses ``events.owned_links_snapshot``.)"""
    owned: dict[str, str] = {}
    async for link in await ipr.link("dump"):
        raw = link.get("ifalias")
        if is_owned(raw, owner):
            owned[link.get("ifname")] = raw
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

"""Kernel events and link snapshots, against the real kernel, each test in a fresh netns.

The links are made with ``ip`` and the expected state is read with ``ip -j``, never through
plexus's own netlink code.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from plexus.dataplane import netns
from plexus.dataplane.events import (
    AddressChange,
    AddressEvent,
    KernelEvent,
    KernelEvents,
    LinkChange,
    LinkEvent,
    Resync,
    ResyncReason,
    links_snapshot,
    owned_links_snapshot,
)


@dataclass(frozen=True)
class Netns:
    name: str
    path: str

    def ip(self, *argv: str) -> str:
        return subprocess.run(
            ["ip", "-n", self.name, *argv], check=True, capture_output=True, text=True, timeout=30
        ).stdout

    def ip_batch(self, lines: list[str]) -> None:
        subprocess.run(
            ["ip", "-n", self.name, "-batch", "-"],
            input="\n".join(lines) + "\n",
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def links(self) -> dict[str, dict[str, Any]]:
        """``ip -j -d link``, by name: the independent view (``ifalias`` included)."""
        return {link["ifname"]: link for link in json.loads(self.ip("-j", "-d", "link"))}


@pytest.fixture
def ns() -> Iterator[Netns]:
    name = f"ev-{uuid.uuid4().hex[:8]}"
    path = netns.create_named(name)
    try:
        yield Netns(name, path)
    finally:
        netns.delete_named(name)


async def until(
    events: KernelEvents, match: Callable[[KernelEvent], bool], timeout: float = 5.0
) -> list[KernelEvent]:
    """Every event up to and including the first that ``match``es; fails naming what came."""
    seen: list[KernelEvent] = []
    try:
        async with asyncio.timeout(timeout):
            while not seen or not match(seen[-1]):
                seen.append(await events.get())
    except TimeoutError:
        pytest.fail(f"no matching event within {timeout}s; got {seen}")
    return seen


async def expect(
    events: KernelEvents, match: Callable[[KernelEvent], bool], timeout: float = 5.0
) -> KernelEvent:
    """The first event that ``match``es."""
    return (await until(events, match, timeout))[-1]


def link_event(
    change: LinkChange | None, ifname: str, **fields: object
) -> Callable[[KernelEvent], bool]:
    """Matches a LinkEvent of ``change`` (None: any) for ``ifname`` whose link has ``fields``."""

    def match(e: KernelEvent) -> bool:
        return (
            isinstance(e, LinkEvent)
            and change in (None, e.change)
            and e.link.ifname == ifname
            and all(getattr(e.link, k) == v for k, v in fields.items())
        )

    return match


def address_event(address: str) -> Callable[[KernelEvent], bool]:
    return lambda e: isinstance(e, AddressEvent) and str(e.address) == address


async def quiet(events: KernelEvents, seconds: float = 0.3) -> list[KernelEvent]:
    """Everything that arrives within ``seconds``."""
    await asyncio.sleep(seconds)
    found = []
    while len(events.backlog):
        found.append(await events.get())
    return found


async def started(events: KernelEvents) -> None:
    assert await events.get() == Resync(ResyncReason.START)


async def test_veth_with_plexus_alias_added_changed_deleted(ns: Netns) -> None:
    async with KernelEvents(ns.path) as events:
        await started(events)
        ns.ip("link", "add", "pxvtest", "type", "veth", "peer", "name", "pxctest")
        added = await expect(events, link_event(LinkChange.ADDED, "pxvtest"))
        index = ns.links()["pxvtest"]["ifindex"]
        assert isinstance(added, LinkEvent)
        assert added.link.index == index
        assert added.link.alias is None  # plexus names its veths first, then sets the alias

        ns.ip("link", "set", "pxvtest", "alias", "plexus:ep:c1/eth0", "up")
        up = await expect(events, link_event(LinkChange.CHANGED, "pxvtest", admin_up=True))
        assert isinstance(up, LinkEvent)
        assert up.link.alias == "ep:c1/eth0"

        ns.ip("link", "set", "pxvtest", "down")
        down = await expect(events, link_event(LinkChange.CHANGED, "pxvtest", admin_up=False))
        assert isinstance(down, LinkEvent)
        assert (down.link.alias, down.link.oper_up) == ("ep:c1/eth0", False)

        ns.ip("link", "del", "pxvtest")
        gone = await expect(events, link_event(LinkChange.DELETED, "pxvtest"))
        assert isinstance(gone, LinkEvent)
        assert (gone.link.index, gone.link.alias) == (index, "ep:c1/eth0")
        peer = await expect(events, link_event(LinkChange.DELETED, "pxctest"))
        assert isinstance(peer, LinkEvent)
        assert peer.link.alias is None


async def test_links_without_plexus_alias_report_none(ns: Netns) -> None:
    async with KernelEvents(ns.path) as events:
        await started(events)
        ns.ip("link", "add", "other0", "type", "bridge")
        # (the kernel announces an alias change only on a link that is up)
        ns.ip("link", "set", "other0", "alias", "not-plexus:net:x", "up")
        changed = await expect(events, link_event(LinkChange.CHANGED, "other0"))
        assert ns.links()["other0"]["ifalias"] == "not-plexus:net:x"
        assert isinstance(changed, LinkEvent)
        assert changed.link.alias is None


async def test_enslaving_and_releasing_a_port_is_a_change_not_a_deletion(ns: Netns) -> None:
    ns.ip_batch(["link add br0 type bridge", "link set br0 alias plexus:net:n1 up",
                 "link add pxvport type veth peer name pxcport"])
    bridge = ns.links()["br0"]["ifindex"]
    async with KernelEvents(ns.path) as events:
        await started(events)
        ns.ip("link", "set", "pxvport", "master", "br0", "up")
        await expect(events, link_event(None, "pxvport", master=bridge))
        # The bridge reports the port leaving with an AF_BRIDGE RTM_DELLINK for pxvport.
        ns.ip("link", "set", "pxvport", "nomaster")
        seen = await until(events, link_event(None, "pxvport", master=None))
        seen += await quiet(events)
        assert "master" not in ns.links()["pxvport"]
        deleted = [e for e in seen if isinstance(e, LinkEvent) and e.change is LinkChange.DELETED]
        assert deleted == []


async def test_address_added_and_deleted_on_a_bridge(ns: Netns) -> None:
    async with KernelEvents(ns.path) as events:
        await started(events)
        ns.ip_batch(["link add br0 type bridge", "link set br0 alias plexus:net:n1 up"])
        bridge = ns.links()["br0"]["ifindex"]
        for addr in ("10.1.0.1/24", "fd00:1::1/64"):
            ns.ip("addr", "add", addr, "dev", "br0", "nodad")
            added = await expect(events, address_event(addr))
            assert isinstance(added, AddressEvent)
            assert (added.change, added.index, added.ifname) == (AddressChange.ADDED, bridge, "br0")
        shown = json.loads(ns.ip("-j", "addr", "show", "dev", "br0"))[0]["addr_info"]
        assert {"10.1.0.1", "fd00:1::1"} <= {a["local"] for a in shown}

        ns.ip("addr", "del", "fd00:1::1/64", "dev", "br0")
        gone = await expect(events, address_event("fd00:1::1/64"))
        assert isinstance(gone, AddressEvent)
        assert (gone.change, gone.index) == (AddressChange.DELETED, bridge)


async def test_consumer_falling_behind_gets_one_resync(ns: Netns) -> None:
    async with KernelEvents(ns.path, maxsize=4) as events:
        ns.ip_batch([f"link add dummy{i} type bridge" for i in range(10)])
        backlog = await quiet(events)
        assert len(backlog) <= 4
        assert backlog[0] == Resync(ResyncReason.OVERFLOW)
        assert events.backlog.dropped >= 6
        # and the stream goes on after it
        ns.ip("link", "add", "later0", "type", "bridge")
        await expect(events, link_event(LinkChange.ADDED, "later0"))


async def test_kernel_buffer_overrun_becomes_resync(ns: Netns) -> None:
    async with KernelEvents(ns.path, rcvbuf=4096) as events:
        await started(events)
        # The loop is blocked while ip runs: nobody reads, and ~2 messages fit in the buffer.
        ns.ip_batch([f"link add dummy{i} type bridge" for i in range(100)])
        await expect(events, lambda e: e == Resync(ResyncReason.ENOBUFS))
        ns.ip("link", "add", "later0", "type", "bridge")
        await expect(events, link_event(LinkChange.ADDED, "later0"))


async def test_close_ends_the_stream_and_releases_the_socket(ns: Netns) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    events = KernelEvents(ns.path)
    await events.start()
    consumed: list[KernelEvent] = []

    async def consume() -> None:
        async for event in events:
            consumed.append(event)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    events.close()
    await asyncio.wait_for(task, 2)
    assert consumed == [Resync(ResyncReason.START)]
    assert len(os.listdir("/proc/self/fd")) == fds


ME = "host1@0a1b2c3d"  # the owner the snapshots are taken for


def owned_by_ip(ns: Netns) -> dict[str, dict[str, Any]]:
    """Links whose alias is this agent's (``plexus:ME:``) or legacy (``plexus:net:``...)."""
    mine = (f"plexus:{ME}:", "plexus:net:", "plexus:ep:")
    return {n: link for n, link in ns.links().items() if link.get("ifalias", "").startswith(mine)}


async def test_snapshot_lists_exactly_the_links_this_agent_owns(ns: Netns) -> None:
    ns.ip_batch([
        "link add br0 type bridge",
        f"link set br0 alias plexus:{ME}:net:n1 up",
        "link add pxv1 type veth peer name pxc1",
        f"link set pxv1 alias plexus:{ME}:ep:c1/eth0 master br0",
        "link add pxv2 type veth peer name pxc2",
        "link set pxv2 alias plexus:ep:c2/eth0 up",  # legacy: an agent before owners
        "link add theirs0 type bridge",  # another agent's (another datastore, another node)
        "link set theirs0 alias plexus:host1@ffffffff:net:n1",
        "link add theirs1 type bridge",
        "link set theirs1 alias plexus:host2@0a1b2c3d:net:n1",
        "link add foreign0 type bridge",
        "link set foreign0 alias someone:else",
        "link add plain0 type bridge",
    ])
    expected = owned_by_ip(ns)
    snapshot = await owned_links_snapshot(ns.path, owner=ME)
    assert set(snapshot) == set(expected) == {"br0", "pxv1", "pxv2"}
    index = {name: link["ifindex"] for name, link in ns.links().items()}
    aliases = {"br0": (ME, "net:n1"), "pxv1": (ME, "ep:c1/eth0"), "pxv2": (None, "ep:c2/eth0")}
    for name, link in expected.items():
        got = snapshot[name]
        assert (got.owner, got.alias) == aliases[name]
        assert got.index == link["ifindex"]
        assert got.master == (index[link["master"]] if "master" in link else None)
        assert got.admin_up == ("UP" in link["flags"])


async def test_concurrent_snapshots_each_use_their_own_socket(ns: Netns) -> None:
    ns.ip_batch([f"link add pxv{i} type bridge\nlink set pxv{i} alias plexus:ep:c{i}/eth0"
                 for i in range(50)])
    first, second, everything = await asyncio.gather(
        owned_links_snapshot(ns.path, owner=ME), owned_links_snapshot(ns.path, owner=ME),
        links_snapshot(ns.path)
    )
    assert set(first) == set(second) == set(owned_by_ip(ns))
    assert len(first) == 50
    assert {link.ifname for link in everything} == set(ns.links())


async def test_the_agents_own_namespace_by_default() -> None:
    def ip(*argv: str) -> str:
        return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    try:
        async with KernelEvents() as events:
            await started(events)
            ip("link", "add", "pxown0", "type", "bridge")
            ip("link", "set", "pxown0", "alias", "plexus:net:own", "up")
            await expect(events, link_event(LinkChange.CHANGED, "pxown0", alias="net:own"))
        owned = {link["ifname"] for link in json.loads(ip("-j", "-d", "link"))
                 if link.get("ifalias", "").startswith("plexus:")}
        assert set(await owned_links_snapshot(owner=ME)) == owned
        assert "pxown0" in owned
    finally:
        subprocess.run(["ip", "link", "del", "pxown0"], capture_output=True, timeout=30)

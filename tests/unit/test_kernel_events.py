"""Kernel events without a kernel: rtnetlink datagrams built by hand (layouts from
linux/netlink.h, linux/rtnetlink.h, linux/if_link.h and linux/if_addr.h) go through the decoder,
the bounded backlog and, over a socketpair, the reader itself."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest

from plexus.dataplane import events as ev
from plexus.dataplane import rtnl
from plexus.dataplane.events import (
    AddressChange,
    AddressEvent,
    Backlog,
    KernelEvents,
    LinkChange,
    LinkEvent,
    Resync,
    ResyncReason,
)
from plexus.dataplane.rtnl import LinkInfo, OperState
from plexus.errors import DataplaneError, InvalidArgument

NLA_F_NESTED = 0x8000


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def message(kind: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def link_msg(
    kind: int = rtnl.RTM_NEWLINK,
    *,
    index: int = 7,
    name: str = "pxv1",
    alias: str | None = None,
    master: int | None = None,
    up: bool = True,
    oper: int = 6,
    change: int = 0,
    family: int = socket.AF_UNSPEC,
    seq: int = 0,
    flags: int = 0,
) -> bytes:
    body = struct.pack("=BxHiII", family, 1, index, 0x1002 | (rtnl.IFF_UP if up else 0), change)
    body += attr(rtnl.IFLA_IFNAME, name.encode() + b"\0")
    body += attr(rtnl.IFLA_OPERSTATE, bytes([oper]))
    body += attr(4, struct.pack("=I", 1500))  # IFLA_MTU: an attribute nobody asked for
    body += attr(18 | NLA_F_NESTED, attr(1, b"veth\0"))  # IFLA_LINKINFO, nested
    if master is not None:
        body += attr(rtnl.IFLA_MASTER, struct.pack("=I", master))
    if alias is not None:
        body += attr(rtnl.IFLA_IFALIAS, alias.encode() + b"\0")
    return message(kind, body, flags, seq)


def addr_msg(kind: int, family: int, addr: str, prefixlen: int, index: int = 7,
             label: str | None = None, peer: str | None = None) -> bytes:
    body = struct.pack("=BBBBi", family, prefixlen, 0, 0, index)
    packed = ipaddress.ip_address(addr).packed
    if peer is not None:  # point-to-point: IFA_ADDRESS is the peer, IFA_LOCAL our own
        body += attr(rtnl.IFA_ADDRESS, ipaddress.ip_address(peer).packed)
        body += attr(rtnl.IFA_LOCAL, packed)
    else:
        body += attr(rtnl.IFA_ADDRESS, packed)
    if label is not None:
        body += attr(rtnl.IFA_LABEL, label.encode() + b"\0")
    return message(kind, body)


def decode(raw: bytes, names: dict[int, str] | None = None) -> list[ev.KernelEvent | None]:
    names = {} if names is None else names
    return [ev.decode(kind, payload, names) for kind, _, _, payload in rtnl.messages(
        memoryview(raw))]


def test_a_plexus_link_is_decoded_with_its_alias_unprefixed() -> None:
    [event] = decode(link_msg(alias="plexus:ep:c1/eth0", master=3, oper=2, up=False))
    assert event == LinkEvent(LinkChange.CHANGED, LinkInfo(
        index=7, ifname="pxv1", alias="ep:c1/eth0", master=3, admin_up=False,
        oper_state=OperState.DOWN))


@pytest.mark.parametrize("owner", ["h1@0a1b2c3d", "odd:name@0a1b2c3d"])
def test_a_tagged_link_is_decoded_with_its_owner(owner: str) -> None:
    [event] = decode(link_msg(alias=f"plexus:{owner}:net:n1"))
    assert isinstance(event, LinkEvent)
    assert (event.link.owner, event.link.alias) == (owner, "net:n1")


def test_a_legacy_link_has_no_owner() -> None:
    [event] = decode(link_msg(alias="plexus:net:n1"))
    assert isinstance(event, LinkEvent)
    assert (event.link.owner, event.link.alias) == (None, "net:n1")


@pytest.mark.parametrize("alias", [None, "", "someone:else", "PLEXUS:net:x", "plexus:junk",
                                   "plexus:h@1:bogus:x"])
def test_links_without_a_plexus_alias_have_none(alias: str | None) -> None:
    [event] = decode(link_msg(alias=alias))
    assert isinstance(event, LinkEvent)
    assert event.link.alias is None


def test_new_deleted_and_changed_links() -> None:
    names: dict[int, str] = {}
    raw = (link_msg(change=0xFFFFFFFF) + link_msg(change=1) + link_msg(rtnl.RTM_DELLINK,
                                                                       change=0xFFFFFFFF))
    kinds = [e.change for e in decode(raw, names) if isinstance(e, LinkEvent)]
    assert kinds == [LinkChange.ADDED, LinkChange.CHANGED, LinkChange.DELETED]
    assert names == {}  # learned from NEWLINK, forgotten on DELLINK


def test_bridge_port_messages_are_not_link_events() -> None:
    # A port leaving its bridge: RTM_DELLINK with family AF_BRIDGE, for a link that still exists.
    assert decode(link_msg(rtnl.RTM_DELLINK, family=socket.AF_BRIDGE, master=3)) == [None]


def test_unknown_operstate_and_master_zero() -> None:
    [event] = decode(link_msg(oper=42, master=0))
    assert isinstance(event, LinkEvent)
    assert (event.link.oper_state, event.link.master, event.link.oper_up) == (
        OperState.UNKNOWN, None, False)


def test_ipv4_address_takes_its_label_and_local_address() -> None:
    raw = addr_msg(rtnl.RTM_NEWADDR, socket.AF_INET, "10.1.0.1", 24, label="br0", peer="10.1.0.9")
    assert decode(raw) == [AddressEvent(AddressChange.ADDED, 7, "br0",
                                        ipaddress.ip_interface("10.1.0.1/24"))]


def test_ipv6_address_takes_the_name_learned_from_link_events() -> None:
    raw = link_msg(name="br0") + addr_msg(rtnl.RTM_DELADDR, socket.AF_INET6, "fd00::1", 64)
    assert decode(raw)[1] == AddressEvent(AddressChange.DELETED, 7, "br0",
                                          ipaddress.ip_interface("fd00::1/64"))
    assert decode(addr_msg(rtnl.RTM_DELADDR, socket.AF_INET6, "fd00::1", 64))[0] == AddressEvent(
        AddressChange.DELETED, 7, None, ipaddress.ip_interface("fd00::1/64"))


def test_other_messages_and_truncated_datagrams_are_skipped() -> None:
    route = message(24, b"\0" * 12)  # RTM_NEWROUTE
    whole = link_msg(name="a")
    assert [e is None for e in decode(route + whole)] == [True, False]
    assert decode(whole + link_msg(name="b")[:30]) == decode(whole)
    assert decode(struct.pack("=IHHII", 8, 16, 0, 0, 0)) == []  # a length below the header


def test_short_payloads_are_skipped_not_raised() -> None:
    short_link = message(rtnl.RTM_NEWLINK, b"\0" * 8)
    short_addr = message(rtnl.RTM_NEWADDR, b"\0" * 4)
    short_master = message(rtnl.RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 3, 0, 0)
                           + attr(rtnl.IFLA_MASTER, b"\1"))
    events = decode(short_link + short_addr + short_master)
    assert events[:2] == [None, None]
    assert isinstance(events[2], LinkEvent)
    assert events[2].link.master is None


def test_dump_chunks_collect_links_until_done() -> None:
    found: list[LinkInfo] = []
    chunk = link_msg(seq=5, name="a") + link_msg(seq=4, name="stale") + link_msg(
        seq=5, name="b", family=socket.AF_BRIDGE)
    assert rtnl.dump_chunk(memoryview(chunk), 5, found) == (False, False)
    last = link_msg(seq=5, name="c", flags=rtnl.NLM_F_DUMP_INTR) + message(
        rtnl.NLMSG_DONE, struct.pack("=i", 0), seq=5)
    assert rtnl.dump_chunk(memoryview(last), 5, found) == (True, True)
    assert [link.ifname for link in found] == ["a", "c"]


def test_a_failed_dump_raises() -> None:
    error = message(rtnl.NLMSG_ERROR, struct.pack("=i", -16) + b"\0" * 16, seq=1)
    with pytest.raises(DataplaneError, match="EBUSY"):
        rtnl.dump_chunk(memoryview(error), 1, [])


def test_the_dump_request_asks_for_every_link_and_nothing_else() -> None:
    raw = rtnl.dump_request(9)
    [(kind, flags, seq, payload)] = list(rtnl.messages(memoryview(raw)))
    assert (kind, flags, seq) == (rtnl.RTM_GETLINK, rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP, 9)
    assert bytes(payload) == bytes(16)  # ifinfomsg, AF_UNSPEC, no filter attributes


def changed(index: int) -> LinkEvent:
    return LinkEvent(LinkChange.CHANGED, LinkInfo(index, f"l{index}", None, None, True,
                                                  OperState.UP))


async def test_a_full_backlog_becomes_one_resync() -> None:
    backlog = Backlog(3)
    for i in range(3):
        backlog.push(changed(i))
    backlog.push(changed(3))  # one too many: all four are dropped
    backlog.push(changed(4))
    assert [backlog.pop() for _ in range(3)] == [Resync(ResyncReason.OVERFLOW), changed(4), None]
    assert backlog.dropped == 4


def test_backlog_bound_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="maxsize"):
        Backlog(0)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield a, b
    a.close()
    b.close()


async def test_reader_delivers_datagrams_as_typed_events(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    kernel, ours = pair
    async with KernelEvents(sock=ours) as events:
        kernel.send(link_msg(alias="plexus:net:n1", change=0xFFFFFFFF))
        kernel.send(addr_msg(rtnl.RTM_NEWADDR, socket.AF_INET, "10.1.0.1", 24, label="pxv1"))
        got = [await asyncio.wait_for(events.get(), 2) for _ in range(3)]
    assert got[0] == Resync(ResyncReason.START)
    assert isinstance(got[1], LinkEvent)
    assert (got[1].change, got[1].link.alias) == (LinkChange.ADDED, "net:n1")
    assert isinstance(got[2], AddressEvent)
    assert ours.fileno() == -1  # closed with the stream


async def test_close_ends_iteration_and_get_raises(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _, ours = pair
    events = KernelEvents(sock=ours)
    await events.start()
    seen = []

    async def consume() -> None:
        async for event in events:
            seen.append(event)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    events.close()
    await asyncio.wait_for(task, 2)
    assert seen == [Resync(ResyncReason.START)]
    with pytest.raises(DataplaneError, match="closed"):
        await events.get()
    with pytest.raises(DataplaneError, match="twice"):
        await events.start()


async def test_draining_a_long_backlog_lets_other_tasks_run(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    _, ours = pair
    drained: list[ev.KernelEvent] = []
    when_other_ran: list[int] = []

    async def other() -> None:
        when_other_ran.append(len(drained))

    async with KernelEvents(sock=ours) as events:
        for i in range(300):
            events.backlog.push(changed(i))
        task = asyncio.create_task(other())
        while len(drained) < 301:
            drained.append(await events.get())
        await task
    assert 0 < when_other_ran[0] < 301


class OverrunSocket:
    """A socket whose first read reports ENOBUFS, as the kernel's does after dropping; records
    what the reader had handed out at each later read."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.overrun = True
        self.resync_before_read: list[bool] = []
        self.backlog = Backlog(1)

    def recv_into(self, buf: bytearray) -> int:
        if self.overrun:
            self.overrun = False
            raise OSError(ev.errno.ENOBUFS, "No buffer space available")
        pending = list(self.backlog._items)
        self.resync_before_read.append(Resync(ResyncReason.ENOBUFS) in pending)
        return self.real.recv_into(buf)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


async def test_overrun_resync_waits_until_the_queue_is_drained(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # The kernel drops silently until the queue is read empty: a Resync handed out earlier would
    # let the consumer relist while a change could still vanish unannounced.
    kernel, ours = pair
    fake = OverrunSocket(ours)
    async with KernelEvents(sock=fake) as events:  # type: ignore[arg-type]
        fake.backlog = events.backlog
        assert await events.get() == Resync(ResyncReason.START)
        kernel.send(link_msg(alias="plexus:net:n1", change=0xFFFFFFFF))
        handed_out = [await asyncio.wait_for(events.get(), 2)]
        kernel.send(link_msg(alias="plexus:net:n2", change=0))
        after = await asyncio.wait_for(events.get(), 2)
    assert handed_out == [Resync(ResyncReason.ENOBUFS)]
    assert fake.resync_before_read[:2] == [False, False]  # the kept datagram, then EAGAIN
    assert isinstance(after, LinkEvent) and after.link.alias == "net:n2"

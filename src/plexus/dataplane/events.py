"""Kernel events and link snapshots for the reconcilers, without stalling the event loop.
(The wire format they read is in ``rtnl.py``.)

``KernelEvents`` subscribes to rtnetlink's link and address groups in one network namespace and
hands a single consumer typed events: ``LinkEvent``, ``AddressEvent`` and ``Resync``. A Resync
means "events were lost, do a full pass": the stream opens with one (the subscription is live, so
a pass made now misses nothing), and one replaces the backlog when the consumer falls behind or
the kernel overruns the socket. ``owned_links_snapshot`` is the full pass's view of the links.

Design notes (checked on kernel 6.18, pyroute2 0.9.7):

- Not pyroute2 for this. Its async socket queues every datagram in an unbounded asyncio.Queue,
  and an ENOBUFS reaching the transport's ``error_received`` is stored as the socket's fatal error
  (every later use re-raises it). Its full decode of a link message costs ~250 us; a burst of
  1,000 veth deletions is ~9,000 messages. Here a ~100-line reader decodes only the header and
  the four attributes a reconciler uses (~11 us a link message) and lets the rest go.
- Reading: ``add_reader`` on a non-blocking socket; each wake-up reads datagrams for at most
  ``_READ_BUDGET`` seconds and returns, so a burst is consumed in slices between other callbacks.
  The kernel sends one notification per datagram; a full socket buffer drops them and reports
  ENOBUFS once (then delivers what it kept), which becomes Resync(ENOBUFS). The socket stays
  congested, silently dropping, until its queue is read empty; the Resync is handed out only
  then, so a consumer never relists while changes can still be lost unannounced.
- Bridge ports: enslaving, releasing and carrier changes of a port also send RTM_NEWLINK and
  RTM_DELLINK with family AF_BRIDGE for the *port*. A DELLINK of that family means "left the
  bridge", not "deleted": only AF_UNSPEC link messages are links.
- ADDED vs CHANGED: the kernel marks a newly registered (or moved-in) link with ifi_change = ~0.
  plexus sets a veth's alias after creating it, so an owned link usually first shows its alias
  in a CHANGED event. An alias set on a link that is down is not announced at all (the kernel
  notifies such changes only for links that are up); plexus sets alias and up in one request.
- Snapshots: a dump on a socket of its own (a netlink socket serves one dump at a time; sharing
  the agent's would fail with EBUSY), received and parsed on a worker thread. The thread gives
  up the GIL in every recv() (a datagram: ~20 links, ~0.3 ms of parsing) and the loop gets it
  back within the 5 ms switch interval at worst; the kernel fills the datagrams outside the GIL.
  Parsing on the loop one datagram per turn did not stall less (median worst gap over 15 runs
  at 10,000 links: 11 ms on the loop, 10 ms threaded, on a shared 2-CPU VM) and cost the loop
  thread ~40x the CPU time (bench/loop_stall.py compares both).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from plexus.dataplane import netns as nsmod
from plexus.dataplane.links import owned_by
from plexus.dataplane.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
    SO_RCVBUFFORCE,
    LinkInfo,
    dump_chunk,
    dump_request,
    messages,
    parse_address,
    parse_link,
)
from plexus.errors import DataplaneError, InvalidArgument
from plexus.model.types import IPInterface

log = logging.getLogger("plexus.dataplane.events")


_READ_BUDGET = 0.001  # seconds of reading per wake-up of the event reader
_YIELD_EVERY = 64  # events get() hands out before it lets the loop run other tasks
_DUMP_TRIES = 3
_DUMP_TIMEOUT = 30.0  # seconds without a datagram before a dump is given up
_RECV_SIZE = 65536  # the kernel caps a netlink datagram at 32 KiB


class LinkChange(enum.Enum):
    ADDED = "added"
    CHANGED = "changed"
    DELETED = "deleted"


class AddressChange(enum.Enum):
    ADDED = "added"
    DELETED = "deleted"


class ResyncReason(enum.Enum):
    START = "start"  # the subscription is live: a full pass now misses nothing
    OVERFLOW = "overflow"  # the consumer fell behind; the backlog was dropped
    ENOBUFS = "enobufs"  # the kernel overran the socket's receive buffer


@dataclass(frozen=True, slots=True)
class LinkEvent:
    change: LinkChange
    link: LinkInfo


@dataclass(frozen=True, slots=True)
class AddressEvent:
    change: AddressChange
    index: int
    ifname: str | None  # IPv4 carries its label; IPv6 only what link events taught us
    address: IPInterface


@dataclass(frozen=True, slots=True)
class Resync:
    reason: ResyncReason


KernelEvent = LinkEvent | AddressEvent | Resync


def decode(kind: int, payload: memoryview, names: dict[int, str]) -> KernelEvent | None:
    """The typed event for one notification (None: not one of ours). ``names`` (index → ifname)
    is updated from link events and fills in the ifname of IPv6 address events."""
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        parsed = parse_link(payload)
        if parsed is None:
            return None
        link, new = parsed
        if kind == RTM_DELLINK:
            names.pop(link.index, None)
            return LinkEvent(LinkChange.DELETED, link)
        names[link.index] = link.ifname
        return LinkEvent(LinkChange.ADDED if new else LinkChange.CHANGED, link)
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        found = parse_address(payload)
        if found is None:
            return None
        index, label, addr = found
        change = AddressChange.ADDED if kind == RTM_NEWADDR else AddressChange.DELETED
        return AddressEvent(change, index, label or names.get(index), addr)
    return None


# --- events ----------------------------------------------------------------------------------


class Backlog:
    """A bounded FIFO for one consumer. Full means the consumer fell behind: everything queued
    is dropped and replaced by one Resync, which stands for all of it."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise InvalidArgument("maxsize", maxsize, "must be at least 1")
        self.maxsize = maxsize
        self.dropped = 0  # events thrown away since the start
        self._items: deque[KernelEvent] = deque()
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, event: KernelEvent) -> None:
        if len(self._items) >= self.maxsize:
            self.dropped += 1
            self.resync(ResyncReason.OVERFLOW)
            return
        self._items.append(event)
        self._ready.set()

    def resync(self, reason: ResyncReason) -> None:
        self.dropped += sum(not isinstance(e, Resync) for e in self._items)
        self._items.clear()
        self._items.append(Resync(reason))
        self._ready.set()

    def pop(self) -> KernelEvent | None:
        return self._items.popleft() if self._items else None

    async def wait(self) -> None:
        self._ready.clear()
        if not self._items:
            await self._ready.wait()

    def wake(self) -> None:
        self._ready.set()


class KernelEvents:
    """Link and address notifications of one network namespace (None: the agent's own).

        async with KernelEvents(netns) as events:
            async for event in events:  # LinkEvent | AddressEvent | Resync
                ...

    One consumer. ``maxsize`` bounds the backlog; ``rcvbuf`` asks the kernel for that much
    socket buffer (SO_RCVBUFFORCE, as root; otherwise capped by net.core.rmem_max). ``sock``:
    an already bound socket that delivers rtnetlink datagrams (tests feed it by hand).
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        maxsize: int = 4096,
        rcvbuf: int = 4 << 20,
        sock: socket.socket | None = None,
    ) -> None:
        self.netns = netns
        self.rcvbuf = rcvbuf
        self._where = netns or "the agent's namespace"
        self.backlog = Backlog(maxsize)
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray(_RECV_SIZE)
        self._names: dict[int, str] = {}
        self._closed = False
        self._failure: str | None = None
        self._overrun = False  # ENOBUFS seen, Resync due once the queue is drained
        self._streak = 0  # events handed out since the consumer last had to wait

    async def __aenter__(self) -> KernelEvents:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def start(self) -> None:
        """Subscribe; the first event is Resync(START)."""
        if self._loop is not None or self._closed:
            raise DataplaneError("kernel events: start() called twice")
        self._loop = loop = asyncio.get_running_loop()
        if self._sock is None:
            # Off the loop: entering a netns costs a thread start and a join (~0.3 ms).
            self._sock = await asyncio.to_thread(self._subscribe)
            if self._closed:  # closed while we waited
                self._sock.close()
                return
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._on_readable)
        self.backlog.resync(ResyncReason.START)

    def _subscribe(self) -> socket.socket:
        sock = nsmod.netlink_socket(self.netns)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError as exc:
            sock.close()
            msg = f"cannot subscribe to kernel events in {self._where}: {exc}"
            raise DataplaneError(msg) from exc
        return sock

    def close(self) -> None:
        """Unsubscribe; a waiting consumer sees the stream end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self.backlog.wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def _on_readable(self) -> None:
        if self._closed:  # a call_soon below can outlive the stream
            return
        assert self._sock is not None
        deadline = time.perf_counter() + _READ_BUDGET
        view = memoryview(self._buf)
        while time.perf_counter() < deadline:
            try:
                size = self._sock.recv_into(self._buf)
            except BlockingIOError:
                if self._overrun:
                    # Only now, with the queue read empty, does the kernel clear the socket's
                    # congestion and deliver again: a relist made earlier could miss a change
                    # dropped in between, with no second ENOBUFS to say so.
                    self._overrun = False
                    self.backlog.resync(ResyncReason.ENOBUFS)
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("kernel events in %s: receive buffer overrun", self._where)
                    self._overrun = True
                    continue
                self._failure = f"kernel events in {self._where}: {exc}"
                log.error("%s", self._failure)
                self.close()
                return
            for kind, _, _, payload in messages(view[:size]):
                event = decode(kind, payload, self._names)  # names learnt even when dropped
                # Before the Resync that is due, events would only be replaced by it.
                if event is not None and not self._overrun:
                    self.backlog.push(event)
        if self._overrun and self._loop is not None:
            # Out of budget with the Resync still due: an empty socket never wakes the reader
            # again, so come back for the read that finds it empty.
            self._loop.call_soon(self._on_readable)

    async def get(self) -> KernelEvent:
        """The next event; DataplaneError once the stream has ended (closed, or the socket
        failed) and the backlog is empty."""
        if self._streak >= _YIELD_EVERY:
            # A waiting event is returned without suspending, so a consumer draining a long
            # backlog would otherwise keep the loop for all of it.
            self._streak = 0
            await asyncio.sleep(0)
        while (event := self.backlog.pop()) is None:
            if self._closed:
                raise DataplaneError(self._failure or "kernel events: closed")
            self._streak = 0
            await self.backlog.wait()
        self._streak += 1
        return event

    def __aiter__(self) -> KernelEvents:
        return self

    async def __anext__(self) -> KernelEvent:
        try:
            return await self.get()
        except DataplaneError:
            if self._failure is None:
                raise StopAsyncIteration from None
            raise


# --- snapshots -------------------------------------------------------------------------------


def _dump(netns: str | None) -> list[LinkInfo]:
    """Blocking: every link of the namespace. A dump that links changed under (NLM_F_DUMP_INTR)
    is retried; after _DUMP_TRIES the last one is returned (the next pass looks again)."""
    sock = nsmod.netlink_socket(netns)
    with contextlib.closing(sock):
        sock.settimeout(_DUMP_TIMEOUT)
        buf = bytearray(_RECV_SIZE)
        view = memoryview(buf)
        for seq in range(1, _DUMP_TRIES + 1):
            found: list[LinkInfo] = []
            done = interrupted = False
            sock.send(dump_request(seq))
            while not done:
                size = sock.recv_into(buf)
                done, intr = dump_chunk(view[:size], seq, found)
                interrupted |= intr
            if not interrupted:
                break
            log.info("link dump interrupted by a change (try %d of %d)", seq, _DUMP_TRIES)
    return found


async def links_snapshot(netns: str | None = None) -> list[LinkInfo]:
    """Every link of the namespace (None: the agent's), dumped on a worker thread over a socket
    of its own."""
    try:
        return await asyncio.to_thread(_dump, netns)
    except OSError as exc:
        where = netns or "the agent's namespace"
        raise DataplaneError(f"link snapshot of {where}: {exc}") from exc


async def owned_links_snapshot(netns: str | None = None, *, owner: str) -> dict[str, LinkInfo]:
    """The links agent ``owner`` made in the namespace (its tag or a legacy alias, see
    ``links.split``): name → link. Other agents' links are not in it."""
    return {link.ifname: link for link in await links_snapshot(netns)
            if link.alias is not None and owned_by(link.owner, owner)}

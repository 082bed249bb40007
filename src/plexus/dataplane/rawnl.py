"""Blocking rtnetlink requests, for worker threads: the endpoint path off the event loop.

Why threads: rtnetlink does the work of a request inside the sender's send() syscall. Creating
a veth (~1 ms under the networking lock) or deleting one (~15-20 ms: unregistering, waiting for
RCU) on the agent's event-loop socket holds the whole loop (every API call, every DNS update)
for the kernel's time as well as for the request's own Python. Here a request is sent and its
answer read on a worker thread, which gives up the GIL for the syscall; the bytes are built by
the pure functions of ``rtnl``.

Namespaces are parameters: a ``Channel`` is one socket bound to one namespace for its whole
life. A channel into a container comes from ``netns.netlink_socket`` (a throw-away thread enters
the namespace to open it); a pooled thread never calls setns (``netns.py`` tells why). A channel
serves one thread at a time: two threads reading one socket would take each other's answers,
hence one host channel per worker thread in ``NetlinkThreads``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

from plexus.dataplane import netns, rtnl
from plexus.errors import AlreadyExists, DataplaneError
from plexus.model.types import IPAddress, IPInterface

P = ParamSpec("P")
T = TypeVar("T")

TIMEOUT = 30.0  # seconds a request may wait for its answer (a deletion under load: ~1 s)
_RECV_SIZE = 65536  # the kernel caps a netlink datagram at 32 KiB
_MAX_READS = 64  # datagrams read for one answer before giving up (others are stale answers)


class Channel:
    """One NETLINK_ROUTE socket in one namespace: a request in, its answer out, blocking."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        for option in (rtnl.NETLINK_CAP_ACK, rtnl.NETLINK_EXT_ACK):
            # Errors echo only the request's header, and say why in words where the kernel
            # has any; a kernel without these options answers plainly.
            with contextlib.suppress(OSError):
                sock.setsockopt(rtnl.SOL_NETLINK, option, 1)
        self._sock = sock
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)

    @classmethod
    def open(cls, netns_path: str | None) -> Channel:
        """A channel into the namespace at ``netns_path`` (None: the agent's own); NotFound if
        there is no such namespace."""
        return cls(netns.netlink_socket(netns_path))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def call(self, build: Callable[Concatenate[int, P], bytes], *args: P.args,
             **kwargs: P.kwargs) -> rtnl.Reply:
        """Send the request ``build(seq, ...)`` makes and return the kernel's answer to it."""
        return self.call_all([lambda seq: build(seq, *args, **kwargs)])[0]

    def call_all(self, builds: Sequence[Callable[[int], bytes]]) -> list[rtnl.Reply]:
        """Several requests in one datagram, and their answers in the same order.

        The kernel handles the messages of a datagram in order, each even when an earlier one
        failed. Only the last asks for an acknowledgement; the others are answered only if they
        fail, and before the last is: a batch that works costs one send and one receive (each
        syscall gives up the GIL, which a busy event loop may then hold for a while).
        """
        seqs = [self._next_seq() for _ in builds]
        *first, last = [build(seq) for build, seq in zip(builds, seqs, strict=True)]
        self._sock.send(b"".join(rtnl.without_ack(m) for m in first) + last)
        answers: dict[int, rtnl.Reply] = {}
        for _ in range(_MAX_READS + len(seqs)):
            size = self._sock.recv_into(self._buf)  # TimeoutError (an OSError) after TIMEOUT
            answers.update(rtnl.replies(memoryview(bytes(memoryview(self._buf)[:size]))))
            if seqs[-1] in answers:
                done = rtnl.Reply(0, rtnl.NLMSG_ERROR, memoryview(b""))
                return [answers.get(seq, done) for seq in seqs]
        raise DataplaneError(f"no answer from the kernel to request {seqs[-1]}")

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq


class NetlinkThreads:
    """A few worker threads, each with a channel of its own in the agent's namespace."""

    def __init__(self, workers: int, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, name)
        self._local = threading.local()
        self._channels: list[Channel] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[Concatenate[Channel, P], T], *args: P.args,
                  **kwargs: P.kwargs) -> T:
        """``fn(host_channel, ...)`` on one of the threads."""
        call = functools.partial(self._call, functools.partial(fn, **kwargs), *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        channel: Channel | None = getattr(self._local, "channel", None)
        if channel is None:
            channel = self._local.channel = Channel.open(None)
            with self._lock:
                self._channels.append(channel)
        return fn(channel, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for channel in self._channels:
                channel.close()
            self._channels.clear()


# --- idempotent verbs over channels (the blocking twins of links.py's) -------------------------


def get_link(ch: Channel, name: str = "", index: int = 0) -> rtnl.LinkInfo | None:
    """Link ``name`` (or else link ``index``) now; None if there is no such link."""
    what = name or f"#{index}"
    answer = ch.call(rtnl.getlink_request, name, index)
    if answer.error == errno.ENODEV:
        return None
    if answer.error:
        raise DataplaneError(f"cannot look up link {what}: {answer.why}")
    parsed = rtnl.parse_link(answer.payload) if answer.kind == rtnl.RTM_NEWLINK else None
    if parsed is None:
        raise DataplaneError(f"unexpected answer (type {answer.kind}) looking up link {what}")
    return parsed[0]


def link_index(ch: Channel, name: str) -> int | None:
    link = get_link(ch, name)
    return None if link is None else link.index


def create_veth(ch: Channel, name: str, mtu: int, peer: str, mac: str = "",
                netns_path: str | None = None) -> None:
    """A veth pair whose peer is born inside the namespace at ``netns_path`` as ``peer``.

    Creating the peer directly in the target namespace (rather than creating both ends here and
    moving one) means no temporary name can collide with a host interface, and a container that
    already has ``peer`` makes the whole request fail without leaving half a pair behind.
    """
    fd = None if netns_path is None else os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        answer = ch.call(rtnl.veth_request, name, mtu, peer, mtu, mac, fd)
    finally:
        if fd is not None:
            os.close(fd)
    if answer.error == errno.EEXIST:
        raise AlreadyExists(f"interface {peer} already exists in {netns_path} (or {name} on host)")
    if answer.error:
        raise DataplaneError(f"cannot create veth {name}/{peer}: {answer.why}")


# A step of a batch: the request, what its failure means ("cannot add address X"), and the
# errnos that mean it was done already.
Step = tuple[Callable[[int], bytes], str, tuple[int, ...]]


def run_steps(ch: Channel, steps: Sequence[Step]) -> None:
    """The steps as one batch (``Channel.call_all``); the first that failed raises."""
    answers = ch.call_all([build for build, _, _ in steps])
    for (_, what, fine), answer in zip(steps, answers, strict=True):
        if answer.error and answer.error not in fine:
            raise DataplaneError(f"{what}: {answer.why}")


def up(index: int, name: str) -> Step:
    return (lambda seq: rtnl.link_up_request(seq, index)), f"cannot set {name} up", ()


def addresses(index: int, wanted: Iterable[IPInterface]) -> list[Step]:
    """Every address on link ``index`` (others are left alone)."""
    return [(functools.partial(rtnl.addaddr_request, index=index, address=address),
             f"cannot add address {address}", (errno.EEXIST,)) for address in wanted]


def default_routes(gateways: Iterable[IPAddress]) -> list[Step]:
    return [(functools.partial(rtnl.default_route_request, gateway=gateway),
             f"cannot add default route via {gateway}", ()) for gateway in gateways]


def join_bridge(ch: Channel, name: str, master: int, alias: str) -> int:
    """Link ``name`` joins bridge ``master``, carries ``alias``, is up and in hairpin mode, in
    one batch; returns the errno of joining (0: done; EINVAL: there is no link ``master``)."""
    joined, hairpin = ch.call_all([
        lambda seq: rtnl.enslave_request(seq, name, master, alias),
        lambda seq: rtnl.hairpin_request(seq, name),  # fails (EOPNOTSUPP) if joining did
    ])
    if joined.error == errno.ENODEV:
        raise DataplaneError(f"veth {name} vanished before it joined its bridge")
    if not joined.error and hairpin.error:
        raise DataplaneError(f"cannot set hairpin mode on {name}: {hairpin.why}")
    return joined.error


def delete_link(ch: Channel, name: str) -> bool:
    """Delete link ``name``; False if it was not there."""
    answer = ch.call(rtnl.dellink_request, name)
    if answer.error in (errno.ENODEV, errno.ENOENT):
        return False
    if answer.error:
        raise DataplaneError(f"cannot delete link {name}: {answer.why}")
    return True

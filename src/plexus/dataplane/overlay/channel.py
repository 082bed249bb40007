"""One blocking netlink socket in one namespace, for the overlay's reads and batches.

Like ``rawnl.Channel`` (whose batching it follows), plus dumps: the overlay reads whole tables
of one device (FDB, neighbours, routes), which a Channel, made for one-answer requests, does
not. For one thread at a time: two threads reading one socket would take each other's answers.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence

from plexus.dataplane import netns, rtnl
from plexus.errors import DataplaneError

TIMEOUT = 30.0
NETLINK_GET_STRICT_CHK = 12  # linux/netlink.h: dumps honour the request's filters (4.20+)
_RECV_SIZE = 1 << 16
_MAX_DATAGRAMS = 1 << 16  # a dump longer than this is a kernel gone wrong
_DUMP_TRIES = 3  # NLM_F_DUMP_INTR: the table changed during the dump, read it again
_BATCH = 128  # requests per datagram (a datagram is processed whole under RTNL)
Build = Callable[[int], bytes]
Messages = list[tuple[int, memoryview]]


class OverlaySocket:
    """One NETLINK_ROUTE socket in one namespace, blocking, for one thread at a time.
    ``sent`` counts the requests sent (reads and changes), ``changes`` the changes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        for option in (rtnl.NETLINK_CAP_ACK, rtnl.NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            with contextlib.suppress(OSError):  # an older kernel answers plainly, unfiltered
                sock.setsockopt(rtnl.SOL_NETLINK, option, 1)
        self._sock = sock
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)
        self.sent = 0
        self.changes = 0

    @classmethod
    def open(cls, netns_path: str | None) -> OverlaySocket:
        return cls(netns.netlink_socket(netns_path))

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq

    def _datagrams(self) -> Iterator[memoryview]:
        for _ in range(_MAX_DATAGRAMS):
            size = self._sock.recv_into(self._buf)  # TimeoutError (an OSError) after TIMEOUT
            yield memoryview(bytes(memoryview(self._buf)[:size]))
        raise DataplaneError("netlink: no end to the kernel's answer")

    def dump(self, build: Build) -> Messages:
        """(type, payload) of every message of the dump that ``build(seq)`` asks for."""
        for _ in range(_DUMP_TRIES):
            seq = self._next_seq()
            self._sock.send(build(seq))
            self.sent += 1
            found, interrupted = self._read_dump(seq)
            if not interrupted:
                return found
        raise DataplaneError(f"netlink dump interrupted {_DUMP_TRIES} times in a row")

    def _read_dump(self, seq: int) -> tuple[Messages, bool]:
        found: Messages = []
        interrupted = False
        for data in self._datagrams():
            for kind, flags, got, payload in rtnl.messages(data):
                if got != seq:
                    continue  # a late answer to an abandoned request
                interrupted |= bool(flags & rtnl.NLM_F_DUMP_INTR)
                if kind not in (rtnl.NLMSG_DONE, rtnl.NLMSG_ERROR):
                    found.append((kind, payload))
                    continue
                code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                if code > 0:
                    raise DataplaneError(f"netlink dump failed: {os.strerror(code)}")
                return found, interrupted
        raise AssertionError("unreachable")  # _datagrams raises first

    def ask(self, build: Build) -> rtnl.Reply:
        """One request that is answered by one message (a get)."""
        return self.batch([build], count=False)[0]

    def batch(self, builds: Sequence[Build], count: bool = True) -> list[rtnl.Reply]:
        """Requests in datagrams of at most ``_BATCH``, answers in order: only the last of a
        datagram is acknowledged, the others answer only if they fail (as rawnl.Channel)."""
        answers: list[rtnl.Reply] = []
        for start in range(0, len(builds), _BATCH):
            answers += self._batch(builds[start : start + _BATCH])
        if count:
            self.changes += len(builds)
        return answers

    def _batch(self, builds: Sequence[Build]) -> list[rtnl.Reply]:
        seqs = [self._next_seq() for _ in builds]
        *first, last = [build(seq) for build, seq in zip(builds, seqs, strict=True)]
        self._sock.send(b"".join(rtnl.without_ack(m) for m in first) + last)
        self.sent += len(builds)
        answers: dict[int, rtnl.Reply] = {}
        for data in self._datagrams():
            answers.update(rtnl.replies(data))
            if seqs[-1] in answers:
                done = rtnl.Reply(0, rtnl.NLMSG_ERROR, memoryview(b""))
                return [answers.get(seq, done) for seq in seqs]
        raise AssertionError("unreachable")

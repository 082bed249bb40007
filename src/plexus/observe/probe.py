"""Probes with real packets, without the application's help, from the thread that is in the
source's network namespace (``netns.run_in_netns``); and which ports a namespace listens on.

How the kernel answers a probe (Linux; the socket API says it without raw sockets):

- TCP: a non-blocking ``connect``. SYN-ACK: it connects (``connected``); RST: ECONNREFUSED
  (``refused``): either way the SYN reached the destination's stack. Silence until the timeout
  (``silent``): a firewall dropped it, or no neighbour answered ARP/ND. ENETUNREACH,
  EHOSTUNREACH (``unreachable``): no route, or an ICMP error. A connection that completes is
  closed with SO_LINGER 0, an RST: the application may see a connection reset, never data.
- UDP: one empty datagram on a connected socket. ICMP port unreachable comes back as
  ECONNREFUSED (``refused``: delivered to a port nothing listens on); an answer is
  ``connected``; silence is a drop only if nothing listens on the port (``listening`` says),
  else it is ambiguous. Linux rate-limits ICMP errors per destination (a burst of about 6, then
  1/s: net.ipv4.icmp_ratelimit), so a verify probes few UDP ports per pair.

Many probes are in flight at once (a sliding window of ``window`` sockets on one epoll), each
with its own deadline, so a namespace's probes cost about one timeout however many are dropped.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from plexus.model.types import IPAddress


class Outcome(StrEnum):
    CONNECTED = "connected"
    REFUSED = "refused"
    SILENT = "silent"
    UNREACHABLE = "unreachable"
    ERROR = "error"  # the probe could not be made (its namespace went away, say)


_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Target:
    address: IPAddress
    port: int
    protocol: str  # "tcp" or "udp"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    detail: str = ""  # the errno's name, or "no answer in N s"
    ms: float = 0.0


def _classify(err: int, started: float) -> Result:
    ms = round(1000 * (time.monotonic() - started), 2)
    name = errno.errorcode.get(err, str(err))
    if err == 0:
        return Result(Outcome.CONNECTED, "", ms)
    if err in _REFUSED:
        return Result(Outcome.REFUSED, name, ms)
    if err in _UNREACHABLE:
        return Result(Outcome.UNREACHABLE, name, ms)
    return Result(Outcome.ERROR, name, ms)


@dataclass
class _Live:
    index: int
    sock: socket.socket
    started: float
    deadline: float


def run(targets: list[Target], timeout: float, window: int) -> list[Result]:
    """Probe every target from this thread's namespace, ``window`` at a time."""
    results: list[Result | None] = [None] * len(targets)
    live: dict[int, _Live] = {}
    with selectors.DefaultSelector() as sel:
        queue = iter(enumerate(targets))
        while True:
            for i, target in queue:
                _start(sel, live, results, i, target, timeout)
                if len(live) >= window:
                    break
            if not live:
                break
            _wait(sel, live, results, targets, timeout)
    return [r or Result(Outcome.ERROR, "not probed") for r in results]


def _start(sel: selectors.BaseSelector, live: dict[int, _Live], results: list[Result | None],
           i: int, target: Target, timeout: float) -> None:
    family = socket.AF_INET6 if target.address.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if target.protocol == "tcp" else socket.SOCK_DGRAM
    started = time.monotonic()
    try:
        sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    except OSError as exc:
        results[i] = Result(Outcome.ERROR, f"socket: {exc.strerror}")
        return
    err = _send(sock, target)
    if err not in (0, errno.EINPROGRESS) or (err == 0 and kind == socket.SOCK_STREAM):
        results[i] = _classify(err, started)
        sock.close()
        return
    event = selectors.EVENT_WRITE if kind == socket.SOCK_STREAM else selectors.EVENT_READ
    sel.register(sock, event)
    live[sock.fileno()] = _Live(i, sock, started, started + timeout)


def _send(sock: socket.socket, target: Target) -> int:
    """Start the probe: 0 or EINPROGRESS when under way, else the errno that ended it."""
    if sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        return sock.connect_ex((str(target.address), target.port))
    try:
        sock.connect((str(target.address), target.port))
        sock.send(b"")
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _wait(sel: selectors.BaseSelector, live: dict[int, _Live], results: list[Result | None],
          targets: list[Target], timeout: float) -> None:
    now = time.monotonic()
    wait = max(0.0, min(x.deadline for x in live.values()) - now)
    for key, _ in sel.select(wait):
        item = live.pop(key.fd)
        sel.unregister(item.sock)
        results[item.index] = _finish(item, targets[item.index])
        item.sock.close()
    now = time.monotonic()
    for fd in [fd for fd, x in live.items() if x.deadline <= now]:
        item = live.pop(fd)
        sel.unregister(item.sock)
        results[item.index] = Result(Outcome.SILENT, f"no answer in {timeout:g} s",
                                     round(1000 * (now - item.started), 2))
        item.sock.close()


def _finish(item: _Live, target: Target) -> Result:
    if target.protocol == "tcp":
        return _classify(item.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), item.started)
    try:
        item.sock.recv(1)
    except OSError as exc:
        return _classify(exc.errno or errno.EIO, item.started)
    return _classify(0, item.started)  # an answer: delivered, and someone listens


def listening() -> set[tuple[str, int]]:
    """(protocol, port) of every TCP listener and bound UDP socket of this thread's network
    namespace (/proc/thread-self/net: /proc/self/net would show the process's namespace).
    "tcp"/"udp": one of either family (an IPv6 socket takes IPv4 too, unless v6only);
    "tcp6"/"udp6" also for an IPv6 socket: what an IPv6 client can reach (a server bound to
    0.0.0.0 only, as ``python3 -m http.server`` is, refuses it)."""
    found: set[tuple[str, int]] = set()
    for proto, name, state in (("tcp", "tcp", "0A"), ("tcp", "tcp6", "0A"),
                               ("tcp6", "tcp6", "0A"), ("udp", "udp", ""), ("udp", "udp6", ""),
                               ("udp6", "udp6", "")):
        try:
            lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue  # no IPv6 in this kernel
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and (not state or fields[3] == state):
                found.add((proto, int(fields[1].rsplit(":", 1)[1], 16)))
    return found

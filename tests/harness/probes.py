"""Traffic probes from inside a network namespace, saying what happened to the packets.

A check that expects no answer must know *why* there was none: plexus's isolation drops
packets (the client times out), while a server that is down or a port nobody publishes is
refused (TCP RST, ICMP port unreachable) and a missing route is unreachable. A probe that
returned "" for all of them would let a dead server pass for isolation, so every probe returns a
:class:`Probe` whose ``outcome`` tells them apart, and a test that expects ``DROPPED`` pairs it
with a positive control (the same client reaching the same server where it should, or the same
server answering another client).

How the kernel reports each case to a socket (Linux):

- ``answered``: the server sent bytes (TCP: after the handshake; UDP: a datagram back).
- ``dropped``: nothing came back before the timeout; a SYN or datagram that a firewall DROPs.
- ``refused``: ECONNREFUSED (a TCP RST, or ICMP port unreachable on a *connected* UDP socket:
  an unconnected one never hears of ICMP errors) or ECONNRESET.
- ``unreachable``: ENETUNREACH (no route), EHOSTUNREACH (ICMP host unreachable or
  administratively prohibited, or no neighbour answered ARP/ND for ~3 s: with a shorter timeout
  that case reads as ``dropped``), ENETDOWN, EHOSTDOWN.

Any other error is a bug in the test (a bad address, a missing namespace) and is raised.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from plexus.dataplane.netns import run_in_netns


class Outcome(StrEnum):
    ANSWERED = "answered"
    DROPPED = "dropped"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"


ANSWERED, DROPPED, REFUSED, UNREACHABLE = (
    Outcome.ANSWERED, Outcome.DROPPED, Outcome.REFUSED, Outcome.UNREACHABLE,
)  # fmt: skip
_ERRNO_OUTCOMES = {
    errno.ECONNREFUSED: REFUSED,
    errno.ECONNRESET: REFUSED,
    errno.ENETUNREACH: UNREACHABLE,
    errno.EHOSTUNREACH: UNREACHABLE,
    errno.ENETDOWN: UNREACHABLE,
    errno.EHOSTDOWN: UNREACHABLE,
}


@dataclass(frozen=True)
class Probe:
    """What one probe observed: the outcome, the server's first line if it answered, and the
    error behind any other outcome (an errno name, or "no answer in N s")."""

    outcome: Outcome
    answer: str = ""
    error: str = ""

    def __str__(self) -> str:
        if self.outcome is ANSWERED:
            return f"answered {self.answer!r}"
        return f"{self.outcome} ({self.error})"


def netns_path(ns: str) -> str:
    """A namespace name under /run/netns, or a path (``/proc/PID/ns/net``) as it is."""
    return ns if ns.startswith("/") else f"/run/netns/{ns}"


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _failed(exc: OSError, timeout: float) -> Probe:
    if isinstance(exc, TimeoutError):
        return Probe(DROPPED, error=f"no answer in {timeout:g} s")
    outcome = _ERRNO_OUTCOMES.get(exc.errno or 0)
    if outcome is None:
        raise exc
    return Probe(outcome, error=errno.errorcode.get(exc.errno or 0, str(exc)))


def tcp_probe(ns: str, ip: str, port: int, timeout: float = 2.0, payload: bytes = b"") -> Probe:
    """Connect from namespace ``ns``, send ``payload`` if any, read the server's first line."""

    def go() -> Probe:
        with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((ip, port))
            except OSError as exc:
                return _failed(exc, timeout)
            try:
                if payload:
                    s.sendall(payload)
                data = s.recv(4096)
            except TimeoutError:
                data = b""  # accepted, then silent: the handshake was answered all the same
            except OSError as exc:
                return _failed(exc, timeout)
            return Probe(ANSWERED, data.decode(errors="replace").strip())

    return run_in_netns(netns_path(ns), go)


def udp_probe(ns: str, ip: str, port: int, timeout: float = 2.0) -> Probe:
    """Send one datagram from namespace ``ns`` on a connected socket (so that an ICMP error
    reaches it) and read the answer."""

    def go() -> Probe:
        with socket.socket(_family(ip), socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((ip, port))
                s.send(b"ping")
                return Probe(ANSWERED, s.recv(4096).decode(errors="replace").strip())
            except OSError as exc:
                return _failed(exc, timeout)

    return run_in_netns(netns_path(ns), go)


def http_probe(ns: str, ip: str, port: int, timeout: float = 5.0) -> Probe:
    """GET / over HTTP/1.0 from namespace ``ns``; the answer is the whole response."""

    def go() -> Probe:
        chunks = []
        with socket.socket(_family(ip), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect((ip, port))
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                for _ in range(1024):  # bounded: 4 MiB at most
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except OSError as exc:
                if not chunks:
                    return _failed(exc, timeout)
        return Probe(ANSWERED, b"".join(chunks).decode(errors="replace"))

    return run_in_netns(netns_path(ns), go)


# The answer alone, for checks that expect one ("" when there was none: what happened instead
# is in the Probe). A check that expects *no* answer uses the probes above and their outcome.


def tcp_request(ns: str, ip: str, port: int, timeout: float = 2.0, payload: bytes = b"") -> str:
    return tcp_probe(ns, ip, port, timeout, payload).answer


def udp_request(ns: str, ip: str, port: int, timeout: float = 2.0) -> str:
    return udp_probe(ns, ip, port, timeout).answer


def http_get(ns: str, ip: str, port: int, timeout: float = 5.0) -> str:
    return http_probe(ns, ip, port, timeout).answer


def wait_tcp(ns: str, ip: str, port: int, timeout: float = 10.0) -> str:
    """Like tcp_request, but retries (a server still starting refuses at once) until it
    answers or ``timeout`` passes."""
    return wait_for_answer(lambda: tcp_probe(ns, ip, port, timeout=min(1.0, timeout)), timeout)


def wait_for_answer(probe: Callable[[], Probe], timeout: float = 10.0) -> str:
    """Repeat ``probe`` (bounded) until it is answered; its answer, or "" if it never was."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got.outcome is ANSWERED or time.monotonic() > deadline:
            return got.answer
        time.sleep(0.1)


def answered(probe: Callable[[], Probe], timeout: float = 15.0) -> Probe:
    """``probe`` again (bounded) until it is answered: state another host or a reconciler
    programs within moments of the request that caused it (routes to another host, say)."""
    deadline = time.monotonic() + timeout
    while True:
        p = probe()
        if p.outcome is ANSWERED or time.monotonic() > deadline:
            return p
        time.sleep(0.1)


def connect(ns: str, ip: str, port: int = 80, timeout: float = 3.0) -> socket.socket:
    """A TCP connection opened inside ``ns``, the server's greeting read; the socket stays in
    that namespace for life (an established connection a test keeps using)."""

    def go() -> socket.socket:
        s = socket.create_connection((ip, port), timeout=timeout)
        s.recv(100)
        return s

    return run_in_netns(netns_path(ns), go)

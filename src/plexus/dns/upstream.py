"""Forwarding to upstream resolvers: UDP first, TCP when the answer is truncated, failover.

Design notes.

- Every forwarded query gets a fresh UDP socket (a random source port chosen by the kernel) and a
  random ID, and only a reply from the upstream's address with that ID and the same question is
  accepted: the defences against off-path spoofing that a forwarder owes its clients.
- An upstream that times out or refuses the connection is marked *down* at once and is tried
  only after every healthy one, so one dead upstream costs at most one timeout, once, instead of
  stalling every lookup. A background check probes every upstream each ``health_interval``
  seconds (a query for the root's NS; any well-formed reply counts as alive) and brings it back.
- Attempts use a short ``timeout``; upstreams that timed out are asked again with twice the
  timeout (slow is not dead); the whole forward is bounded by ``deadline`` so a client (glibc
  waits 5 s) always hears SERVFAIL rather than nothing.
- REFUSED from an upstream means "not for you" (an ACL): the next one is tried. SERVFAIL and
  NXDOMAIN are answers about the name and are passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from plexus.dns.config import Upstream
from plexus.dns.metrics import Histogram
from plexus.dns.wire import HEADER, QR, TC, QType, Rcode, build_query, with_id

log = logging.getLogger("plexus.dns")

_LEN = struct.Struct("!H")
_JUNK_LIMIT = 16  # stray datagrams tolerated on one query's socket before giving up on it
_MAX_ROUNDS = 3  # passes over the upstreams that timed out (0.5 s, 1 s, 2 s by default)


@dataclass(frozen=True, slots=True)
class ForwardOptions:
    timeout: float = 0.5  # per attempt (UDP, or the TCP fallback)
    deadline: float = 2.5  # for the whole forward, all upstreams included
    health_interval: float = 2.0
    health_timeout: float = 1.0


@dataclass(slots=True)
class UpstreamState:
    upstream: Upstream
    healthy: bool = True
    changed: float = field(default_factory=time.monotonic)
    queries: int = 0
    answers: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # timeout, unreachable, error, ...
    tcp_fallbacks: int = 0
    latency: Histogram = field(default_factory=Histogram)

    def fail(self, kind: str, mark_down: bool) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if mark_down and self.healthy:
            log.warning("dns upstream %s is down (%s)", self.upstream, kind)
            self.healthy, self.changed = False, time.monotonic()

    def alive(self) -> None:
        if not self.healthy:
            log.info("dns upstream %s is back", self.upstream)
            self.healthy, self.changed = True, time.monotonic()

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy, "queries": self.queries, "answers": self.answers,
            "failures": dict(sorted(self.failures.items())), "tcp_fallbacks": self.tcp_fallbacks,
            "latency_seconds": self.latency.to_dict(),
        }


class UpstreamError(Exception):
    def __init__(self, kind: str, mark_down: bool = True) -> None:
        super().__init__(kind)
        self.kind = kind
        self.mark_down = mark_down


@dataclass(frozen=True, slots=True)
class Forwarded:
    """The outcome of ``Forwarder.forward``: ``response`` (ID already restored) or None."""

    response: bytes | None
    upstream: Upstream | None
    tried: tuple[tuple[str, str], ...]  # (upstream, what happened), in order


class Forwarder:
    def __init__(self, options: ForwardOptions | None = None) -> None:
        self.options = options or ForwardOptions()
        self._states: dict[Upstream, UpstreamState] = {}
        self._excluded: frozenset[tuple[str, int]] = frozenset()
        self._health: asyncio.Task[None] | None = None

    # --- configuration -----------------------------------------------------------------------

    def track(self, upstreams: Iterable[Upstream]) -> None:
        """The upstreams in use now: new ones start healthy, forgotten ones are dropped."""
        wanted = list(dict.fromkeys(upstreams))
        self._states = {u: self._states.get(u) or UpstreamState(u) for u in wanted}

    def exclude(self, addresses: Iterable[tuple[str, int]]) -> None:
        """Our own listening addresses: forwarding to them would loop."""
        self._excluded = frozenset(addresses)

    def state(self, upstream: Upstream) -> UpstreamState:
        found = self._states.get(upstream)
        if found is None:
            found = self._states[upstream] = UpstreamState(upstream)
        return found

    def start(self) -> None:
        if self._health is None:
            self._health = asyncio.get_running_loop().create_task(self._health_loop())

    async def close(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None

    def stats(self) -> dict[str, Any]:
        return {str(u): s.to_dict() for u, s in self._states.items()}

    # --- forwarding --------------------------------------------------------------------------

    def order(self, upstreams: Sequence[Upstream]) -> list[Upstream]:
        """Healthy upstreams in configured order, then the down ones (longest-down first)."""
        usable = [u for u in upstreams if (str(u.host), u.port) not in self._excluded]
        states = [self.state(u) for u in usable]
        healthy = [s.upstream for s in states if s.healthy]
        down = sorted((s for s in states if not s.healthy), key=lambda s: s.changed)
        return healthy + [s.upstream for s in down]

    async def forward(self, query: bytes, question: bytes,
                      upstreams: Sequence[Upstream]) -> Forwarded:
        """Send ``query`` (raw bytes, any ID) to the first upstream that answers.

        Upstreams are tried in ``order``; those that timed out are asked again with twice the
        timeout (a slow recursion is not a dead server: with one upstream, a name that takes it
        a second to resolve must not become SERVFAIL at 0.5 s), until ``deadline``.
        """
        ident = struct.unpack_from("!H", query)[0]
        tried: list[tuple[str, str]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.deadline
        pending, timeout = self.order(upstreams), self.options.timeout
        for _ in range(_MAX_ROUNDS):
            slow: list[Upstream] = []
            for upstream in pending:
                left = deadline - loop.time()
                if left <= 0.005:
                    tried.append((str(upstream), "skipped: deadline"))
                    return Forwarded(None, None, tuple(tried))
                reply, what = await self._attempt(upstream, query, question, min(timeout, left))
                tried.append((str(upstream), what))
                if reply is not None:
                    return Forwarded(with_id(reply, ident), upstream, tuple(tried))
                if what.endswith("timeout"):
                    slow.append(upstream)
            pending, timeout = slow, timeout * 2
        return Forwarded(None, None, tuple(tried))

    async def _attempt(self, upstream: Upstream, query: bytes, question: bytes,
                       timeout: float) -> tuple[bytes | None, str]:
        """(reply, "answered") or (None, what went wrong)."""
        loop = asyncio.get_running_loop()
        state = self.state(upstream)
        state.queries += 1
        started = loop.time()
        try:
            reply = await self._ask(upstream, query, question, timeout, state)
        except UpstreamError as exc:
            state.fail(exc.kind, exc.mark_down)
            return None, exc.kind
        state.alive()
        state.answers += 1
        state.latency.observe(loop.time() - started)
        if reply[3] & 0x0F == Rcode.REFUSED:
            return None, "refused"
        return reply, "answered"

    async def _ask(self, upstream: Upstream, query: bytes, question: bytes, timeout: float,
                   state: UpstreamState) -> bytes:
        ident = secrets.randbits(16)
        packet = with_id(query, ident)
        reply = await udp_exchange(upstream, packet, question, timeout)
        if reply[2] & (TC >> 8):
            state.tcp_fallbacks += 1
            reply = await tcp_exchange(upstream, packet, question, timeout)
        return reply

    # --- health ------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_interval)
            states = [s for s in self._states.values()
                      if (str(s.upstream.host), s.upstream.port) not in self._excluded]
            if states:
                await asyncio.gather(*(self._probe(s) for s in states), return_exceptions=True)

    async def _probe(self, state: UpstreamState) -> None:
        probe = build_query("", QType.NS, rd=False)
        question = probe[HEADER.size:]
        try:
            await udp_exchange(state.upstream, with_id(probe, secrets.randbits(16)), question,
                               self.options.health_timeout)
        except UpstreamError as exc:
            state.fail("health-" + exc.kind, exc.mark_down)
        else:
            state.alive()


def _check_reply(reply: bytes, ident: int, question: bytes) -> bool:
    if len(reply) < HEADER.size + len(question):
        return False
    rid, flags = struct.unpack_from("!HH", reply)
    if rid != ident or not flags & QR:
        return False
    echoed = reply[HEADER.size : HEADER.size + len(question)]
    return echoed.lower() == question.lower()


async def udp_exchange(upstream: Upstream, packet: bytes, question: bytes,
                       timeout: float) -> bytes:
    """One query over a fresh connected UDP socket; the matching reply or UpstreamError."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if upstream.host.version == 6 else socket.AF_INET
    ident = struct.unpack_from("!H", packet)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        try:
            sock.connect((str(upstream.host), upstream.port))
            sock.send(packet)
        except OSError as exc:
            raise UpstreamError("unreachable" if _unreachable(exc) else "error") from None
        async with asyncio.timeout(timeout):
            for _ in range(_JUNK_LIMIT):
                try:
                    reply = await loop.sock_recv(sock, 65535)
                except OSError as exc:
                    raise UpstreamError("unreachable" if _unreachable(exc) else "error") from None
                if _check_reply(reply, ident, question):
                    return reply
        raise UpstreamError("bad-replies")
    except TimeoutError:
        raise UpstreamError("timeout") from None
    finally:
        sock.close()


async def tcp_exchange(upstream: Upstream, packet: bytes, question: bytes,
                       timeout: float) -> bytes:
    """One query over a fresh TCP connection (RFC 7766 framing)."""
    ident = struct.unpack_from("!H", packet)[0]
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(str(upstream.host), upstream.port)
            writer.write(_LEN.pack(len(packet)) + packet)
            await writer.drain()
            (size,) = _LEN.unpack(await reader.readexactly(2))
            reply = await reader.readexactly(size)
    except TimeoutError:
        raise UpstreamError("tcp-timeout") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        down = isinstance(exc, OSError) and _unreachable(exc)
        raise UpstreamError("tcp-unreachable" if down else "tcp-error", down) from None
    finally:
        if writer is not None:
            writer.close()
    if not _check_reply(reply, ident, question):
        raise UpstreamError("tcp-bad-reply", False)
    return reply


def _unreachable(exc: OSError) -> bool:
    return isinstance(exc, ConnectionRefusedError | ConnectionResetError) or exc.errno in (
        101, 111, 113,  # ENETUNREACH, ECONNREFUSED, EHOSTUNREACH
    )

"""The DNS server: asyncio UDP and TCP listeners answering from a ``RecordTable``.

Where the time goes, and the fast path. A query that reaches Python costs, on the UDP path, one
``datagram_received`` call; parsing it and building the answer costs ~10x more than the rest of
the work together. So every local answer sent over UDP is kept, ready-made, in the view's
``wire_cache`` under the query's bytes after the 2-byte ID (flags, counts, question and any OPT
record: everything the answer depends on, given the table). The next identical query is a dict
lookup and an ID patch. Round-robin names keep one ready-made answer per rotation and cycle
through them. A cached answer never outlives a change that affects it: ``apply`` changes the
table in place and the table drops the caches of the views that see a changed network (the
others keep theirs); ``update`` installs a whole new table, and with it empty caches. Both run on
the event loop's thread, between two packets.

Robustness. Nothing a client sends may raise out of a protocol callback or stall another client:
- UDP: unparsable datagrams are dropped (FORMERR when at least the header was readable), responses
  (QR=1) are never answered (no reflection loops), forwarded queries run as tasks, capped at
  ``max_inflight`` (SERVFAIL beyond that);
- TCP (RFC 7766): each connection is its own task; a frame must complete within
  ``frame_timeout``, a connection may idle for ``idle_timeout``; zero-length and oversized frames
  close the connection; at most ``max_connections`` per listener and ``max_pipelined`` queries in
  flight per connection; a client that does not read its answers is dropped once
  ``write_timeout`` passes or its backlog exceeds ``max_write_buffer``.

Latency (``stats()["latency"]``: type -> rcode -> histogram): from a query's arrival in Python to
its answer being ready, upstream time included for a forwarded one. The fast path is not timed:
two clock reads and a histogram update would add a tenth to its cost; its answers, ready-made
and sent within microseconds, are counted in the lowest bucket at stats time and add nothing to
the sum (``QUERY_BUCKETS`` starts well above what they cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from plexus.dataplane.netns import run_in_netns
from plexus.dns.config import DNS_PORT
from plexus.dns.metrics import QUERY_BUCKETS, Histogram, nested
from plexus.dns.model import DnsChanges, Explanation, Resolution, View
from plexus.dns.records import RecordTable
from plexus.dns.upstream import Forwarder, ForwardOptions
from plexus.dns.wire import (
    MAX_TCP_MESSAGE,
    QR,
    Message,
    Rcode,
    WireError,
    address_rr,
    build_query,
    error_response,
    parse_message,
    parse_records,
    ptr_rr,
    qtype_name,
    qtype_value,
    rcode_name,
    response,
    soa_rr,
    truncated_copy,
)
from plexus.errors import DataplaneError

log = logging.getLogger("plexus.dns")

_LEN = struct.Struct("!H")
IP_FREEBIND = 15
IPV6_FREEBIND = 78
MAX_ROTATIONS = 64  # ready-made rotations of a round-robin answer
# Ready-made answers kept per table, all views together (~1 KB each at most). When full, they
# are all dropped at once: cheaper than LRU bookkeeping on the fast path, and a flood of unique
# names only ever costs the slow path.
MAX_CACHE = 50000
ZONE_TRANSFERS = (251, 252)  # IXFR, AXFR: never served
TCP_SNDBUF = 64 * 1024


@dataclass(frozen=True, slots=True)
class ServerOptions:
    forward: ForwardOptions = field(default_factory=ForwardOptions)
    max_inflight: int = 1024  # forwarded queries in flight (UDP and TCP together)
    max_connections: int = 256  # TCP connections per listener
    max_pipelined: int = 16  # queries in flight on one TCP connection
    idle_timeout: float = 10.0  # RFC 7766 §6.2.3 recommends seconds, not minutes
    frame_timeout: float = 5.0  # to receive a whole frame once its length arrived
    write_timeout: float = 5.0
    max_write_buffer: int = 256 * 1024
    max_query: int = 4096  # largest TCP query accepted; a query this size is already odd
    reuse_port: bool = False  # several processes sharing one address (``workers``)


@dataclass(frozen=True, slots=True, order=True)
class ListenAddress:
    network: str
    address: str
    port: int = DNS_PORT
    netns: str = ""  # path of the namespace to listen in ("" = the agent's own)


class _Cached:
    """A ready-made UDP answer (without its ID), with what ``stats`` needs to count it."""

    __slots__ = ("body", "cycle", "hits", "outcome", "qtype", "rcode")

    def __init__(self, bodies: list[bytes], qtype: str, rcode: str, outcome: str) -> None:
        self.body = bodies[0]
        self.cycle: Iterator[bytes] | None = itertools.cycle(bodies) if len(bodies) > 1 else None
        self.hits = 0
        self.qtype, self.rcode, self.outcome = qtype, rcode, outcome

    def next_body(self) -> bytes:
        return self.body if self.cycle is None else next(self.cycle)


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer, key: ListenAddress) -> None:
        self.server = server
        self.key = key
        self.transport: asyncio.DatagramTransport | None = None
        self.default: View = server.table.view(key.network)
        self.clients: dict[str, View] = server.table.client_views(key.network)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # not a subclass in 3.11

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The fast path: keep it to lookups (see the module docstring).
        entry = self.clients.get(addr[0], self.default).wire_cache.get(data[2:])
        if entry is not None and self.transport is not None:
            entry.hits += 1
            self.transport.sendto(data[:2] + entry.next_body(), addr)
            return
        self.server._udp_slow(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server._counts["udp_errors"] += 1

    def retable(self, table: RecordTable) -> None:
        self.default = table.view(self.key.network)
        self.clients = table.client_views(self.key.network)


@dataclass(eq=False)
class _Listener:
    key: ListenAddress  # as asked for
    bound: ListenAddress  # as bound (the real port when port 0 was asked for)
    udp: _UdpListener
    transport: asyncio.DatagramTransport
    tcp: asyncio.Server
    connections: set[asyncio.Task[None]] = field(default_factory=set)


class DnsServer:
    """One process's DNS server. See ``plexus.dns`` for how the agent drives it."""

    def __init__(self, table: RecordTable | None = None,
                 options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self.table = table or RecordTable.empty()
        self.forwarder = Forwarder(self.options.forward)
        self.forwarder.track(self.table.upstreams())
        self._listeners: dict[ListenAddress, _Listener] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counts: Counter[str] = Counter()
        self._answers: Counter[tuple[str, str]] = Counter()  # (qtype, rcode)
        self._latency: dict[tuple[str, str], Histogram] = {}  # (qtype, rcode), slow path only
        self._outcomes: Counter[str] = Counter()
        self._retired_hits: Counter[tuple[str, str, str]] = Counter()
        self._cache_entries = 0

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the upstream health checks (listeners may be added before or after)."""
        self.forwarder.start()

    async def close(self) -> None:
        for key in list(self._listeners):
            await self.remove_listener(key)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.forwarder.close()

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- records -----------------------------------------------------------------------------

    def update(self, table: RecordTable) -> None:
        """Swap in a new record table: every listener answers from it for its next packet."""
        self._retire(self.table)
        self.table = table
        self._retable()

    def apply(self, changes: DnsChanges, generation: int | None = None) -> None:
        """Change the records in place (O(size of the change)); answers cached for the views
        the change affects are dropped, the others are kept."""
        dropped = self.table.apply(changes, generation)
        self._fold(dropped)
        self._cache_entries = max(0, self._cache_entries - sum(map(len, dropped)))
        self._retable(track=bool(changes.networks))

    def _retable(self, track: bool = True) -> None:
        # The table forgets the views of a removed network: listeners take fresh ones.
        for listener in self._listeners.values():
            listener.udp.retable(self.table)
        if track:
            self.forwarder.track(self.table.upstreams())

    def _retire(self, table: RecordTable, clear: bool = False) -> None:
        """Fold the fast path's hit counts into the totals (before the caches go away)."""
        self._fold([view.wire_cache for view in table.views()])
        if clear:
            for view in table.views():
                view.wire_cache.clear()
        self._cache_entries = 0

    def _fold(self, caches: Iterable[dict[bytes, Any]]) -> None:
        for cache in caches:
            for entry in cache.values():
                if entry.hits:
                    self._retired_hits[(entry.qtype, entry.rcode, entry.outcome)] += entry.hits

    def explain(self, network: str, name: str, qtype: int | str = "A",
                client: str | None = None) -> Explanation:
        return self.table.explain(network, name, qtype, client)

    async def lookup(self, network: str, name: str, qtype: int | str = "A",
                     client: str | None = None) -> Explanation:
        """``explain``, and for a forwarded name the upstream's actual answer."""
        found = self.explain(network, name, qtype, client)
        if found.resolution.outcome != "forward":
            return found
        query = build_query(found.name, qtype_value(found.qtype))
        result = await self.forwarder.forward(query, query[12:], found.resolution.upstreams)
        tried = "; ".join(f"{u}: {what}" for u, what in result.tried)
        if result.response is None:
            return _replace(found, error=f"no upstream answered ({tried})")
        try:
            msg, records = parse_records(result.response)
        except WireError as exc:
            return _replace(found, error=f"unreadable answer from {result.upstream}: {exc}")
        lines = tuple(str(r) for r in records if r.section == "answer")
        return _replace(found, response=(f"rcode {rcode_name(msg.rcode)}", *lines),
                        upstream=str(result.upstream))

    # --- listeners ---------------------------------------------------------------------------

    @property
    def listeners(self) -> list[ListenAddress]:
        """Where it listens (ports as bound: a requested port 0 shows the real one)."""
        return sorted(listener.bound for listener in self._listeners.values())

    async def add_listener(self, key: ListenAddress) -> ListenAddress:
        """Listen (UDP and TCP) on ``key.address``:``key.port``; idempotent. Port 0 picks a free
        port (the same for UDP and TCP); the key returned carries it. Raises DataplaneError."""
        found = self._find(key)
        if found is not None:
            return found.bound
        udp_sock, tcp_sock = bind_sockets(key, self.options.reuse_port)
        bound = replace(key, port=udp_sock.getsockname()[1])
        loop = asyncio.get_running_loop()
        try:
            proto = _UdpListener(self, key)
            transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=udp_sock)
            listener = _Listener(key, bound, proto, transport, None)  # type: ignore[arg-type]
            listener.tcp = await asyncio.start_server(
                lambda r, w: self._tcp_connection(listener, r, w), sock=tcp_sock,
                limit=MAX_TCP_MESSAGE + 2)
        except BaseException:
            udp_sock.close()
            tcp_sock.close()
            raise
        self._listeners[key] = listener
        self._refresh_exclusions()
        log.info("dns: listening on %s:%s for network %s", key.address, bound.port, key.network)
        return bound

    def _find(self, key: ListenAddress) -> _Listener | None:
        found = self._listeners.get(key)
        if found is None:
            found = next((li for li in self._listeners.values() if li.bound == key), None)
        return found

    async def remove_listener(self, key: ListenAddress) -> None:
        """Stop listening there (``key`` as requested or as returned by ``add_listener``);
        other listeners are not touched. Tolerates "not found"."""
        listener = self._find(key)
        if listener is None:
            return
        del self._listeners[listener.key]
        listener.transport.close()
        listener.tcp.close()
        for task in list(listener.connections):
            task.cancel()
        await asyncio.gather(*listener.connections, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.tcp.wait_closed(), 1.0)
        self._refresh_exclusions()

    async def set_listeners(self, wanted: Iterable[ListenAddress]) -> list[str]:
        """Level-triggered: listen exactly on ``wanted``. Returns one message per failure and
        keeps going (the next call retries what failed)."""
        target = set(wanted)
        errors: list[str] = []
        for key in [k for k in self._listeners if k not in target]:
            await self.remove_listener(key)
        for key in sorted(target - set(self._listeners)):
            try:
                await self.add_listener(key)
            except (DataplaneError, OSError) as exc:
                errors.append(f"{key.address}:{key.port} ({key.network}): {exc}")
        return errors

    def _refresh_exclusions(self) -> None:
        self.forwarder.exclude((li.bound.address, li.bound.port)
                               for li in self._listeners.values())

    # --- answering ---------------------------------------------------------------------------

    def _udp_slow(self, listener: _UdpListener, data: bytes, addr: Any) -> None:
        started = time.perf_counter()
        try:
            view = listener.clients.get(addr[0], listener.default)
            self._counts["udp"] += 1
            reply = self._prepare(data, view, udp=True, cache_key=data[2:], started=started)
            if isinstance(reply, bytes):
                if reply and listener.transport is not None:
                    listener.transport.sendto(reply, addr)
            elif reply is not None:
                self._spawn(self._forward_udp(listener, reply, addr))
        except Exception:  # a bug must not take the listener down with it
            self._counts["internal_errors"] += 1
            log.exception("dns: failed to answer a UDP query from %s", addr)

    async def _forward_udp(self, listener: _UdpListener, job: _Forward, addr: Any) -> None:
        reply = await self._forward(job, tcp=False)
        if listener.transport is not None and not listener.transport.is_closing():
            listener.transport.sendto(reply, addr)

    def _prepare(self, data: bytes, view: View, *, udp: bool, cache_key: bytes | None = None,
                 started: float | None = None) -> bytes | _Forward | None:
        """The immediate reply, a forwarding job, or None (drop); ``started``: when the query
        arrived (``time.perf_counter()``; None: now)."""
        started = time.perf_counter() if started is None else started
        try:
            msg = parse_message(data)
        except WireError as exc:
            self._counts["malformed"] += 1
            if exc.header is None or exc.header[1] & QR:
                return None
            return error_response(exc.header[0], exc.header[1], Rcode.FORMERR)
        refusal = self._refusal(msg, started)
        if refusal is not None:
            return refusal
        q = msg.question
        assert q is not None
        resolution = self.table.resolve(view, q.name, q.qtype, q.qclass, q.opaque)
        self._outcomes[resolution.outcome] += 1
        if resolution.outcome == "forward":
            if len(self._tasks) >= self.options.max_inflight:
                self._counts["overload"] += 1
                return self._count(msg, response(msg, Rcode.SERVFAIL, aa=False), started)
            return _Forward(msg, data[:msg.size], resolution, started)  # without trailing bytes
        bodies = self._render(msg, resolution, view, udp)
        if udp and cache_key is not None and msg.size == len(data):
            cached = _Cached([b[2:] for b in bodies], qtype_name(q.qtype),
                             rcode_name(resolution.rcode), resolution.outcome)
            self._cache_entries += 1
            if self._cache_entries > MAX_CACHE:
                self._retire(self.table, clear=True)
            view.wire_cache[cache_key] = cached
            reply = data[:2] + cached.next_body()
        else:
            reply = bodies[0]
        self._answered(qtype_name(q.qtype), rcode_name(resolution.rcode), started)
        return reply

    def _refusal(self, msg: Message, started: float) -> bytes | None:
        """A reply for queries we do not serve (or b"" to drop), None for the rest."""
        if msg.is_response:
            self._counts["responses_dropped"] += 1
            return b""
        if msg.opcode != 0:
            return self._count(msg, error_response(msg.id, msg.flags, Rcode.NOTIMP), started)
        if msg.question is None:
            return self._count(msg, error_response(msg.id, msg.flags, Rcode.FORMERR), started)
        if msg.question.qtype in ZONE_TRANSFERS:
            return self._count(msg, response(msg, Rcode.REFUSED, aa=False), started)
        if msg.edns is not None and msg.edns.version > 0:
            return self._count(msg, response(msg, Rcode.BADVERS, aa=False), started,
                               Rcode.BADVERS)
        return None

    def _count(self, msg: Message, reply: bytes, started: float,
               rcode: int | None = None) -> bytes:
        qtype = qtype_name(msg.question.qtype) if msg.question else "NONE"
        if rcode is None:
            rcode = (reply[3] & 0x0F) if len(reply) > 3 else 0
        self._answered(qtype, rcode_name(rcode), started)
        return reply

    def _answered(self, qtype: str, rcode: str, started: float) -> None:
        key = (qtype, rcode)
        self._answers[key] += 1
        h = self._latency.get(key)
        if h is None:
            h = self._latency[key] = Histogram(QUERY_BUCKETS)
        h.observe(time.perf_counter() - started)

    def _render(self, msg: Message, res: Resolution, view: View, udp: bool) -> list[bytes]:
        """The response, and for round-robin answers one per rotation."""
        ttl = self.table.settings.ttl
        limit = msg.udp_limit if udp else MAX_TCP_MESSAGE
        authority = [soa_rr(res.zone, ttl, view.serial)] if res.zone and \
            res.outcome in ("nodata", "nxdomain") else []
        aa = res.outcome in ("answer", "nodata", "nxdomain")
        if res.soa:
            answers = [soa_rr(res.zone, ttl, view.serial)]
        elif res.targets:
            answers = [ptr_rr(t, ttl) for t in res.targets]
        else:
            answers = [address_rr(a, ttl) for a in res.addresses]
        count = len(answers) if res.addresses else 1
        rotations = min(count, MAX_ROTATIONS)
        out = []
        for i in range(rotations):
            start = i * count // rotations
            rotated = answers[start:] + answers[:start]
            out.append(response(msg, res.rcode, rotated, authority, aa=aa, ra=view.forward,
                                limit=limit))
        return out

    async def _forward(self, job: _Forward, tcp: bool) -> bytes:
        msg = job.msg
        assert msg.question is not None
        result = await self.forwarder.forward(job.data, msg.question.raw, job.resolution.upstreams)
        reply = result.response
        if reply is None:
            self._counts["forward_servfail"] += 1
            return self._count(msg, response(msg, Rcode.SERVFAIL, aa=False), job.started)
        if not tcp and len(reply) > msg.udp_limit:
            self._counts["truncated_for_client"] += 1
            reply = truncated_copy(reply, msg)
        return self._count(msg, reply, job.started)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- TCP ---------------------------------------------------------------------------------

    async def _tcp_connection(self, listener: _Listener, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(listener.connections) >= self.options.max_connections:
            self._counts["tcp_rejected"] += 1
            writer.close()
            return
        listener.connections.add(task)
        self._counts["tcp_connections"] += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:  # bound what one connection can park in the kernel
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TCP_SNDBUF)
        try:
            await self._tcp_session(listener, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            self._counts["internal_errors"] += 1
            log.exception("dns: TCP session failed")
        finally:
            listener.connections.discard(task)
            writer.close()

    async def _tcp_session(self, listener: _Listener, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        opts = self.options
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else None
        pending: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(opts.max_pipelined)
        try:
            while not writer.is_closing():
                frame = await self._read_frame(reader)
                if frame is None:
                    break
                started = time.perf_counter()
                view = self.table.view(listener.key.network, client)
                self._counts["tcp"] += 1
                reply = self._prepare(frame, view, udp=False, started=started)
                if isinstance(reply, bytes):
                    if reply:
                        await self._tcp_write(writer, reply)
                elif reply is not None:
                    await slots.acquire()
                    job = self._spawn(self._tcp_forward(reply, writer, slots))
                    pending.add(job)
                    job.add_done_callback(pending.discard)
        finally:
            for job in pending:
                job.cancel()

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes | None:
        opts = self.options
        try:
            async with asyncio.timeout(opts.idle_timeout):
                head = await reader.readexactly(2)
        except TimeoutError:
            self._counts["tcp_idle_closed"] += 1
            return None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self._counts["tcp_partial_frames"] += 1
            return None  # the client closed
        (size,) = _LEN.unpack(head)
        if size == 0 or size > opts.max_query:
            self._counts["tcp_bad_frames"] += 1
            return None
        try:
            async with asyncio.timeout(opts.frame_timeout):
                return await reader.readexactly(size)
        except (TimeoutError, asyncio.IncompleteReadError):
            self._counts["tcp_partial_frames"] += 1
            return None

    async def _tcp_forward(self, job: _Forward, writer: asyncio.StreamWriter,
                           slots: asyncio.Semaphore) -> None:
        try:
            reply = await self._forward(job, tcp=True)
            await self._tcp_write(writer, reply)
        finally:
            slots.release()

    async def _tcp_write(self, writer: asyncio.StreamWriter, reply: bytes) -> None:
        if writer.is_closing():
            return
        writer.write(_LEN.pack(len(reply)) + reply)
        transport = writer.transport
        if transport.get_write_buffer_size() > self.options.max_write_buffer:
            self._counts["tcp_slow_readers"] += 1
            transport.abort()
            return
        try:
            async with asyncio.timeout(self.options.write_timeout):
                await writer.drain()
        except TimeoutError:
            self._counts["tcp_slow_readers"] += 1
            transport.abort()

    # --- visibility --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters as plain data (JSON-ready; a Prometheus collector can map them 1:1)."""
        answers: Counter[tuple[str, str]] = Counter(self._answers)
        outcomes: Counter[str] = Counter(self._outcomes)
        fast = 0
        hits: Counter[tuple[str, str, str]] = Counter(self._retired_hits)
        for view in self.table.views():
            for entry in view.wire_cache.values():
                if entry.hits:
                    hits[(entry.qtype, entry.rcode, entry.outcome)] += entry.hits
        for (qtype, rcode, outcome), n in hits.items():
            answers[(qtype, rcode)] += n
            outcomes[outcome] += n
            fast += n
        latency = self._latency_stats(hits)
        c = self._counts
        return {
            "queries": {"udp": c["udp"] + fast, "tcp": c["tcp"], "fast_path": fast,
                        "total": c["udp"] + fast + c["tcp"]},
            "responses": nested(answers),  # qtype -> rcode -> count
            "latency": latency,  # qtype -> rcode -> histogram (seconds)
            "outcomes": dict(sorted(outcomes.items())),
            "dropped": {"malformed": c["malformed"], "responses": c["responses_dropped"],
                        "overload": c["overload"], "internal_errors": c["internal_errors"],
                        "udp_errors": c["udp_errors"]},
            "tcp": {k: c[f"tcp_{k}"] for k in ("connections", "rejected", "idle_closed",
                                                "bad_frames", "partial_frames", "slow_readers")},
            "forwarding": {"in_flight": len(self._tasks), "servfail": c["forward_servfail"],
                           "truncated_for_client": c["truncated_for_client"]},
            "upstreams": self.forwarder.stats(),
            "table": {"generation": self.table.generation, "records": self.table.record_count(),
                      "networks": len(self.table.networks)},
            "listeners": [f"{k.network} {k.address}:{k.port}" for k in self.listeners],
        }


    def _latency_stats(self, hits: Counter[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
        """Each (type, rcode)'s histogram, the fast path's answers in its lowest bucket."""
        merged = {k: Histogram(h.bounds, list(h.counts), h.total, h.count)
                  for k, h in self._latency.items()}
        for (qtype, rcode, _), n in hits.items():
            h = merged.get((qtype, rcode))
            if h is None:
                h = merged[(qtype, rcode)] = Histogram(QUERY_BUCKETS)
            h.counts[0] += n
            h.count += n
        out: dict[str, dict[str, Any]] = {}
        for (qtype, rcode), h in sorted(merged.items()):
            out.setdefault(qtype, {})[rcode] = h.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class _Forward:
    msg: Message
    data: bytes
    resolution: Resolution
    started: float  # when the query arrived (``time.perf_counter()``)


def _replace(found: Explanation, **changes: Any) -> Explanation:
    return replace(found, **changes)


# --- sockets ---------------------------------------------------------------------------------


def bind_sockets(key: ListenAddress, reuse_port: bool) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same address and port, in ``key.netns`` if given.

    IP_FREEBIND lets the agent listen before the reconciler has put the gateway address on the
    bridge (and keep listening while the bridge is recreated).
    """

    def make() -> tuple[socket.socket, socket.socket]:
        for _ in range(8 if key.port == 0 else 1):
            udp = _socket(key, socket.SOCK_DGRAM, reuse_port)
            try:
                udp.bind((key.address, key.port))
                tcp = _socket(key, socket.SOCK_STREAM, reuse_port)
                try:
                    tcp.bind((key.address, udp.getsockname()[1]))
                    tcp.listen(128)
                except OSError as exc:
                    tcp.close()
                    if exc.errno == errno.EADDRINUSE and key.port == 0:
                        udp.close()
                        continue
                    raise
            except BaseException:
                udp.close()
                raise
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    try:
        return run_in_netns(key.netns, make) if key.netns else make()
    except OSError as exc:
        raise DataplaneError(f"cannot listen on {key.address}:{key.port}: {exc}") from exc


def _socket(key: ListenAddress, kind: int, reuse_port: bool) -> socket.socket:
    v6 = ":" in key.address
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_addresses(table: RecordTable, port: int = DNS_PORT,
                     netns: str = "") -> list[ListenAddress]:
    """Every listener the table's DNS-enabled networks need (gateways, ``port``)."""
    return [ListenAddress(net, str(ip), port, netns)
            for net, ips in table.listen_addresses().items() for ip in ips]


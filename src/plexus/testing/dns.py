"""Test doubles for the DNS server, shipped as real code: a stub upstream resolver.

``StubUpstream`` answers over UDP and TCP from a dict of names to addresses and can play the
failure modes forwarding must survive: ``drop`` (a dead upstream: silence, so the caller times
out), ``refuse`` (REFUSED), ``servfail``, ``truncate`` (TC over UDP, the full answer over TCP),
and ``delay`` seconds before each answer. Nothing here leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from plexus.dns.config import Upstream
from plexus.dns.server import ListenAddress, bind_sockets
from plexus.dns.wire import (
    QType,
    Rcode,
    WireError,
    address_rr,
    parse_message,
    response,
)
from plexus.model.types import Endpoint, Network, Subnet

Mode = Literal["answer", "drop", "refuse", "servfail", "truncate"]
_LEN = struct.Struct("!H")


@dataclass
class StubUpstream:
    address: str = "127.0.0.1"
    port: int = 0
    records: Mapping[str, Sequence[str]] = field(default_factory=dict)
    mode: Mode = "answer"
    delay: float = 0.0
    ttl: int = 30
    netns: str = ""  # serve inside this network namespace (a path), e.g. an "outside world"
    queries: list[tuple[str, str, int]] = field(default_factory=list)  # (proto, name, qtype)
    _udp: asyncio.DatagramTransport | None = None
    _tcp: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def upstream(self) -> Upstream:
        return Upstream(ipaddress.ip_address(self.address), self.port)

    async def start(self) -> Upstream:
        """Start serving (idempotent) and return where."""
        if self._udp is not None:
            return self.upstream
        loop = asyncio.get_running_loop()
        stub = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                stub._udp = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, addr: Any) -> None:
                task = loop.create_task(stub._answer_udp(data, addr))
                stub._tasks.add(task)
                task.add_done_callback(stub._tasks.discard)

        udp, tcp = bind_sockets(ListenAddress("stub", self.address, self.port, self.netns), False)
        self.port = udp.getsockname()[1]
        await loop.create_datagram_endpoint(Proto, sock=udp)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)
        return self.upstream

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1)

    async def __aenter__(self) -> StubUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def reply(self, data: bytes, proto: str) -> bytes | None:
        try:
            msg = parse_message(data)
        except WireError:
            return None
        q = msg.question
        if q is None:
            return None
        self.queries.append((proto, q.name, q.qtype))
        if self.mode == "drop":
            return None
        if self.mode in ("refuse", "servfail"):
            rcode = Rcode.REFUSED if self.mode == "refuse" else Rcode.SERVFAIL
            return response(msg, rcode, aa=False)
        addresses = [ipaddress.ip_address(a) for a in self.records.get(q.name, ())]
        want = 4 if q.qtype == QType.A else 6 if q.qtype == QType.AAAA else 0
        answers = [address_rr(a, self.ttl) for a in addresses if a.version == want]
        rcode = Rcode.NOERROR if q.name in self.records else Rcode.NXDOMAIN
        full = response(msg, rcode, answers, aa=False)
        return _truncated(full) if self.mode == "truncate" and proto == "udp" else full

    async def _answer_udp(self, data: bytes, addr: Any) -> None:
        reply = self.reply(data, "udp")
        if reply is None:
            return
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._udp is not None and not self._udp.is_closing():
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(5):
                    (size,) = _LEN.unpack(await reader.readexactly(2))
                    data = await reader.readexactly(size)
                reply = self.reply(data, "tcp")
                if reply is None:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(_LEN.pack(len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _truncated(full: bytes) -> bytes:
    """The header and question of ``full`` with TC set: what a server sends when the answer does
    not fit in UDP."""
    msg = parse_message(full)
    q = msg.question.raw if msg.question else b""
    ident, flags = struct.unpack_from("!HH", full)
    return struct.pack("!HHHHHH", ident, flags | 0x0200, 1, 0, 0, 0) + q


# --- record-set builders ---------------------------------------------------------------------


def network(name: str, cidr: str = "10.1.0.0/24", *more: str, internal: bool = False,
            options: Mapping[str, str] | None = None) -> Network:
    """A network whose subnets' gateways are their first host address."""
    subnets = []
    for text in (cidr, *more):
        net = ipaddress.ip_network(text)
        subnets.append(Subnet(net, ipaddress.ip_address(net.network_address + 1)))
    return Network(name, f"id-{name}", subnets=tuple(subnets), internal=internal,
                   ipv6=any(s.version == 6 for s in subnets), options=dict(options or {}))


def endpoint(name: str, network: str, *addresses: str, aliases: Sequence[str] = (),
             namespace: str = "", container_id: str = "", ifname: str = "") -> Endpoint:
    """An endpoint of container ``name`` (its ID derived from the name unless given). The
    interface name defaults to one per network, so that a container on two networks has two
    endpoints with keys of their own, as it would (eth0 and eth1)."""
    cid = container_id or hashlib.sha256(name.encode()).hexdigest()
    ifname = ifname or f"eth-{network}"
    ifaces = tuple(ipaddress.ip_interface(a if "/" in a else f"{a}/{24 if ':' not in a else 64}")
                   for a in addresses)
    return Endpoint(cid, ifname, network, "node1", "", addresses=ifaces, name=name,
                    aliases=tuple(aliases), namespace=namespace, state="ready")

"""The DNS server end to end inside the sandbox: listeners on bridge gateways, queries from
container namespaces (dnspython and glibc's own resolver), stub upstreams in an "outside"
namespace — one dead, one alive — for failover, TCP fallback, SERVFAIL and internal networks.

Layout (all inside tests/sandbox; the sandbox's own namespace plays the host):

    host:     pxdnsit0 10.77.0.1/24 (network "front")   pxdnsit1 10.78.0.1/24 ("secret", --internal)
              veth to "dnsout" 10.79.0.1/24
    dnsc1:    10.77.0.10 on front      dnsc2: 10.78.0.10 on secret
    dnsout:   10.79.0.53 (alive stub), 10.79.0.54 (dead stub: drops), 10.79.0.55 (truncates)
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode
import pytest

from plexus.dataplane.netns import run_in_netns
from plexus.dns.config import DnsSettings, Upstream
from plexus.dns.model import DnsChanges
from plexus.dns.records import RecordTable, store_key
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions
from plexus.dns.service import DnsService
from plexus.dns.upstream import ForwardOptions
from plexus.model.types import Endpoint, Network
from plexus.testing.dns import StubUpstream, endpoint, network
from tests.harness.world import sh

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(90)]

FRONT_GW, SECRET_GW = "10.77.0.1", "10.78.0.1"
ALIVE, DEAD, TRUNC = "10.79.0.53", "10.79.0.54", "10.79.0.55"
NS = {"dnsc1": ("pxdnsit0", "10.77.0.10"), "dnsc2": ("pxdnsit1", "10.78.0.10")}
OPTIONS = ServerOptions(forward=ForwardOptions(timeout=0.4, deadline=1.5, health_interval=0.5,
                                               health_timeout=0.3))


def netns(name: str) -> str:
    return f"/run/netns/{name}"


@pytest.fixture(scope="module")
def topology() -> Iterator[None]:
    for bridge, gw in (("pxdnsit0", FRONT_GW), ("pxdnsit1", SECRET_GW)):
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{gw}/24", "dev", bridge)
        sh("ip", "link", "set", bridge, "up")
    for ns, (bridge, addr) in NS.items():
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{ns}-h", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", f"{ns}-h", "master", bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "netns", "add", "dnsout")
    sh("ip", "link", "add", "dnsout-h", "type", "veth", "peer", "name", "eth0", "netns", "dnsout")
    sh("ip", "addr", "add", "10.79.0.1/24", "dev", "dnsout-h")
    sh("ip", "link", "set", "dnsout-h", "up")
    for addr in (ALIVE, DEAD, TRUNC):
        sh("ip", "-n", "dnsout", "addr", "add", f"{addr}/24", "dev", "eth0")
    sh("ip", "-n", "dnsout", "link", "set", "eth0", "up")
    sh("ip", "-n", "dnsout", "link", "set", "lo", "up")
    yield
    for name in ("dnsc1", "dnsc2", "dnsout"):
        sh("ip", "netns", "del", name, check=False)
    for link in ("pxdnsit0", "pxdnsit1", "dnsout-h"):
        sh("ip", "link", "del", link, check=False)


@dataclass
class Upstreams:
    alive: StubUpstream
    dead: StubUpstream
    trunc: StubUpstream


@pytest.fixture
async def upstreams(topology: None) -> AsyncIterator[Upstreams]:
    many = [f"198.51.100.{i}" for i in range(1, 71)]
    stubs = Upstreams(
        StubUpstream(ALIVE, 53, {"example.com": ["198.51.100.7"]}, netns=netns("dnsout")),
        StubUpstream(DEAD, 53, mode="drop", netns=netns("dnsout")),
        StubUpstream(TRUNC, 53, {"big.example": many}, mode="truncate", netns=netns("dnsout")),
    )
    for stub in (stubs.alive, stubs.dead, stubs.trunc):
        await stub.start()
    try:
        yield stubs
    finally:
        for stub in (stubs.alive, stubs.dead, stubs.trunc):
            await stub.close()


def networks(upstreams: str = "") -> list[Network]:
    opts = {"dns_upstreams": upstreams} if upstreams else {}
    return [network("front", "10.77.0.0/24", options=opts),
            network("secret", "10.78.0.0/24", internal=True)]


def containers() -> list[Endpoint]:
    return [endpoint("client", "front", "10.77.0.10"),
            endpoint("web", "front", "10.77.0.20", aliases=["www"], namespace="shop"),
            *[endpoint(f"api{i}", "front", f"10.77.0.{30 + i}", aliases=["api"])
              for i in range(3)],
            endpoint("vault", "secret", "10.78.0.20"), endpoint("client2", "secret", "10.78.0.10")]


def up(addr: str) -> Upstream:
    return Upstream(ipaddress.ip_address(addr))


async def query(ns: str, server: str, name: str, qtype: str = "A", tcp: bool = False,
                timeout: float = 3.0, **kw: object) -> dns.message.Message:
    """From inside container namespace ``ns``: the answer (TimeoutError if none came)."""
    q = dns.message.make_query(name, qtype, **kw)  # type: ignore[arg-type]
    wire = q.to_wire()
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    sock = run_in_netns(netns(ns), lambda: socket.socket(socket.AF_INET, kind))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (server, 53))
            if tcp:
                await loop.sock_sendall(sock, struct.pack("!H", len(wire)) + wire)
                data = b""
                while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                    chunk = await loop.sock_recv(sock, 65535)
                    assert chunk, "connection closed"
                    data += chunk
                reply = data[2:]
            else:
                await loop.sock_sendall(sock, wire)
                reply = await loop.sock_recv(sock, 65535)
    finally:
        sock.close()
    r = dns.message.from_wire(reply)
    assert r.id == q.id
    return r


def addrs(r: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in r.answer for rd in rrset)


@pytest.fixture
async def server(upstreams: Upstreams) -> AsyncIterator[DnsServer]:
    table = RecordTable.build(networks(), containers(),
                              DnsSettings(upstreams=(up(DEAD), up(ALIVE))))
    srv = DnsServer(table, OPTIONS)
    await srv.start()
    errors = await srv.set_listeners([ListenAddress("front", FRONT_GW, 53),
                                      ListenAddress("secret", SECRET_GW, 53)])
    assert errors == []
    try:
        yield srv
    finally:
        await srv.close()


# --- names ----------------------------------------------------------------------------------


async def test_container_resolves_names_over_udp_and_tcp(server: DnsServer) -> None:
    for name in ("web", "www.front", "web.shop", "www.front.plexus.internal"):
        r = await query("dnsc1", FRONT_GW, name)
        assert addrs(r) == ["10.77.0.20"], name
        assert r.flags & dns.flags.AA
    r = await query("dnsc1", FRONT_GW, "api", tcp=True)
    assert addrs(r) == ["10.77.0.30", "10.77.0.31", "10.77.0.32"]
    r = await query("dnsc1", FRONT_GW, "20.0.77.10.in-addr.arpa", "PTR")
    assert [rd.to_text() for rd in r.answer[0]] == ["web.front.plexus.internal."]


async def test_names_do_not_cross_networks(server: DnsServer,
                                           upstreams: Upstreams) -> None:
    r = await query("dnsc2", SECRET_GW, "vault")
    assert addrs(r) == ["10.78.0.20"]
    r = await query("dnsc2", SECRET_GW, "web")  # on front only; secret is internal
    assert r.rcode() == dns.rcode.REFUSED
    r = await query("dnsc1", FRONT_GW, "vault.secret.plexus.internal")
    assert r.rcode() == dns.rcode.NXDOMAIN


async def test_glibc_resolver_in_a_container(server: DnsServer) -> None:
    etc = "/etc/netns/dnsc1"
    os.makedirs(etc, exist_ok=True)
    with open(f"{etc}/resolv.conf", "w") as f:
        f.write(f"nameserver {FRONT_GW}\nsearch plexus.internal\noptions timeout:1 attempts:1\n")
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", "dnsc1", "getent", "ahostsv4", "www",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    assert "10.77.0.20" in out.decode()


async def test_records_update_while_serving(server: DnsServer) -> None:
    sockets_before = [li.transport for li in server._listeners.values()]
    r = await query("dnsc1", FRONT_GW, "newcomer")
    assert r.rcode() == dns.rcode.NXDOMAIN  # not ours: forwarded, and the upstream has none
    server.update(RecordTable.build(
        networks(), [*containers(), endpoint("newcomer", "front", "10.77.0.99")],
        DnsSettings(upstreams=(up(ALIVE),))))
    r = await query("dnsc1", FRONT_GW, "newcomer")
    assert addrs(r) == ["10.77.0.99"]
    server.update(RecordTable.build(networks(), containers()[:1], DnsSettings()))
    r = await query("dnsc1", FRONT_GW, "web.plexus.internal")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert [li.transport for li in server._listeners.values()] == sockets_before


# --- forwarding -----------------------------------------------------------------------------


async def test_failover_from_a_dead_upstream_costs_one_timeout_once(
        server: DnsServer, upstreams: Upstreams) -> None:
    for _ in range(6):
        r = await query("dnsc1", FRONT_GW, "example.com")
        assert addrs(r) == ["198.51.100.7"] and not r.flags & dns.flags.AA
    stats = server.stats()["upstreams"]
    assert stats[f"{DEAD}:53"]["healthy"] is False
    assert stats[f"{ALIVE}:53"]["answers"] >= 6
    # Asked first, the dead one costs one timeout, once: then it is marked down and asked last
    # (never, here). Not at all if the health check found it dead before the first query.
    asked_dead = [q for q in upstreams.dead.queries if q[1] == "example.com"]
    assert len(asked_dead) <= 1, asked_dead


async def test_truncated_upstream_answers_fall_back_to_tcp(server: DnsServer,
                                                           upstreams: Upstreams) -> None:
    server.update(RecordTable.build(networks(upstreams=TRUNC), containers(), DnsSettings()))
    r = await query("dnsc1", FRONT_GW, "big.example", tcp=True)
    assert len(r.answer[0]) == 70
    r = await query("dnsc1", FRONT_GW, "big.example", use_edns=0, payload=1232)
    assert len(r.answer[0]) == 70 and not r.flags & dns.flags.TC
    r = await query("dnsc1", FRONT_GW, "big.example")  # plain 512-byte UDP: TC, retry TCP
    assert r.flags & dns.flags.TC
    assert [p for p, *_ in upstreams.trunc.queries] == ["udp", "tcp"] * 3


async def test_servfail_when_no_upstream_answers(server: DnsServer) -> None:
    server.update(RecordTable.build(networks(upstreams=f"{DEAD},10.79.0.99"), containers(),
                                    DnsSettings()))
    r = await query("dnsc1", FRONT_GW, "example.com")  # an answer, within its 1.5 s deadline
    assert r.rcode() == dns.rcode.SERVFAIL
    r = await query("dnsc1", FRONT_GW, "web")  # local names are unaffected
    assert addrs(r) == ["10.77.0.20"]


async def test_internal_network_never_forwards(server: DnsServer, upstreams: Upstreams) -> None:
    before = len(upstreams.alive.queries) + len(upstreams.dead.queries)
    r = await query("dnsc2", SECRET_GW, "example.com")
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.RA
    r = await query("dnsc2", SECRET_GW, "example.com", tcp=True)
    assert r.rcode() == dns.rcode.REFUSED
    assert len(upstreams.alive.queries) + len(upstreams.dead.queries) == before


# --- listeners ------------------------------------------------------------------------------


async def test_listener_may_start_before_the_gateway_address_exists(topology: None) -> None:
    table = RecordTable.build([network("late", "10.77.9.0/24")],
                              [endpoint("x", "late", "10.77.9.5")], DnsSettings())
    async with DnsServer(table) as srv:
        await srv.add_listener(ListenAddress("late", "10.77.9.1", 53))  # IP_FREEBIND
        sh("ip", "addr", "add", "10.77.9.1/24", "dev", "pxdnsit0")
        sh("ip", "-n", "dnsc1", "addr", "add", "10.77.9.10/24", "dev", "eth0")
        try:
            r = await query("dnsc1", "10.77.9.1", "x")
            assert addrs(r) == ["10.77.9.5"]
        finally:
            sh("ip", "-n", "dnsc1", "addr", "del", "10.77.9.10/24", "dev", "eth0")
            sh("ip", "addr", "del", "10.77.9.1/24", "dev", "pxdnsit0")


async def test_listener_inside_another_namespace(topology: None) -> None:
    sh("ip", "-n", "dnsout", "addr", "add", "10.79.0.60/24", "dev", "eth0")
    table = RecordTable.build([network("front", "10.77.0.0/24")],
                              [endpoint("web", "front", "10.77.0.20")], DnsSettings())
    try:
        async with DnsServer(table) as srv:
            await srv.add_listener(ListenAddress("front", "10.79.0.60", 53, netns("dnsout")))
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # from the host side
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, ("10.79.0.60", 53))
                await loop.sock_sendall(sock, dns.message.make_query("web", "A").to_wire())
                async with asyncio.timeout(3):
                    r = dns.message.from_wire(await loop.sock_recv(sock, 4096))
            finally:
                sock.close()
            assert addrs(r) == ["10.77.0.20"]
    finally:
        sh("ip", "-n", "dnsout", "addr", "del", "10.79.0.60/24", "dev", "eth0")


# --- worker processes -----------------------------------------------------------------------


async def test_worker_processes_serve_changes_and_are_restarted(upstreams: Upstreams) -> None:
    service = DnsService(DnsSettings(upstreams=(up(ALIVE),)), workers=2, options=OPTIONS)
    await service.start()
    try:
        service.update(networks(), containers())
        assert await service.sync_listeners() == []
        r = await query("dnsc1", FRONT_GW, "web")
        assert addrs(r) == ["10.77.0.20"]
        r = await query("dnsc1", FRONT_GW, "example.com")
        assert addrs(r) == ["198.51.100.7"]
        late = endpoint("late", "front", "10.77.0.77")  # only the change goes to the workers
        service.apply(DnsChanges(endpoints={store_key(late): late}))
        async with asyncio.timeout(5):  # every worker has it (each query may hit another one)
            while True:
                results = [await query("dnsc1", FRONT_GW, "late") for _ in range(6)]
                if all(addrs(r) == ["10.77.0.77"] for r in results):
                    break
                await asyncio.sleep(0.05)
        stats = await service.stats()
        pids = stats["workers"]["pids"]
        assert len(pids) == 2 and stats["queries"]["total"] >= 8
        os.kill(pids[0], 9)
        async with asyncio.timeout(10):
            while (await service.stats())["workers"]["restarts"] < 1 or \
                    len((await service.stats())["workers"]["pids"]) < 2:
                await asyncio.sleep(0.1)
        for _ in range(6):  # whichever worker the kernel picks, it knows the names
            r = await query("dnsc1", FRONT_GW, "late")
            assert addrs(r) == ["10.77.0.77"]
        explained = await service.lookup("front", "example.com")
        assert explained.upstream == f"{ALIVE}:53"
    finally:
        await service.close()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids[1:])

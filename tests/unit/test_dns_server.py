"""The DNS server on loopback (no root needed): answers, the fast path, live updates, listeners,
EDNS and truncation, counters, forwarding with stub upstreams (failover, TCP fallback,
SERVFAIL), explain/lookup. dnspython checks every answer independently."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from plexus.dns.config import DnsSettings, Upstream
from plexus.dns.records import RecordTable
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions, listen_addresses
from plexus.dns.service import DnsService
from plexus.dns.upstream import ForwardOptions
from plexus.model.types import Endpoint, Network
from plexus.testing.dns import StubUpstream, endpoint, network

pytestmark = pytest.mark.timeout(60)

NETS = [network("front", "127.0.0.0/8"), network("back", "10.2.0.0/24"),
        network("secret", "10.3.0.0/24", internal=True)]
FAST = ForwardOptions(timeout=0.3, deadline=1.5, health_interval=0.2, health_timeout=0.2)


def build(eps: list[Endpoint], nets: list[Network] | None = None,
          upstreams: tuple[Upstream, ...] = (), ttl: int = 5) -> RecordTable:
    return RecordTable.build(nets or NETS, eps, DnsSettings(ttl=ttl, upstreams=upstreams))


async def udp(port: int, wire: bytes, host: str = "127.0.0.1", source: str = "127.0.0.1",
              timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, wire)
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 65535)
    finally:
        sock.close()


async def tcp(port: int, wire: bytes, host: str = "127.0.0.1") -> bytes:
    async with asyncio.timeout(3):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(size)
        finally:
            writer.close()


async def ask(port: int, name: str, qtype: str = "A", via: str = "udp", **kw: object
              ) -> dns.message.Message:
    q = dns.message.make_query(name, qtype, **kw)  # type: ignore[arg-type]
    wire = await (udp(port, q.to_wire()) if via == "udp" else tcp(port, q.to_wire()))
    r = dns.message.from_wire(wire)
    assert r.id == q.id
    return r


def addrs(r: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in r.answer for rd in rrset]


@pytest.fixture
async def server() -> AsyncIterator[tuple[DnsServer, int]]:
    eps = [endpoint("web", "front", "127.0.1.10", aliases=["www"]),
           *[endpoint(f"api{i}", "front", f"127.0.2.{i}", aliases=["api"]) for i in range(1, 4)],
           endpoint("db", "back", "10.2.0.5"), endpoint("vault", "secret", "10.3.0.5")]
    srv = DnsServer(build(eps), ServerOptions(forward=FAST))
    await srv.start()
    key = await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))
    try:
        yield srv, key.port
    finally:
        await srv.close()


# --- answers --------------------------------------------------------------------------------


async def test_answers_a_name_authoritatively(server: tuple[DnsServer, int]) -> None:
    _, port = server
    r = await ask(port, "web")
    assert addrs(r) == ["127.0.1.10"]
    assert r.flags & dns.flags.AA and r.answer[0].ttl == 5
    r = await ask(port, "www.front.plexus.internal", via="tcp")
    assert addrs(r) == ["127.0.1.10"]


async def test_round_robin_rotates_per_query(server: tuple[DnsServer, int]) -> None:
    _, port = server
    firsts = []
    for _ in range(6):
        r = await ask(port, "api")
        assert sorted(addrs(r)) == ["127.0.2.1", "127.0.2.2", "127.0.2.3"]
        firsts.append(addrs(r)[0])
    assert set(firsts) == {"127.0.2.1", "127.0.2.2", "127.0.2.3"}
    assert firsts[0] != firsts[1]


async def test_fast_path_serves_repeats_and_keeps_the_question_case(
        server: tuple[DnsServer, int]) -> None:
    srv, port = server
    for name in ("web", "web", "WEB", "WEB"):
        r = await ask(port, name)
        assert r.question[0].name.to_text() == name + "."
        assert addrs(r) == ["127.0.1.10"]
    stats = srv.stats()
    assert stats["queries"]["fast_path"] == 2
    assert stats["responses"]["A"]["NOERROR"] == 4


async def test_negative_answers(server: tuple[DnsServer, int]) -> None:
    _, port = server
    nx = await ask(port, "nope.plexus.internal")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA
    assert nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].ttl == 5
    nodata = await ask(port, "web.plexus.internal", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    ptr = await ask(port, "10.1.0.127.in-addr.arpa", "PTR")
    assert addrs(ptr) == ["web.front.plexus.internal."]


async def test_update_swaps_records_without_touching_sockets(
        server: tuple[DnsServer, int]) -> None:
    srv, port = server
    listener = next(iter(srv._listeners.values()))
    before = listener.transport
    assert addrs(await ask(port, "web")) == ["127.0.1.10"]
    srv.update(build([endpoint("web", "front", "127.0.1.99"),
                      endpoint("new", "front", "127.0.1.50")]))
    assert addrs(await ask(port, "web")) == ["127.0.1.99"]  # not the cached old answer
    assert addrs(await ask(port, "new")) == ["127.0.1.50"]
    assert (await ask(port, "www.plexus.internal")).rcode() == dns.rcode.NXDOMAIN
    assert next(iter(srv._listeners.values())).transport is before
    assert srv.stats()["responses"]["A"]["NOERROR"] == 3  # the hit before the swap counts too


async def test_internal_network_refuses_to_forward(server: tuple[DnsServer, int]) -> None:
    srv, _ = server
    key = await srv.add_listener(ListenAddress("secret", "127.0.0.3", 0))
    q = dns.message.make_query("example.com", "A")
    r = dns.message.from_wire(await udp(key.port, q.to_wire(), host="127.0.0.3"))
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.RA
    q = dns.message.make_query("vault", "A")
    r = dns.message.from_wire(await udp(key.port, q.to_wire(), host="127.0.0.3"))
    assert addrs(r) == ["10.3.0.5"]


async def test_client_on_two_networks_resolves_both(server: tuple[DnsServer, int]) -> None:
    srv, port = server
    srv.update(build([endpoint("app", "front", "127.0.0.9"), endpoint("app", "back", "10.2.0.9"),
                      endpoint("db", "back", "10.2.0.5")]))
    q = dns.message.make_query("db", "A")
    r = dns.message.from_wire(await udp(port, q.to_wire(), source="127.0.0.9"))
    assert addrs(r) == ["10.2.0.5"]
    r = dns.message.from_wire(await udp(port, q.to_wire(), source="127.0.0.8"))
    assert r.rcode() == dns.rcode.SERVFAIL  # a stranger: forwarded, and no upstream is set


# --- protocol corner cases ------------------------------------------------------------------


async def test_truncation_over_udp_full_answer_over_tcp() -> None:
    eps = [endpoint(f"w{i}", "front", f"127.0.{3 + i // 200}.{1 + i % 200}", aliases=["many"])
           for i in range(120)]
    async with DnsServer(build(eps)) as srv:
        port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
        plain = await ask(port, "many")
        assert plain.flags & dns.flags.TC and 0 < len(addrs(plain)) < 120
        big = await ask(port, "many", use_edns=0, payload=4096)
        assert big.flags & dns.flags.TC and len(addrs(big)) > len(addrs(plain))
        assert len(addrs(await ask(port, "many", via="tcp"))) == 120


async def test_edns_is_answered_with_opt_and_badvers(server: tuple[DnsServer, int]) -> None:
    _, port = server
    r = await ask(port, "web", use_edns=0, payload=1232, want_dnssec=True)
    assert r.edns == 0 and r.ednsflags & dns.flags.DO and r.payload == 1232
    r = await ask(port, "web", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS and not r.answer


async def test_malformed_and_unsupported_queries(server: tuple[DnsServer, int]) -> None:
    srv, port = server
    # header readable, question broken: FORMERR with the same ID
    r = dns.message.from_wire(await udp(port, struct.pack("!HHHHHH", 77, 0x100, 1, 0, 0, 0)
                                        + b"\x09broken"))
    assert r.id == 77 and r.rcode() == dns.rcode.FORMERR
    q = dns.message.make_query("web", "A")
    q.set_opcode(dns.opcode.STATUS)
    assert dns.message.from_wire(await udp(port, q.to_wire())).rcode() == dns.rcode.NOTIMP
    axfr = dns.message.make_query("plexus.internal", "AXFR")
    assert dns.message.from_wire(await udp(port, axfr.to_wire())).rcode() == dns.rcode.REFUSED
    for junk in (b"", b"\x01", b"\x00" * 11):  # no header: silently dropped
        with pytest.raises(TimeoutError):
            await udp(port, junk, timeout=0.2)
    response = dns.message.make_response(dns.message.make_query("web", "A")).to_wire()
    with pytest.raises(TimeoutError):  # never answer a response (reflection loops)
        await udp(port, response, timeout=0.2)
    assert srv.stats()["dropped"]["responses"] == 1
    assert addrs(await ask(port, "web")) == ["127.0.1.10"]  # still serving


async def test_oversized_udp_datagram_is_survived(server: tuple[DnsServer, int]) -> None:
    _, port = server
    wire = dns.message.make_query("web", "A").to_wire()
    reply = await udp(port, wire + b"\x00" * 60000)
    assert addrs(dns.message.from_wire(reply)) == ["127.0.1.10"]  # trailing bytes ignored...
    reply = await udp(port, wire + b"\x00" * 60000)
    assert dns.message.from_wire(reply).id == dns.message.from_wire(wire).id


# --- listeners ------------------------------------------------------------------------------


async def test_listeners_come_and_go_without_disturbing_others() -> None:
    table = build([endpoint("web", "front", "127.0.1.10")])
    async with DnsServer(table) as srv:
        a = await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))
        b = await srv.add_listener(ListenAddress("front", "127.0.0.2", 0))
        assert await srv.add_listener(a) == a  # idempotent
        await srv.remove_listener(b)
        await srv.remove_listener(b)  # tolerates "not found"
        assert addrs(await ask(a.port, "web")) == ["127.0.1.10"]
        with pytest.raises(ConnectionRefusedError):  # the port is closed (ICMP), not just mute
            await udp(b.port, dns.message.make_query("web", "A").to_wire(), host="127.0.0.2",
                      timeout=0.3)
        assert srv.listeners == [a]


async def test_set_listeners_is_level_triggered_and_reports_failures() -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    taken = blocker.getsockname()[1]
    try:
        async with DnsServer(build([])) as srv:
            ok = await srv.add_listener(ListenAddress("front", "127.0.0.4", 0))
            errors = await srv.set_listeners([ok, ListenAddress("front", "127.0.0.1", taken)])
            assert len(errors) == 1 and str(taken) in errors[0]
            assert srv.listeners == [ok]
            assert await srv.set_listeners([]) == [] and srv.listeners == []
    finally:
        blocker.close()


def test_listen_addresses_from_the_table() -> None:
    table = build([])
    keys = listen_addresses(table, port=5353)
    assert ListenAddress("front", "127.0.0.1", 5353) in keys
    assert all(k.port == 5353 for k in keys) and len(keys) == 3


# --- forwarding -----------------------------------------------------------------------------


async def test_forwards_and_fails_over_from_a_dead_upstream() -> None:
    async with StubUpstream("127.0.0.21", mode="drop") as dead, \
            StubUpstream("127.0.0.22", records={"example.com": ["203.0.113.7"]}) as alive:
        options = ServerOptions(forward=ForwardOptions(timeout=0.3, deadline=2,
                                                       health_interval=60))
        async with DnsServer(build([], upstreams=(dead.upstream, alive.upstream)),
                             options) as srv:
            port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
            r = await ask(port, "example.com")
            assert addrs(r) == ["203.0.113.7"] and not r.flags & dns.flags.AA
            assert dead.queries == [("udp", "example.com", 1)]  # asked first: one timeout, once
            assert addrs(await ask(port, "example.com")) == ["203.0.113.7"]
            assert len(dead.queries) == 1  # marked down: the next query skips it
            assert (await ask(port, "missing.example")).rcode() == dns.rcode.NXDOMAIN
            ups = srv.stats()["upstreams"]
            assert ups[str(dead.upstream)]["healthy"] is False
            assert ups[str(dead.upstream)]["failures"] == {"timeout": 1}
            assert ups[str(alive.upstream)]["latency_seconds"]["count"] == 3


async def test_servfail_when_every_upstream_is_dead() -> None:
    async with StubUpstream("127.0.0.23", mode="drop") as dead:
        refused = Upstream(ipaddress.ip_address("127.0.0.24"), 9)  # nothing listens: ICMP
        options = ServerOptions(forward=ForwardOptions(timeout=0.3, deadline=1.0,
                                                       health_interval=60))
        async with DnsServer(build([], upstreams=(dead.upstream, refused)), options) as srv:
            port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
            r = await ask(port, "example.com")  # answered (SERVFAIL), not left to time out
            assert r.rcode() == dns.rcode.SERVFAIL
            stats = srv.stats()
            assert stats["forwarding"]["servfail"] == 1
            assert stats["upstreams"][str(refused)]["failures"] == {"unreachable": 1}


async def test_truncated_upstream_answer_is_fetched_over_tcp() -> None:
    many = [f"203.0.113.{i}" for i in range(1, 60)]
    up = StubUpstream("127.0.0.25", mode="truncate", records={"big.example": many})
    async with up, DnsServer(build([], upstreams=(await up.start(),))) as srv:
        port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
        over_tcp = await ask(port, "big.example", via="tcp")
        assert len(addrs(over_tcp)) == 59
        small = await ask(port, "big.example")  # 59 A records do not fit in 512 bytes
        assert small.flags & dns.flags.TC and not small.answer
        fits = await ask(port, "big.example", use_edns=0, payload=1232)
        assert len(addrs(fits)) == 59 and not fits.flags & dns.flags.TC
        assert [p for p, *_ in up.queries] == ["udp", "tcp"] * 3
        assert srv.stats()["upstreams"][str(up.upstream)]["tcp_fallbacks"] == 3


async def test_refused_upstream_is_skipped_servfail_is_passed_on() -> None:
    refusing = StubUpstream("127.0.0.26", mode="refuse")
    alive = StubUpstream("127.0.0.27", records={"example.com": ["203.0.113.8"]})
    ups = (await refusing.start(), await alive.start())
    async with refusing, alive, DnsServer(build([], upstreams=ups)) as srv:
        port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
        assert addrs(await ask(port, "example.com")) == ["203.0.113.8"]
    failing = StubUpstream("127.0.0.28", mode="servfail")
    async with failing, DnsServer(build([], upstreams=(await failing.start(),))) as srv:
        port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
        assert (await ask(port, "example.com")).rcode() == dns.rcode.SERVFAIL


async def test_health_checks_mark_down_and_bring_back() -> None:
    stub = StubUpstream("127.0.0.29", mode="drop")
    table = build([], upstreams=(await stub.start(),))
    async with stub, DnsServer(table, ServerOptions(forward=FAST)) as srv:
        async with asyncio.timeout(5):
            while srv.stats()["upstreams"][str(stub.upstream)]["healthy"]:
                await asyncio.sleep(0.05)
        stub.mode = "answer"
        async with asyncio.timeout(5):
            while not srv.stats()["upstreams"][str(stub.upstream)]["healthy"]:
                await asyncio.sleep(0.05)


async def test_never_forwards_to_itself() -> None:
    async with DnsServer(build([])) as srv:
        key = await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))
        srv.update(build([], upstreams=(Upstream(ipaddress.ip_address("127.0.0.1"), key.port),)))
        r = await ask(key.port, "example.com")
        assert r.rcode() == dns.rcode.SERVFAIL


async def test_overload_sheds_with_servfail() -> None:
    async with StubUpstream("127.0.0.30", records={"a.example": ["203.0.113.1"]},
                            delay=0.2) as slow:
        options = ServerOptions(max_inflight=2)
        async with DnsServer(build([], upstreams=(slow.upstream,)), options) as srv:
            port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
            replies = await asyncio.gather(*(ask(port, "a.example") for _ in range(5)))
            rcodes = sorted(r.rcode() for r in replies)
            assert rcodes.count(dns.rcode.SERVFAIL) == 3 and rcodes.count(dns.rcode.NOERROR) == 2
            assert srv.stats()["dropped"]["overload"] == 3


# --- explain, lookup, service ---------------------------------------------------------------


async def test_lookup_explains_local_and_forwarded_names() -> None:
    async with StubUpstream("127.0.0.31", records={"example.com": ["203.0.113.9"]}) as up:
        service = DnsService(DnsSettings(upstreams=(up.upstream,)))
        await service.start()
        try:
            service.update(NETS, [endpoint("web", "front", "127.0.1.10")])
            local = await service.lookup("front", "web")
            assert local.resolution.outcome == "answer" and "container web" in local.text()
            fwd = await service.lookup("front", "example.com")
            assert fwd.response == ("rcode NOERROR", "example.com. 30 IN A 203.0.113.9")
            assert fwd.upstream == str(up.upstream)
            assert fwd.to_dict()["outcome"] == "forward"
            assert service.explain("back", "web").resolution.outcome == "forward"
        finally:
            await service.close()


async def test_service_listens_on_gateways_and_follows_resolv_conf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 203.0.113.1\n")
    service = DnsService(port=0, follow=conf, follow_interval=0.05)
    await service.start()
    try:
        service.update([network("lo", "127.0.5.0/24")], [endpoint("x", "lo", "127.0.5.9")])
        assert [k.address for k in service.wanted_listeners()] == ["127.0.5.1"]
        assert await service.sync_listeners() == []
        assert service.table.upstreams() == (Upstream(ipaddress.ip_address("203.0.113.1")),)
        conf.write_text("nameserver 203.0.113.2\n")
        async with asyncio.timeout(5):
            while service.table.upstreams()[0].host != ipaddress.ip_address("203.0.113.2"):
                await asyncio.sleep(0.05)
        (listener,) = (await service.stats())["listeners"]
        assert listener.startswith("lo 127.0.5.1:") and not listener.endswith(":0")
        assert await service.sync_listeners() == []  # nothing to do: same listener kept
    finally:
        await service.close()


async def test_a_slow_single_upstream_is_asked_again_not_given_up() -> None:
    slow = StubUpstream("127.0.0.32", records={"slow.example": ["203.0.113.10"]}, delay=0.5)
    options = ServerOptions(forward=ForwardOptions(timeout=0.3, deadline=2, health_interval=60))
    async with slow, DnsServer(build([], upstreams=(await slow.start(),)), options) as srv:
        port = (await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))).port
        r = await ask(port, "slow.example")
        assert addrs(r) == ["203.0.113.10"]  # second attempt, 0.6 s timeout, got it
        assert [p for p, *_ in slow.queries] == ["udp", "udp"]

"""Changes reach the running server one at a time (on loopback, no root): what a client asks
next is answered from the changed records, never from a ready-made answer of before, in the
agent's own event loop and in a worker process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import dns.message
import dns.rcode
import pytest

from plexus.dns import DnsChanges
from plexus.dns.records import store_key
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions
from plexus.dns.service import DnsService
from plexus.testing.dns import endpoint, network
from tests.unit.test_dns_server import FAST, addrs, ask, build, udp

pytestmark = pytest.mark.timeout(60)

WEB = endpoint("web", "front", "127.0.1.10")
DB = endpoint("db", "back", "10.2.0.5")


@pytest.fixture
async def server() -> AsyncIterator[tuple[DnsServer, int]]:
    srv = DnsServer(build([WEB, DB]), ServerOptions(forward=FAST))
    await srv.start()
    key = await srv.add_listener(ListenAddress("front", "127.0.0.1", 0))
    try:
        yield srv, key.port
    finally:
        await srv.close()


def soa_serial(r: dns.message.Message) -> int:
    return int(r.authority[0][0].serial)


async def test_a_cached_answer_is_not_served_after_the_change_that_affects_it(
        server: tuple[DnsServer, int]) -> None:
    srv, port = server
    for _ in range(2):
        assert addrs(await ask(port, "web")) == ["127.0.1.10"]
        before = await ask(port, "late.plexus.internal")
        assert before.rcode() == dns.rcode.NXDOMAIN
    assert srv.stats()["queries"]["fast_path"] == 2  # both answers are ready-made now
    moved = endpoint("web", "front", "127.0.1.99")
    late = endpoint("late", "front", "127.0.1.50")
    srv.apply(DnsChanges(endpoints={store_key(WEB): moved, "late-key": late}))
    assert addrs(await ask(port, "web")) == ["127.0.1.99"]
    assert addrs(await ask(port, "late.plexus.internal")) == ["127.0.1.50"]
    srv.apply(DnsChanges(endpoints={store_key(WEB): None}))
    gone = await ask(port, "web.plexus.internal")
    assert gone.rcode() == dns.rcode.NXDOMAIN and soa_serial(gone) > soa_serial(before)
    assert srv.stats()["responses"]["A"]["NOERROR"] == 4  # hits of dropped answers still count


async def test_a_change_elsewhere_keeps_this_networks_ready_made_answers(
        server: tuple[DnsServer, int]) -> None:
    srv, port = server
    for _ in range(2):
        assert addrs(await ask(port, "web")) == ["127.0.1.10"]
    srv.apply(DnsChanges(endpoints={store_key(DB): None}))  # on network "back"
    assert addrs(await ask(port, "web")) == ["127.0.1.10"]
    assert srv.stats()["queries"]["fast_path"] == 2


async def test_a_container_joining_a_second_network_sees_its_names_at_once(
        server: tuple[DnsServer, int]) -> None:
    srv, port = server
    wire = dns.message.make_query("db", "A").to_wire()
    app_front, app_back = endpoint("app", "front", "127.0.0.9"), endpoint("app", "back", "10.2.0.9")
    srv.apply(DnsChanges(endpoints={"app-front": app_front}))

    async def db_from_app() -> dns.message.Message:
        return dns.message.from_wire(await udp(port, wire, source="127.0.0.9"))

    assert (await db_from_app()).rcode() == dns.rcode.SERVFAIL  # not on "back": forwarded
    srv.apply(DnsChanges(endpoints={"app-back": app_back}))
    assert addrs(await db_from_app()) == ["10.2.0.5"]
    srv.apply(DnsChanges(endpoints={"app-back": None}))
    assert (await db_from_app()).rcode() == dns.rcode.SERVFAIL


# --- a worker process ----------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def test_a_worker_process_applies_each_change_and_restarts_with_all_of_them() -> None:
    service = DnsService(workers=1, port=0, options=ServerOptions(forward=FAST))
    await service.start()
    try:
        service.load([network("lo", "127.0.6.0/24")],
                     {"k-web": endpoint("web", "lo", "127.0.6.10")})
        assert await service.sync_listeners() == []
        port = 0

        async def answer(name: str) -> list[str]:
            nonlocal port
            if not port:  # port 0: each (re)started worker picks one
                (listener,) = (await service.stats())["listeners"]
                port = int(listener.rsplit(":", 1)[1])
            r = dns.message.from_wire(await udp(
                port, dns.message.make_query(name, "A").to_wire(), host="127.0.6.1"))
            return addrs(r) if r.rcode() == dns.rcode.NOERROR else [dns.rcode.to_text(r.rcode())]

        async def answers(expected: dict[str, list[str]]) -> bool:
            return all([await answer(name) == want for name, want in expected.items()])

        await eventually(lambda: answers({"web.plexus.internal": ["127.0.6.10"]}))
        service.apply(DnsChanges(endpoints={"k-new": endpoint("new", "lo", "127.0.6.20")}))
        await eventually(lambda: answers({"new.plexus.internal": ["127.0.6.20"]}))
        service.apply(DnsChanges(endpoints={"k-web": None}))
        final = {"web.plexus.internal": ["NXDOMAIN"], "new.plexus.internal": ["127.0.6.20"]}
        await eventually(lambda: answers(final))

        (pid,) = (await service.stats())["workers"]["pids"]
        os.kill(pid, 9)  # the restarted worker gets the parent's whole current table

        async def restarted() -> bool:
            stats = await service.stats()
            return stats["workers"]["restarts"] == 1 and len(stats["workers"]["pids"]) == 1

        await eventually(restarted)
        port = 0
        await eventually(lambda: answers(final))
    finally:
        await service.close()

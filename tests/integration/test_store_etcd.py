"""EtcdStore against real etcd members (Debian's etcd-server 3.4), inside the sandbox.

The Datastore contract runs here exactly as on the embedded stores; then what only a store
on the network has to survive: etcd restarting under a watch, a member going away, a
partition while etcd compacts, leases expiring on the server, TLS, endpoints that do not
answer, and many writers (threads of one process, and processes) racing on one key.
"""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from plexus.errors import InvalidArgument, NotFound, RevisionCompacted, StoreUnavailable
from plexus.store import open_store
from plexus.store.base import Event, EventType
from plexus.store.etcd import EtcdStore
from plexus.store.informer import Change, Informer
from tests.harness.etcd import EtcdCluster, free_port, make_certs
from tests.harness.tcpproxy import TcpProxy
from tests.unit import test_ipam
from tests.unit.store_contract import StoreContract, next_events


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
async def store(etcd: EtcdCluster) -> AsyncIterator[EtcdStore]:
    """An empty store on the module's etcd (what earlier tests wrote is deleted)."""
    s = EtcdStore(etcd.endpoints)
    await s.delete("", prefix=True)
    yield s
    await s.close()


class TestContract(StoreContract):
    """The contract of every backend (tests/unit/store_contract.py), on etcd."""


async def collect(events: AsyncIterator[Event], n: int, timeout: float = 30.0) -> list[Event]:
    return [await asyncio.wait_for(anext(events), timeout) for _ in range(n)]


def revisions_once_in_order(events: Sequence[Event]) -> bool:
    revisions = [e.kv.mod_revision for e in events]
    return revisions == sorted(set(revisions))


# -- watches through restarts, failovers and compaction ------------------------------------


def watch_breaks(caplog: pytest.LogCaptureFixture) -> int:
    return sum("etcd watch broke" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_a_watch_resumes_across_an_etcd_restart_losing_and_repeating_nothing(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    with EtcdCluster(tmp_path / "etcd") as etcd:
        store = EtcdStore(etcd.endpoints)
        events = store.watch("w/", await store.revision() + 1)
        for i in range(5):
            await store.put(f"w/{i}", "before")
        got = await collect(events, 5)
        member = etcd.members[0]
        member.stop() if how == "stop" else member.kill()
        with pytest.raises(StoreUnavailable):
            await store.put("w/x", "while down")  # fails, does not hang
        member.start()
        etcd.wait_healthy()
        for i in range(5, 10):  # written before the watch is likely back: replayed
            await store.put(f"w/{i}", "after")
        got += await collect(events, 5)
        assert [e.kv.key for e in got] == [f"w/{i}" for i in range(10)]
        assert revisions_once_in_order(got)
        assert watch_breaks(caplog) == 1  # one outage, logged once
        await store.close()


async def test_a_watch_moves_to_another_member_when_its_member_goes_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with EtcdCluster(tmp_path / "etcd", size=3) as etcd:
        first, second, _ = etcd.members
        first.stop()  # the first endpoint is down from the start: the second answers
        store = EtcdStore(etcd.endpoints)
        events = store.watch("w/", await store.revision() + 1)
        await store.put("w/0", "v")
        got = await collect(events, 1)
        assert watch_breaks(caplog) == 0  # the watch went straight to the second member
        etcd.restart(first)
        second.stop()  # the watch's member; two of three still make a quorum
        for i in range(1, 6):
            await store.put(f"w/{i}", "v")
        got += await collect(events, 5)
        assert [e.kv.key for e in got] == [f"w/{i}" for i in range(6)]
        assert revisions_once_in_order(got)
        assert watch_breaks(caplog) == 1
        await store.close()


async def test_a_watch_from_a_compacted_revision_raises(store: EtcdStore) -> None:
    r0 = await store.revision()
    for i in range(10):
        await store.put(f"k{i}", "v")
    await store.compact(r0 + 6)
    with pytest.raises(RevisionCompacted):
        await anext(store.watch("", r0 + 5))
    replayed = await next_events(store.watch("", r0 + 6), 4)
    assert [e.kv.key for e in replayed] == ["k5", "k6", "k7", "k8"]


class Mirror:
    """The informer's consumer: keeps what it was told, as the agent's cache does."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def __call__(self, changes: Sequence[Change]) -> None:
        for c in changes:
            if c.kv is None:
                self.values.pop(c.key, None)
            else:
                self.values[c.key] = c.kv.value


async def test_an_informer_cut_off_while_etcd_compacts_relists(
    store: EtcdStore, etcd: EtcdCluster
) -> None:
    for i in range(6):
        await store.put(f"/p/{i}", "old")
    async with TcpProxy("127.0.0.1", etcd.members[0].client_port) as proxy:
        behind = EtcdStore([proxy.address])
        mirror = Mirror()
        informer = Informer(behind, "/p/", mirror)
        await informer.start()
        proxy.cut()  # this host is partitioned; the others go on writing
        for i in range(6):
            await store.delete(f"/p/{i}") if i % 2 else await store.put(f"/p/{i}", "new")
        revision = await store.put("/p/late", "x")
        await store.compact(revision)
        proxy.restore()
        await informer.wait_for(revision)
        assert informer.relists == 2  # the start, then the relist after the compaction
        assert mirror.values == {kv.key: kv.value for kv in (await store.list("/p/"))[0]}
        await informer.close()
        await behind.close()


# -- leases --------------------------------------------------------------------------------


async def test_an_expired_lease_deletes_its_keys_in_one_revision(store: EtcdStore) -> None:
    lease = await store.grant_lease(1)  # the harness's etcd allows 1 s (the default: 2 s)
    await store.put("ep/1", "v", lease=lease)
    await store.put("ep/2", "v", lease=lease)
    await store.put("net/1", "v")
    events = store.watch("", await store.revision() + 1)
    gone = await collect(events, 2, timeout=15.0)  # etcd expires leases every 500 ms
    assert [(e.type, e.kv.key) for e in gone] == [(EventType.DELETE, "ep/1"),
                                                  (EventType.DELETE, "ep/2")]  # fmt: skip
    assert gone[0].kv.mod_revision == gone[1].kv.mod_revision
    assert [kv.key for kv in (await store.list(""))[0]] == ["net/1"]
    with pytest.raises(NotFound):
        await store.refresh_lease(lease)


async def test_a_refreshed_lease_outlives_its_ttl_and_expires_once_let_go(
    store: EtcdStore,
) -> None:
    lease = await store.grant_lease(2)
    await store.put("host/a", "alive", lease=lease)
    events = store.watch("host/", await store.revision() + 1)
    for _ in range(10):  # five seconds: two and a half TTLs
        await asyncio.sleep(0.5)
        await store.refresh_lease(lease)
    assert await store.get("host/a") is not None
    [gone] = await collect(events, 1, timeout=15.0)  # not refreshed any more
    assert (gone.type, gone.kv.key) == (EventType.DELETE, "host/a")


# -- connecting: TLS, endpoints that do not answer -----------------------------------------


async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    tls = make_certs(tmp_path / "tls")
    with EtcdCluster(tmp_path / "etcd", tls=tls) as etcd:
        files = {"cacert": str(tls.ca), "cert": str(tls.client_cert), "key": str(tls.client_key)}
        store = open_store(etcd.url, **files)
        revision = await store.put("a", "1")
        assert (await anext(store.watch("a", revision))).kv.value == "1"
        await store.close()
        # etcd requires a client certificate; without one the handshake fails, in one line.
        anonymous = open_store(etcd.url, cacert=str(tls.ca))
        with pytest.raises(StoreUnavailable) as refused:
            await anonymous.get("a")
        assert etcd.members[0].endpoint in str(refused.value)
        assert "\n" not in str(refused.value)
        await anonymous.close()


def test_a_missing_tls_file_is_named_in_one_line(tmp_path: Path) -> None:
    tls = make_certs(tmp_path / "tls")
    missing = str(tmp_path / "tls" / "nope.crt")
    with pytest.raises(InvalidArgument) as refused:
        open_store("etcds://127.0.0.1:2379", cacert=str(tls.ca), cert=missing,
                   key=str(tls.client_key))  # fmt: skip
    assert str(refused.value) == f"invalid --etcd-cert {missing!r}: No such file or directory"


async def test_an_etcd_that_is_down_fails_a_write_at_once() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    store = open_store(f"etcd://{address}")
    with pytest.raises(StoreUnavailable) as refused:
        await asyncio.wait_for(store.put("a", "1"), 30)
    message = str(refused.value)  # the reason is gRPC's words for ECONNREFUSED
    assert message.startswith(f"etcd did not answer: {address}: ")
    assert "refused" in message.lower() and "\n" not in message
    await store.close()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port whose SYNs vanish, as those to a host that is down or cut off.
    (Dropped on input: a drop on output would fail connect() at once with EPERM.)"""
    port = free_port()
    table = "plexus_test_blackhole"
    rules = [f"add table inet {table}",
             f"add chain inet {table} in {{ type filter hook input priority 0; }}",
             f"add rule inet {table} in tcp dport {port} drop"]  # fmt: skip
    subprocess.run(["nft", "-f", "-"], input="\n".join(rules), check=True, text=True)
    try:
        yield port
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


async def test_an_unreachable_etcd_fails_a_write_within_the_deadline(
    blackhole: int, etcd: EtcdCluster
) -> None:
    address = f"127.0.0.1:{blackhole}"
    store = EtcdStore([address], timeout=3.0, connect_timeout=1.0)
    with pytest.raises(StoreUnavailable) as refused:
        await asyncio.wait_for(store.put("a", "1"), 30)
    assert str(refused.value) == f"etcd did not answer: {address}: no connection within 1s"
    await store.close()
    # The same endpoint first in a list: the next one takes the request.
    store = EtcdStore([address, *etcd.endpoints], timeout=3.0, connect_timeout=1.0)
    revision = await store.put("a", "1")
    assert (await store.list("a"))[1] == revision
    await store.close()


# -- writers racing ------------------------------------------------------------------------


async def test_racing_ipam_writers_never_share_an_address(store: EtcdStore) -> None:
    await test_ipam.test_racing_writers_never_share_an_address(store)


def _process_writer(endpoints: list[str], w: int, count: int) -> None:
    async def go() -> None:
        store = EtcdStore(endpoints)
        for i in range(count):
            await test_ipam.allocate(store, f"p{w}/{i}")
        await store.close()

    asyncio.run(go())


async def test_racing_hosts_never_share_an_address(store: EtcdStore, etcd: EtcdCluster) -> None:
    """Several agents' processes (hosts) on one etcd: only the block compares keep order."""
    ctx = multiprocessing.get_context("spawn")  # no fork: gRPC's threads do not survive it
    procs = [ctx.Process(target=_process_writer, args=(etcd.endpoints, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        await asyncio.to_thread(p.join, 90)
        assert p.exitcode == 0
    in_use = await test_ipam.consistent(store)
    assert len(in_use) == 120
    assert all(ipaddress.ip_address(a) in test_ipam.SUBNET.cidr for a in in_use)


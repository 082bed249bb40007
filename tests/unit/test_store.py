"""The embedded backends (memory and SQLite): the Datastore contract, and what they do beyond it
(lease expiry on a clock the tests move, a bounded history, SQLite's file)."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plexus.errors import InvalidArgument, NotFound, PlexusError, RevisionCompacted, StoreError
from plexus.store import MemoryStore, SqliteStore, open_store
from plexus.store.base import (
    Compare,
    Delete,
    Event,
    Get,
    Op,
    Put,
)
from plexus.store.etcd import EtcdStore
from plexus.store.sqlite import prefix_end
from tests.unit.store_contract import StoreContract, next_events, summary

Store = MemoryStore | SqliteStore
MakeStore = Callable[..., Store]


class FakeClock:
    """Lease time that tests move by hand, so no test sleeps."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[MakeStore]:
    made: list[Store] = []

    def make(**options: Any) -> Store:
        store: Store
        if request.param == "memory":
            store = MemoryStore(clock=clock, **options)
        else:
            store = SqliteStore(tmp_path / "plexus.db", clock=clock, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


class TestContract(StoreContract):
    """The contract of every backend (tests/unit/store_contract.py), on memory and SQLite."""


# -- watches -------------------------------------------------------------------------------


async def test_watch_from_a_compacted_revision_raises(make_store: MakeStore) -> None:
    store = make_store(history=5)
    for i in range(10):
        await store.put(f"k{i}", "v")
    with pytest.raises(RevisionCompacted):
        await anext(store.watch("", 5))
    replayed = await next_events(store.watch("", 6), 5)
    assert [e.kv.key for e in replayed] == ["k5", "k6", "k7", "k8", "k9"]


async def test_a_slow_watcher_catches_up_from_history(make_store: MakeStore) -> None:
    store = make_store(watch_buffer=3)
    await store.put("k", "0")
    events = store.watch("", 1)
    await next_events(events, 1)
    await store.delete("k")
    await store.txn([], [Put(f"many/{i}", "v") for i in range(5)])
    for i in range(5):  # overflows the buffer of 3 several times
        await store.put(f"k{i}", "v")
    got = await next_events(events, 11)
    assert [e.kv.mod_revision for e in got] == [2, *[3] * 5, 4, 5, 6, 7, 8]


async def test_a_watcher_behind_the_history_window_gets_compacted(
    make_store: MakeStore,
) -> None:
    store = make_store(watch_buffer=2, history=3)
    events = store.watch("", 1)
    await store.put("first", "v")
    await next_events(events, 1)
    for i in range(10):
        await store.put(f"k{i}", "v")
    with pytest.raises(RevisionCompacted):
        await next_events(events, 10)


# -- leases --------------------------------------------------------------------------------


async def test_an_expired_lease_deletes_its_keys_with_delete_events(
    store: Store, clock: FakeClock
) -> None:
    lease = await store.grant_lease(10)
    await store.put("ep/1", "v", lease=lease)
    await store.put("ep/2", "v", lease=lease)
    await store.put("net/1", "v")
    events = store.watch("", 4)
    clock.advance(10)
    assert await store.get("ep/1") is None  # expired lazily, by this very call
    expired = await next_events(events, 2)
    assert summary(expired) == [("delete", "ep/1", 4), ("delete", "ep/2", 4)]
    assert [kv.key for kv in (await store.list(""))[0]] == ["net/1"]


async def test_expire_leases_expires_without_other_traffic(store: Store, clock: FakeClock) -> None:
    short, long = await store.grant_lease(5), await store.grant_lease(50)
    await store.txn([], [Put("a", "v", lease=short), Put("b", "v", lease=long)])
    events = store.watch("", 2)
    clock.advance(6)
    assert await store.expire_leases() == 1
    assert summary(await next_events(events, 1)) == [("delete", "a", 2)]
    assert await store.expire_leases() == 0


async def test_refresh_keeps_a_lease_alive(store: Store, clock: FakeClock) -> None:
    lease = await store.grant_lease(10)
    await store.put("k", "v", lease=lease)
    for _ in range(3):
        clock.advance(8)
        await store.refresh_lease(lease)
    assert await store.get("k") is not None


async def test_refreshing_an_expired_lease_raises_not_found(store: Store, clock: FakeClock) -> None:
    lease = await store.grant_lease(10)
    await store.put("k", "v", lease=lease)
    clock.advance(10.5)
    with pytest.raises(NotFound):
        await store.refresh_lease(lease)
    assert await store.get("k") is None
    with pytest.raises(NotFound):
        await store.put("k", "again", lease=lease)


async def test_a_put_without_lease_detaches_the_key(store: Store, clock: FakeClock) -> None:
    lease = await store.grant_lease(5)
    await store.put("k", "v", lease=lease)
    await store.put("k", "kept")
    clock.advance(6)
    assert await store.expire_leases() == 1
    kept = await store.get("k")
    assert kept is not None and kept.lease == 0


# -- SQLite specifics ----------------------------------------------------------------------


async def test_sqlite_persists_across_reopen(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteStore(tmp_path / "s.db", clock=clock)
    lease = await store.grant_lease(30)
    await store.put("a", "1")
    await store.put("b", "2", lease=lease)
    await store.close()

    store = SqliteStore(tmp_path / "s.db", clock=clock)
    assert await store.revision() == 2
    assert await store.put("c", "3") == 3
    assert summary(await next_events(store.watch("", 1), 3))[0] == ("put", "a", 1)
    await store.refresh_lease(lease)
    assert await store.grant_lease(1) == lease + 1
    await store.close()


def test_sqlite_failures_surface_as_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "no-such-dir" / "s.db")


_WRITER = """
import asyncio, sys
from plexus.store.base import Put
from plexus.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(sys.argv[1])
    i = 0
    while True:
        # Filler between the pair widens the window a torn txn would show up in.
        filler = [Put(f"filler/{i:06}/{j}", "x" * 100) for j in range(4)]
        await store.txn([], [Put(f"a/{i:06}", str(i)), *filler, Put(f"b/{i:06}", str(i))])
        i += 1
        print(i, flush=True)  # acknowledged: txn i is committed

asyncio.run(main())
"""


async def test_sqlite_keeps_every_committed_txn_across_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    command = [sys.executable, "-c", _WRITER, str(path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as writer:
        assert writer.stdout is not None
        try:
            assert writer.stdout.readline() == "1\n"
            await asyncio.sleep(0.2)  # let it commit (and be killed in the middle of) many more
        finally:
            writer.send_signal(signal.SIGKILL)
        acknowledged = int(writer.stdout.read().split()[-1])
    assert writer.returncode == -signal.SIGKILL

    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = SqliteStore(path)
    a, revision = await store.list("a/")
    b, _ = await store.list("b/")
    filler, _ = await store.list("filler/")
    assert revision >= acknowledged > 1  # no acknowledged commit is lost
    assert [kv.key[2:] for kv in a] == [kv.key[2:] for kv in b]  # each pair, or neither
    assert len(a) == revision  # one revision per txn, none half-applied
    assert len(filler) == 4 * revision
    await store.close()


def test_prefix_end_bounds_every_extension() -> None:
    assert prefix_end("") is None
    assert prefix_end("a/") == "a0"
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"


@given(st.text(max_size=4), st.text(max_size=4))
def test_prefix_end_is_above_every_key_with_the_prefix(prefix: str, rest: str) -> None:
    end = prefix_end(prefix)
    assert end is None or (prefix + rest < end and not end.startswith(prefix))


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", MemoryStore),
        ("sqlite://{tmp}/a.db", SqliteStore),
        ("{tmp}/b.db", SqliteStore),
        ("etcd://127.0.0.1:2379,127.0.0.2", EtcdStore),  # nothing is contacted yet
    ],
)
async def test_open_store_picks_the_backend_from_the_url(
    tmp_path: Path, url: str, kind: type[Store | EtcdStore]
) -> None:
    store = open_store(url.format(tmp=tmp_path))
    assert isinstance(store, kind)
    await store.close()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("redis://h", {}, "invalid --store 'redis://h': supported: etcd://"),
        ("sqlite://", {}, "invalid --store 'sqlite://': names no file"),
        ("etcd://", {}, "invalid --store 'etcd://': expected etcd://HOST:PORT"),
        ("etcd://h:99999", {}, "invalid --store 'etcd://h:99999': endpoint 'h:99999' is not"),
        ("etcd://a:1,:2", {}, "invalid --store 'etcd://a:1,:2': endpoint ':2' is not HOST:PORT"),
        ("etcd://fd00::1", {}, "invalid --store 'etcd://fd00::1': write the IPv6 address"),
        ("etcd://h:1", {"cacert": "/ca"}, "invalid --etcd-cacert '/ca': needs an etcds://"),
        ("{tmp}/db", {"key": "/k"}, "invalid --etcd-key '/k': needs an etcds://"),
        ("etcds://h", {"cert": "/c"}, "invalid --etcd-cert '/c': needs --etcd-key too"),
        ("etcds://h", {"cacert": "/no/ca.pem"},
         "invalid --etcd-cacert '/no/ca.pem': No such file or directory"),
    ],
)
def test_open_store_names_the_option_and_value_it_refuses(
    tmp_path: Path, url: str, options: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        open_store(url.format(tmp=tmp_path), **options)
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


# -- memory and SQLite agree on random histories -------------------------------------------

_keys = st.sampled_from(["a", "a/1", "a/2", "ab", "b/1", "é"])
_prefixes = st.sampled_from(["", "a", "a/", "b/", "z"])
_leases = st.sampled_from([0, 0, 1, 2, 3, 99])
_values = st.text(alphabet="xyé😀", max_size=3)
_int_compares = st.builds(
    Compare,
    _keys,
    st.sampled_from(["version", "create", "mod"]),
    st.sampled_from(["==", "!=", "<", ">"]),
    st.integers(0, 6),
)
_value_compares = st.builds(Compare, _keys, st.just("value"), st.sampled_from(["==", "<"]), _values)
_ops: st.SearchStrategy[Op] = st.one_of(
    st.builds(Put, _keys, _values, _leases),
    st.builds(Delete, _keys | _prefixes, st.booleans()),
    st.builds(Get, _keys | _prefixes, st.booleans()),
)
_actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("txn"),
            st.lists(_int_compares | _value_compares, max_size=2),
            st.lists(_ops, max_size=3),
            st.lists(_ops, max_size=2),
        ),
        st.tuples(st.just("grant"), st.sampled_from([1.0, 5.0])),
        st.tuples(st.just("refresh"), _leases),
        st.tuples(st.just("revoke"), _leases),
        st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0, 6.0])),
        st.tuples(st.just("expire")),
        st.tuples(st.just("list"), _prefixes),
    ),
    max_size=25,
)


async def _act(store: Store, clock: FakeClock, action: tuple[Any, ...]) -> object:
    match action:
        case ("txn", compares, success, failure):
            return await store.txn(compares, success, failure)
        case ("grant", ttl):
            return await store.grant_lease(ttl)
        case ("refresh", lease):
            await store.refresh_lease(lease)
        case ("revoke", lease):
            await store.revoke_lease(lease)
        case ("tick", seconds):
            clock.advance(seconds)
        case ("expire",):
            return await store.expire_leases()
        case ("list", prefix):
            return await store.list(prefix)
        case _:
            raise AssertionError(action)
    return None


async def _trace(store: Store, clock: FakeClock, actions: list[tuple[Any, ...]]) -> list[object]:
    trace: list[object] = []
    for action in actions:
        try:
            trace.append(await _act(store, clock, action))
        except PlexusError as e:
            trace.append(type(e).__name__)
    await store.put("~end", "")  # the watch below stops at this marker
    trace.append([e async for e in _until_end(store.watch("", 1))])
    await store.close()
    return trace


async def _until_end(events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    async for event in events:
        yield event
        if event.kv.key == "~end":
            return


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_actions)
def test_memory_and_sqlite_agree_on_random_histories(actions: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        memory_clock, sqlite_clock = FakeClock(), FakeClock()
        memory = asyncio.run(_trace(MemoryStore(clock=memory_clock), memory_clock, actions))
        sqlite = SqliteStore(Path(tmp) / "h.db", clock=sqlite_clock)
        assert asyncio.run(_trace(sqlite, sqlite_clock, actions)) == memory

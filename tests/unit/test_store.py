"""The Datastore contract, run against every embedded backend (memory and SQLite)."""

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
    Datastore,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
)
from plexus.store.sqlite import prefix_end

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


async def next_events(events: AsyncIterator[Event], n: int) -> list[Event]:
    return [await asyncio.wait_for(anext(events), 1.0) for _ in range(n)]


def summary(events: list[Event]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.kv.key, e.kv.mod_revision) for e in events]


# -- revisions and keys --------------------------------------------------------------------


async def test_backends_satisfy_the_datastore_protocol(store: Store) -> None:
    assert isinstance(store, Datastore)


async def test_every_write_makes_exactly_one_revision(store: Store) -> None:
    assert await store.revision() == 0
    assert await store.put("a", "1") == 1
    result = await store.txn([], [Put("b", "1"), Put("c", "1"), Delete("a")])
    assert result.revision == 2
    assert await store.delete("b") == 1
    assert await store.revision() == 3


async def test_a_txn_that_changes_nothing_makes_no_revision(store: Store) -> None:
    await store.put("a", "1")
    assert (await store.txn([], [Get("a"), Delete("absent")])).revision == 1
    assert await store.delete("absent") == 0
    assert await store.revision() == 1


async def test_create_and_mod_revision_and_version_follow_etcd(store: Store) -> None:
    await store.put("k", "v1")
    assert await store.get("k") == KeyValue("k", "v1", 1, 1, 1)
    await store.put("other", "x")
    await store.put("k", "v2")
    assert await store.get("k") == KeyValue("k", "v2", 1, 3, 2)
    await store.delete("k")
    assert await store.get("k") is None
    await store.put("k", "v3")
    assert await store.get("k") == KeyValue("k", "v3", 5, 5, 1)


async def test_only_one_of_many_concurrent_claims_wins(store: Store) -> None:
    async def claim(who: int) -> bool:
        result = await store.txn([Compare.absent("lock")], [Put("lock", str(who))])
        return result.succeeded

    wins = await asyncio.gather(*(claim(i) for i in range(50)))
    assert wins.count(True) == 1
    winner = await store.get("lock")
    assert winner is not None and winner.value == str(wins.index(True))
    assert await store.revision() == 1


async def test_failed_compare_runs_the_failure_branch(store: Store) -> None:
    await store.put("k", "old")
    result = await store.txn(
        [Compare("k", "value", "==", "new")],
        [Put("k", "newer")],
        [Put("lost", "yes"), Get("k")],
    )
    assert not result.succeeded
    assert result.revision == 2
    assert [[kv.value for kv in r] for r in result.responses] == [[], ["old"]]
    assert await store.get("lost") is not None


async def test_get_in_a_txn_returns_values_and_sees_earlier_writes(store: Store) -> None:
    await store.put("a/1", "x")
    result = await store.txn([], [Get("a/1"), Put("a/2", "y"), Get("a/", prefix=True), Get("z")])
    keys = [[kv.key for kv in r] for r in result.responses]
    assert keys == [["a/1"], [], ["a/1", "a/2"], []]


async def test_unchanged_guards_against_a_concurrent_write(store: Store) -> None:
    await store.put("k", "1")
    seen = await store.get("k")
    await store.put("k", "2")
    lost = await store.txn([Compare.unchanged(seen, "k")], [Put("k", "3")])
    assert not lost.succeeded
    won = await store.txn([Compare.unchanged(await store.get("k"), "k")], [Put("k", "3")])
    assert won.succeeded


@pytest.mark.parametrize(
    ("compare", "holds"),
    [
        (Compare("k", "version", "==", 2), True),
        (Compare("k", "version", ">", 1), True),
        (Compare("k", "create", "==", 1), True),
        (Compare("k", "mod", "<", 2), False),
        (Compare("k", "mod", "!=", 1), True),
        (Compare("k", "value", "==", "v2"), True),
        (Compare("k", "value", "<", "v3"), True),
        (Compare("missing", "version", "==", 0), True),
        (Compare("missing", "mod", "<", 1), True),
        # etcd: a missing key has no value, so every value compare fails.
        (Compare("missing", "value", "!=", "x"), False),
        (Compare("missing", "value", "==", ""), False),
    ],
)
async def test_compare_targets(store: Store, compare: Compare, holds: bool) -> None:
    await store.put("k", "v1")
    await store.put("k", "v2")
    assert (await store.txn([compare], [])).succeeded is holds


@pytest.mark.parametrize(
    ("compares", "ops"),
    [
        ([], [Put("", "x")]),
        ([], [Put("a", "1"), Put("a", "2")]),
        ([], [Put("a/1", "1"), Delete("a/", prefix=True)]),
        ([Compare("a", "version", "==", "1")], []),
        ([Compare("a", "value", "==", 1)], []),
    ],
)
async def test_malformed_txns_are_refused_and_write_nothing(
    store: Store, compares: list[Compare], ops: list[Op]
) -> None:
    with pytest.raises(InvalidArgument):
        await store.txn(compares, ops)
    assert await store.revision() == 0


async def test_list_is_sorted_by_key_and_reports_its_revision(store: Store) -> None:
    for key in ["net/b", "net/a", "netx", "ep/1", "net/a/1"]:
        await store.put(key, key)
    kvs, revision = await store.list("net/")
    assert [kv.key for kv in kvs] == ["net/a", "net/a/1", "net/b"]
    assert revision == 5
    everything, _ = await store.list("")
    assert len(everything) == 5


async def test_non_ascii_keys_sort_and_list_alike(store: Store) -> None:
    for key in ["p/é", "p/z", "p/😀", "p\U0010ffff", "p/\ud7ff"]:
        await store.put(key, "v")
    kvs, _ = await store.list("p/")
    assert [kv.key for kv in kvs] == sorted(["p/é", "p/z", "p/😀", "p/\ud7ff"])


async def test_delete_prefix_removes_every_key_under_it_in_one_revision(store: Store) -> None:
    for key in ["a/1", "a/2", "a/3", "ab"]:
        await store.put(key, "v")
    assert await store.delete("a/", prefix=True) == 3
    assert await store.revision() == 5
    kvs, _ = await store.list("")
    assert [kv.key for kv in kvs] == ["ab"]


# -- watches -------------------------------------------------------------------------------


async def test_watch_replays_history_then_streams_live_events(store: Store) -> None:
    for key in ["a", "b", "c"]:
        await store.put(key, "v")
    events = store.watch("", 2)
    assert summary(await next_events(events, 2)) == [("put", "b", 2), ("put", "c", 3)]
    waiting = asyncio.ensure_future(anext(events))
    await asyncio.sleep(0)
    await store.txn([], [Put("d", "v"), Delete("a")])
    live = [await asyncio.wait_for(waiting, 1.0), *await next_events(events, 1)]
    assert summary(live) == [("put", "d", 4), ("delete", "a", 4)]


async def test_watch_sees_only_its_prefix(store: Store) -> None:
    events = store.watch("net/", 1)
    await store.put("ep/1", "x")
    await store.put("net/1", "x")
    await store.put("network", "x")
    await store.put("net/2", "x")
    assert [e.kv.key for e in await next_events(events, 2)] == ["net/1", "net/2"]


async def test_watch_from_a_future_revision_waits_for_it(store: Store) -> None:
    await store.put("k", "1")
    first = asyncio.ensure_future(anext(store.watch("", 4)))
    await asyncio.sleep(0)  # the watch is live before revisions 2 and 3 are written
    for value in "234":
        await store.put("k", value)
    assert summary([await asyncio.wait_for(first, 1.0)]) == [("put", "k", 4)]


async def test_events_carry_the_previous_value(store: Store) -> None:
    await store.put("k", "1")
    await store.put("k", "2")
    await store.delete("k")
    first, second, gone = await next_events(store.watch("k", 1), 3)
    assert first.prev is None
    assert second.prev == first.kv
    assert gone.type is EventType.DELETE
    assert gone.kv == KeyValue("k", "", 0, 3, 0)
    assert gone.prev == second.kv


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


async def test_close_ends_watches(store: Store) -> None:
    async def drain() -> list[Event]:
        return [event async for event in store.watch("", 1)]

    watcher = asyncio.ensure_future(drain())
    await store.put("k", "v")
    await asyncio.sleep(0)
    await store.close()
    assert len(await asyncio.wait_for(watcher, 1.0)) == 1
    with pytest.raises(StoreError):
        await store.get("k")


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


async def test_a_put_on_an_unknown_lease_writes_nothing(store: Store) -> None:
    await store.put("a", "1")
    with pytest.raises(NotFound):
        await store.txn([], [Put("a", "2"), Put("b", "1", lease=42)])
    assert await store.get("a") == KeyValue("a", "1", 1, 1, 1)
    assert await store.revision() == 1


async def test_revoke_deletes_the_lease_keys_and_tolerates_unknown_leases(store: Store) -> None:
    lease = await store.grant_lease(60)
    await store.put("k", "v", lease=lease)
    await store.put("k2", "v")
    await store.put("k2", "v", lease=lease)  # a later put moves a key onto the lease
    await store.revoke_lease(lease)
    assert (await store.list(""))[0] == []
    assert await store.revision() == 4
    await store.revoke_lease(lease)
    await store.revoke_lease(12345)
    with pytest.raises(NotFound):
        await store.refresh_lease(lease)


async def test_a_put_without_lease_detaches_the_key(store: Store, clock: FakeClock) -> None:
    lease = await store.grant_lease(5)
    await store.put("k", "v", lease=lease)
    await store.put("k", "kept")
    clock.advance(6)
    assert await store.expire_leases() == 1
    kept = await store.get("k")
    assert kept is not None and kept.lease == 0


async def test_grant_lease_needs_a_positive_ttl(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        await store.grant_lease(0)


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
    [("memory://", MemoryStore), ("sqlite://{tmp}/a.db", SqliteStore), ("{tmp}/b.db", SqliteStore)],
)
async def test_open_store_picks_the_backend_from_the_url(
    tmp_path: Path, url: str, kind: type[Store]
) -> None:
    store = open_store(url.format(tmp=tmp_path))
    assert isinstance(store, kind)
    await store.close()


def test_open_store_refuses_unknown_schemes() -> None:
    with pytest.raises(InvalidArgument):
        open_store("etcd://localhost:2379")


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

"""The Datastore contract: what every backend does, checked the same way on each.

``StoreContract`` holds the tests; a test module runs them on its backends by subclassing it
(``class TestContract(StoreContract)``) next to a ``store`` fixture that yields an open,
empty store. The embedded stores run it in tests/unit/test_store.py, etcd in
tests/integration/test_store_etcd.py.

The tests need nothing but the protocol: no fake clock, no backend options. Revisions count
from the store's revision when the test starts (``r0``): an embedded store starts at 0, a
fresh etcd at 1, and an etcd shared by several tests wherever the last one left it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from plexus.errors import InvalidArgument, NotFound, StoreError
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


async def next_events(events: AsyncIterator[Event], n: int) -> list[Event]:
    return [await asyncio.wait_for(anext(events), 2.0) for _ in range(n)]


def summary(events: list[Event], r0: int = 0) -> list[tuple[str, str, int]]:
    """(type, key, revision - r0) of each event."""
    return [(e.type.value, e.kv.key, e.kv.mod_revision - r0) for e in events]


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def shifted(cmp: Compare, r0: int) -> Compare:
    """A compare on create/mod revisions written relative to the test's first revision."""
    if cmp.target in ("create", "mod") and isinstance(cmp.value, int):
        return Compare(cmp.key, cmp.target, cmp.op, cmp.value + r0)
    return cmp


class StoreContract:
    # -- revisions and keys ----------------------------------------------------------------

    async def test_backends_satisfy_the_datastore_protocol(self, store: Datastore) -> None:
        assert isinstance(store, Datastore)

    async def test_every_write_makes_exactly_one_revision(self, store: Datastore) -> None:
        r0 = await store.revision()
        assert await store.put("a", "1") == r0 + 1
        result = await store.txn([], [Put("b", "1"), Put("c", "1"), Delete("a")])
        assert result.revision == r0 + 2
        assert await store.delete("b") == 1
        assert await store.revision() == r0 + 3

    async def test_a_txn_that_changes_nothing_makes_no_revision(self, store: Datastore) -> None:
        r1 = await store.put("a", "1")
        assert (await store.txn([], [Get("a"), Delete("absent")])).revision == r1
        assert await store.delete("absent") == 0
        assert await store.revision() == r1

    async def test_create_and_mod_revision_and_version_follow_etcd(
        self, store: Datastore
    ) -> None:
        r0 = await store.revision()
        await store.put("k", "v1")
        assert await store.get("k") == KeyValue("k", "v1", r0 + 1, r0 + 1, 1)
        await store.put("other", "x")
        await store.put("k", "v2")
        assert await store.get("k") == KeyValue("k", "v2", r0 + 1, r0 + 3, 2)
        await store.delete("k")
        assert await store.get("k") is None
        await store.put("k", "v3")
        assert await store.get("k") == KeyValue("k", "v3", r0 + 5, r0 + 5, 1)

    async def test_only_one_of_many_concurrent_claims_wins(self, store: Datastore) -> None:
        r0 = await store.revision()

        async def claim(who: int) -> bool:
            result = await store.txn([Compare.absent("lock")], [Put("lock", str(who))])
            return result.succeeded

        wins = await asyncio.gather(*(claim(i) for i in range(50)))
        assert wins.count(True) == 1
        winner = await store.get("lock")
        assert winner is not None and winner.value == str(wins.index(True))
        assert await store.revision() == r0 + 1

    async def test_failed_compare_runs_the_failure_branch(self, store: Datastore) -> None:
        r1 = await store.put("k", "old")
        result = await store.txn(
            [Compare("k", "value", "==", "new")],
            [Put("k", "newer")],
            [Put("lost", "yes"), Get("k")],
        )
        assert not result.succeeded
        assert result.revision == r1 + 1
        assert [[kv.value for kv in r] for r in result.responses] == [[], ["old"]]
        assert await store.get("lost") is not None

    async def test_get_in_a_txn_returns_values_and_sees_earlier_writes(
        self, store: Datastore
    ) -> None:
        await store.put("a/1", "x")
        ops = [Get("a/1"), Put("a/2", "y"), Get("a/", prefix=True), Get("z")]
        result = await store.txn([], ops)
        keys = [[kv.key for kv in r] for r in result.responses]
        assert keys == [["a/1"], [], ["a/1", "a/2"], []]

    async def test_unchanged_guards_against_a_concurrent_write(self, store: Datastore) -> None:
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
            (Compare("k", "create", "==", 1), True),  # create and mod: r0 + value
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
    async def test_compare_targets(self, store: Datastore, compare: Compare, holds: bool) -> None:
        r0 = await store.revision()
        await store.put("k", "v1")
        await store.put("k", "v2")
        if compare.key == "missing":
            r0 = 0  # a missing key's revisions are 0, whatever the store's revision
        assert (await store.txn([shifted(compare, r0)], [])).succeeded is holds

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
        self, store: Datastore, compares: list[Compare], ops: list[Op]
    ) -> None:
        r0 = await store.revision()
        with pytest.raises(InvalidArgument):
            await store.txn(compares, ops)
        assert await store.revision() == r0

    async def test_list_is_sorted_by_key_and_reports_its_revision(
        self, store: Datastore
    ) -> None:
        r0 = await store.revision()
        for key in ["net/b", "net/a", "netx", "ep/1", "net/a/1"]:
            await store.put(key, key)
        kvs, revision = await store.list("net/")
        assert [kv.key for kv in kvs] == ["net/a", "net/a/1", "net/b"]
        assert revision == r0 + 5
        everything, _ = await store.list("")
        assert len(everything) == 5

    async def test_non_ascii_keys_sort_and_list_alike(self, store: Datastore) -> None:
        for key in ["p/é", "p/z", "p/😀", "p\U0010ffff", "p/\ud7ff"]:
            await store.put(key, "v")
        kvs, _ = await store.list("p/")
        assert [kv.key for kv in kvs] == sorted(["p/é", "p/z", "p/😀", "p/\ud7ff"])

    async def test_delete_prefix_removes_every_key_under_it_in_one_revision(
        self, store: Datastore
    ) -> None:
        r0 = await store.revision()
        for key in ["a/1", "a/2", "a/3", "ab"]:
            await store.put(key, "v")
        assert await store.delete("a/", prefix=True) == 3
        assert await store.revision() == r0 + 5
        kvs, _ = await store.list("")
        assert [kv.key for kv in kvs] == ["ab"]

    # -- watches ---------------------------------------------------------------------------

    async def test_watch_replays_history_then_streams_live_events(
        self, store: Datastore
    ) -> None:
        r0 = await store.revision()
        for key in ["a", "b", "c"]:
            await store.put(key, "v")
        events = store.watch("", r0 + 2)
        assert summary(await next_events(events, 2), r0) == [("put", "b", 2), ("put", "c", 3)]
        waiting = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
        await store.txn([], [Put("d", "v"), Delete("a")])
        live = [await asyncio.wait_for(waiting, 2.0), *await next_events(events, 1)]
        assert summary(live, r0) == [("put", "d", 4), ("delete", "a", 4)]

    async def test_watch_sees_only_its_prefix(self, store: Datastore) -> None:
        events = store.watch("net/", await store.revision() + 1)
        await store.put("ep/1", "x")
        await store.put("net/1", "x")
        await store.put("network", "x")
        await store.put("net/2", "x")
        assert [e.kv.key for e in await next_events(events, 2)] == ["net/1", "net/2"]

    async def test_watch_from_a_future_revision_waits_for_it(self, store: Datastore) -> None:
        r1 = await store.put("k", "1")
        first = asyncio.ensure_future(anext(store.watch("", r1 + 3)))
        await asyncio.sleep(0)  # the watch is live before revisions 2 and 3 are written
        for value in "234":
            await store.put("k", value)
        assert summary([await asyncio.wait_for(first, 2.0)], r1) == [("put", "k", 3)]

    async def test_events_carry_the_previous_value(self, store: Datastore) -> None:
        r0 = await store.revision()
        await store.put("k", "1")
        await store.put("k", "2")
        await store.delete("k")
        first, second, gone = await next_events(store.watch("k", r0 + 1), 3)
        assert first.prev is None
        assert second.prev == first.kv
        assert gone.type is EventType.DELETE
        assert gone.kv == KeyValue("k", "", 0, r0 + 3, 0)
        assert gone.prev == second.kv

    async def test_close_ends_watches(self, store: Datastore) -> None:
        got: list[Event] = []
        start = await store.revision() + 1

        async def drain() -> None:
            async for event in store.watch("", start):
                got.append(event)

        watcher = asyncio.ensure_future(drain())
        await store.put("k", "v")
        await until(lambda: got)
        await store.close()
        await asyncio.wait_for(watcher, 2.0)  # ended, not cancelled
        assert len(got) == 1
        with pytest.raises(StoreError):
            await store.get("k")

    # -- leases ----------------------------------------------------------------------------

    async def test_a_put_on_an_unknown_lease_writes_nothing(self, store: Datastore) -> None:
        r1 = await store.put("a", "1")
        with pytest.raises(NotFound):
            await store.txn([], [Put("a", "2"), Put("b", "1", lease=42)])
        assert await store.get("a") == KeyValue("a", "1", r1, r1, 1)
        assert await store.revision() == r1

    async def test_revoke_deletes_the_lease_keys_and_tolerates_unknown_leases(
        self, store: Datastore
    ) -> None:
        r0 = await store.revision()
        lease = await store.grant_lease(60)
        await store.put("k", "v", lease=lease)
        await store.put("k2", "v")
        await store.put("k2", "v", lease=lease)  # a later put moves a key onto the lease
        await store.refresh_lease(lease)
        await store.revoke_lease(lease)
        assert (await store.list(""))[0] == []
        assert await store.revision() == r0 + 4
        await store.revoke_lease(lease)
        await store.revoke_lease(12345)
        with pytest.raises(NotFound):
            await store.refresh_lease(lease)

    async def test_grant_lease_needs_a_positive_ttl(self, store: Datastore) -> None:
        with pytest.raises(InvalidArgument):
            await store.grant_lease(0)

"""The informer: list, watch, relist after the store's history is gone; and the cache it feeds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from plexus.errors import StoreError
from plexus.model import keys
from plexus.model.types import Endpoint
from plexus.state.cache import Cache
from plexus.store import MemoryStore
from plexus.store.base import Put
from plexus.store.informer import Change, Informer


class Mirror:
    """A consumer that keeps what it was told, as the cache does."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.batches = 0

    def __call__(self, changes: Sequence[Change]) -> None:
        self.batches += 1
        for c in changes:
            if c.kv is None:
                self.values.pop(c.key, None)
            else:
                self.values[c.key] = c.kv.value


async def store_values(store: MemoryStore, prefix: str) -> dict[str, str]:
    return {kv.key: kv.value for kv in (await store.list(prefix))[0]}


async def test_list_then_watch_sees_every_change_in_order() -> None:
    store = MemoryStore()
    await store.put("/p/a", "1")
    mirror = Mirror()
    informer = Informer(store, "/p/", mirror)
    await informer.start()
    assert mirror.values == {"/p/a": "1"}
    await store.put("/q/other", "x")  # not under the prefix: never delivered
    await store.put("/p/b", "2")
    await store.delete("/p/a")
    await informer.wait_for(await store.revision())
    assert mirror.values == {"/p/b": "2"} and informer.relists == 1
    await informer.close()


async def test_a_consumer_that_fell_behind_the_history_relists_and_diffs() -> None:
    store = MemoryStore(history=5, watch_buffer=2)
    for i in range(10):
        await store.put(f"/p/{i}", "old")
    mirror = Mirror()
    informer = Informer(store, "/p/", mirror)
    await informer.start()
    # 60 commits without giving the informer's task a turn: its queue overflows and the five
    # revisions of history the store keeps do not reach back to where it was.
    for i in range(10):
        await store.delete(f"/p/{i}") if i % 2 else await store.put(f"/p/{i}", "new")
    for i in range(50):
        rev = await store.put(f"/p/n{i}", "x")
    await informer.wait_for(rev)
    assert informer.relists == 2
    assert mirror.values == await store_values(store, "/p/")
    await informer.close()


async def test_a_revision_is_seen_only_with_all_of_its_events() -> None:
    store = MemoryStore()
    mirror = Mirror()
    informer = Informer(store, "/p/", mirror)
    await informer.start()
    result = await store.txn([], [Put(f"/p/{i}", "v") for i in range(20)])
    await informer.wait_for(result.revision)
    assert len(mirror.values) == 20  # never woken between two events of one transaction
    await informer.close()


async def test_wait_for_times_out_with_a_store_error() -> None:
    store = MemoryStore()
    informer = Informer(store, "/p/", Mirror())
    await informer.start()
    with pytest.raises(StoreError, match="did not reach revision 10000"):
        await informer.wait_for(10_000, timeout=0.05)
    await informer.close()


async def test_the_cache_indexes_follow_every_change() -> None:
    cache = Cache("n1")
    store = MemoryStore()
    informer = Informer(store, keys.ROOT, cache.apply)
    await informer.start()
    eps = [Endpoint(container_id=f"c{i % 3}", ifname=f"eth{i // 3}", network=f"net{i % 2}",
                    node="n1", netns="/x") for i in range(6)]
    for ep in eps:
        await store.put(ep.store_key, ep.to_json())
    moved = Endpoint(container_id="c0", ifname="eth0", network="net9", node="n1", netns="/x")
    rev = await store.put(moved.store_key, moved.to_json())
    await informer.wait_for(rev)
    assert [e.ifname for e in cache.of_container("c0")] == ["eth0", "eth1"]
    assert {e.container_id for e in cache.endpoints_on("net9")} == {"c0"}
    assert "c0" not in {e.container_id for e in cache.endpoints_on("net0")}
    await store.delete(keys.endpoints("n1"), prefix=True)
    await informer.wait_for(await store.revision())
    assert cache.endpoints == {} and cache.of_container("c0") == []
    assert cache.endpoints_on("net9") == []
    await informer.close()

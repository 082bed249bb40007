"""LeaseKeeper on the in-memory store, on a clock the test moves: a held lease outlives its TTL,
an unanswered refresh is tried again sooner, and a lost lease is reported."""

from __future__ import annotations

import asyncio

from plexus.errors import StoreUnavailable
from plexus.store import MemoryStore
from plexus.store.lease import LeaseKeeper
from tests.unit.test_store import FakeClock


class Time:
    """The keeper's sleep: moves the store's clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.slept.append(seconds)
        await asyncio.sleep(0)


class Flaky(MemoryStore):
    """A store whose next ``fail`` refreshes do not answer."""

    fail = 0

    async def refresh_lease(self, lease: int) -> None:
        if self.fail:
            self.fail -= 1
            raise StoreUnavailable("etcd did not answer: 127.0.0.1:2379: Connection refused")
        await super().refresh_lease(lease)


async def until(condition: object, *, turns: int = 1000) -> None:
    for _ in range(turns):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_a_held_lease_outlives_many_ttls() -> None:
    clock = FakeClock()
    store, time = MemoryStore(clock=clock), Time(clock)
    lease = await store.grant_lease(9)
    await store.put("host/a", "alive", lease=lease)
    keeper = LeaseKeeper(store, lease, 9, sleep=time.sleep)
    keeper.start()
    await until(lambda: keeper.refreshes >= 30)  # 30 refreshes: 90 s, ten TTLs
    await keeper.stop()
    assert await store.get("host/a") is not None
    clock.advance(9)
    assert await store.get("host/a") is None  # stopped: the lease expires as it should


async def test_a_refresh_that_is_not_answered_is_tried_again_sooner() -> None:
    clock = FakeClock()
    store, time = Flaky(clock=clock), Time(clock)
    lease = await store.grant_lease(9)
    store.fail = 2
    keeper = LeaseKeeper(store, lease, 9, sleep=time.sleep)
    keeper.start()
    await until(lambda: len(time.slept) >= 4)
    await keeper.stop()
    # ttl/3, then ttl/10 while the store does not answer, then ttl/3 again
    assert time.slept[:4] == [3.0, 0.9, 0.9, 3.0]
    assert keeper.refreshes >= 1
    assert not keeper.lost.is_set()


async def test_a_lost_lease_is_reported_and_ends_the_keeper() -> None:
    clock = FakeClock()
    store, time = MemoryStore(clock=clock), Time(clock)
    lost: list[int] = []
    lease = await store.grant_lease(9)
    keeper = LeaseKeeper(store, lease, 9, on_lost=lost.append, sleep=time.sleep)
    await store.revoke_lease(lease)
    keeper.start()
    await asyncio.wait_for(keeper.lost.wait(), 1.0)
    assert lost == [lease]
    await keeper.stop()

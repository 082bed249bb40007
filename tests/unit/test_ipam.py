"""IPAM against real datastores: many writers racing on one subnet never hand out an address
twice, the block bitmaps always agree with the owner records, and an allocation reads a bounded
number of keys whatever the number of addresses in use."""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from plexus.ipam import blocks
from plexus.ipam.plans import claim_next, plan_allocation, plan_release
from plexus.model import keys
from plexus.model.types import Network, Subnet
from plexus.store import MemoryStore, SqliteStore
from plexus.store.base import Datastore, KeyValue

SUBNET = Subnet(ipaddress.ip_network("10.20.0.0/22"), ipaddress.ip_address("10.20.0.1"))
NET = Network(name="n", id="x" * 32, subnets=(SUBNET,))

Factory = Callable[[Path], Datastore]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Datastore]:
    s: Datastore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "db")
    yield s
    await s.close()


async def allocate(store: Datastore, owner: str, retries: int = 200) -> str:
    for _ in range(retries):
        plan = await plan_allocation(store, NET, owner)
        if (await store.txn(plan.compares, plan.ops)).succeeded:
            return str(plan.addresses[0].ip)
        await asyncio.sleep(0)
    raise AssertionError(f"{owner}: no address after {retries} tries")


async def release(store: Datastore, owner: str, address: str) -> None:
    iface = ipaddress.ip_interface(f"{address}/22")
    for _ in range(200):
        plan = await plan_release(store, [iface], owner)
        if (await store.txn(plan.compares, plan.ops)).succeeded:
            return
    raise AssertionError("release kept losing")


async def consistent(store: Datastore) -> set[str]:
    """The owner records and the bitmaps say the same; returns the addresses in use."""
    owners, _ = await store.list(keys.ipam_prefix(SUBNET.cidr))
    bitmaps, _ = await store.list(keys.ipam_blocks(SUBNET.cidr))
    in_use = {kv.key.rsplit("/", 1)[1] for kv in owners}
    from_bits = set()
    for kv in bitmaps:
        block = blocks.block_of(SUBNET.cidr, ipaddress.ip_address(kv.key.rsplit("/", 1)[1]))
        bits = blocks.decode(kv.value)
        from_bits |= {str(block.address(i)) for i in range(block.size) if bits >> i & 1}
    assert in_use == from_bits
    return in_use


async def test_racing_writers_never_share_an_address(store: Datastore) -> None:
    async def writer(w: int) -> list[str]:
        got = []
        for i in range(40):
            got.append(await allocate(store, f"w{w}/{i}"))
            if i % 3 == 0:  # churn: free some as we go
                await release(store, f"w{w}/{i}", got.pop())
        return got

    held = [a for part in await asyncio.gather(*(writer(w) for w in range(8))) for a in part]
    assert len(held) == len(set(held))
    assert await consistent(store) == set(held)


def _process_writer(path: str, w: int, count: int) -> None:
    async def go() -> None:
        store = SqliteStore(path)
        for i in range(count):
            await allocate(store, f"p{w}/{i}")
        await store.close()

    asyncio.run(go())


async def test_racing_processes_on_one_sqlite_file(tmp_path: Path) -> None:
    """Several agents' processes on one file: SQLite's write lock plus the block compares."""
    path = str(tmp_path / "db")
    SqliteStore(path)  # create the schema once, before the race
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_process_writer, args=(path, w, 60)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    store = SqliteStore(path)
    assert len(await consistent(store)) == 180
    await store.close()


class CountingStore(MemoryStore):
    """Counts reads: what an allocation costs, independently of time."""

    reads = 0

    async def get(self, key: str) -> KeyValue | None:  # type: ignore[override]
        self.reads += 1
        return await super().get(key)

    async def list(self, prefix: str):  # type: ignore[no-untyped-def, override]
        self.reads += 1000  # a listing is what this design must not need
        return await super().list(prefix)


@pytest.mark.parametrize("in_use", [10, 1000])
async def test_an_allocation_reads_a_few_keys_however_many_are_in_use(in_use: int) -> None:
    store = CountingStore()
    for i in range(in_use):
        await allocate(store, f"c{i}")
    store.reads = 0
    await allocate(store, "new")
    assert store.reads <= 4  # the cursor, a block, and at most one more block


async def test_a_full_block_moves_on_and_wraps_around(store: Datastore) -> None:
    small = Subnet(ipaddress.ip_network("10.30.0.0/23"), ipaddress.ip_address("10.30.0.1"))
    got = []
    for i in range(510 - 1):  # every host but the gateway
        plan = await claim_next(store, small, f"c{i}")
        assert (await store.txn(plan.compares, plan.ops)).succeeded
        got.append(str(plan.addresses[0].ip))
    assert len(set(got)) == len(got) and "10.30.1.255" not in got and "10.30.0.1" not in got
    first = ipaddress.ip_interface("10.30.0.2/23")
    plan = await plan_release(store, [first], "c0")
    assert (await store.txn(plan.compares, plan.ops)).succeeded
    again = await claim_next(store, small, "late")
    assert str(again.addresses[0].ip) == "10.30.0.2"  # the only free one, found by wrapping

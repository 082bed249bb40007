"""Per-host blocks of a spanning network's subnet, on the in-memory and SQLite stores: a host
hands out addresses only from blocks it holds, claims a new block when they are full, and hosts
racing for blocks never share one, nor an address."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plexus.errors import Exhausted, InvalidArgument
from plexus.ipam import hostblocks
from plexus.ipam.plans import claim_in_host_blocks
from plexus.model import keys
from plexus.model.types import IPNetwork, Subnet
from plexus.state.cache import Cache
from plexus.store import MemoryStore, SqliteStore
from plexus.store.base import Datastore
from plexus.store.informer import Change

SUBNET = Subnet(ipaddress.ip_network("10.30.0.0/24"), ipaddress.ip_address("10.30.0.1"))
PREFIX = 27  # 8 blocks of 32


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Datastore]:
    s: Datastore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "db")
    yield s
    await s.close()


async def held_by(store: Datastore) -> dict[IPNetwork, str]:
    kvs, _ = await store.list(keys.host_blocks(SUBNET.cidr))
    return {ipaddress.ip_network(keys.segment_cidr(kv.key.rsplit("/", 1)[1])): kv.value
            for kv in kvs}


async def allocate(store: Datastore, node: str, owner: str, view: bool = True) -> str:
    for _ in range(200):
        blocks = await held_by(store) if view else {}
        mine = sorted(b for b, n in blocks.items() if n == node)
        plan = await claim_in_host_blocks(store, SUBNET, owner, node, mine, set(blocks), PREFIX)
        if (await store.txn(plan.compares, plan.ops)).succeeded:
            return str(plan.addresses[0].ip)
        await asyncio.sleep(0)
    raise AssertionError(f"{owner}: no address after 200 tries")


async def test_a_host_fills_its_block_before_it_claims_another(store: Datastore) -> None:
    got = [await allocate(store, "h1", f"e{i}") for i in range(40)]
    blocks = await held_by(store)
    assert blocks == {ipaddress.ip_network("10.30.0.0/27"): "h1",
                      ipaddress.ip_network("10.30.0.32/27"): "h1"}
    # .0 (network), .1 (the anycast gateway), .255 and each block's first address (its
    # holder's VXLAN endpoint) are never handed out
    assert got[0] == "10.30.0.2" and got[29] == "10.30.0.31" and got[30] == "10.30.0.33"
    assert "10.30.0.32" not in got
    assert len(set(got)) == 40


async def test_hosts_take_separate_blocks_and_a_stale_view_only_costs_a_read(
    store: Datastore,
) -> None:
    a = await allocate(store, "h1", "a")
    b = await allocate(store, "h2", "b", view=False)  # h2 has not seen h1's block yet
    blocks = await held_by(store)
    assert blocks[ipaddress.ip_network("10.30.0.0/27")] == "h1"
    assert blocks[ipaddress.ip_network("10.30.0.32/27")] == "h2"
    assert (a, b) == ("10.30.0.2", "10.30.0.33")


async def test_racing_hosts_never_share_a_block_or_an_address(store: Datastore) -> None:
    async def host(n: int) -> list[str]:
        return [await allocate(store, f"h{n}", f"h{n}/{i}") for i in range(20)]

    got = await asyncio.gather(*(host(n) for n in range(3)))
    flat = [a for part in got for a in part]
    assert len(flat) == len(set(flat)) == 60
    blocks = await held_by(store)
    for n, addresses in enumerate(got):
        mine = [b for b, node in blocks.items() if node == f"h{n}"]
        assert all(any(ipaddress.ip_address(a) in b for b in mine) for a in addresses)


async def test_no_free_block_left_is_exhausted(store: Datastore) -> None:
    for n in range(8):
        await allocate(store, f"h{n}", f"first-of-h{n}")
    with pytest.raises(Exhausted, match=r"no free /27 block left in 10.30.0.0/24 for host h9"):
        blocks = await held_by(store)
        await claim_in_host_blocks(store, SUBNET, "x", "h9", [], set(blocks), PREFIX)


def test_block_sizes_that_cannot_work_are_refused() -> None:
    hostblocks.check_block_size(26, [ipaddress.ip_network("10.0.0.0/16"),
                                     ipaddress.ip_network("fd00::/64")])
    assert hostblocks.block_prefix(26, 6) == 122
    with pytest.raises(InvalidArgument, match=r"block-size '26'.*/26 block does not fit"):
        hostblocks.check_block_size(26, [ipaddress.ip_network("10.0.0.0/27")])
    with pytest.raises(InvalidArgument, match="1 to 30"):
        hostblocks.check_block_size(31, [ipaddress.ip_network("10.0.0.0/16")])


async def test_the_cache_follows_block_claims_and_releases(store: Datastore) -> None:
    cache = Cache("h1")
    await allocate(store, "h1", "a")
    await allocate(store, "h2", "b")
    kvs, rev = await store.list(keys.HOST_BLOCKS)
    cache.apply([Change(kv.key, kv, rev) for kv in kvs])
    first, second = ipaddress.ip_network("10.30.0.0/27"), ipaddress.ip_network("10.30.0.32/27")
    assert cache.blocks_of(SUBNET.cidr, "h1") == [first]
    assert cache.blocks_of(SUBNET.cidr, "h2") == [second]
    cache.apply([Change(keys.host_block(SUBNET.cidr, second), None, rev + 1)])
    assert cache.blocks_of(SUBNET.cidr, "h2") == []
    assert cache.blocks[SUBNET.cidr] == {first: "h1"}

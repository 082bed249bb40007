"""Per-host blocks going back to the pool, and addresses borrowed when none is left, on the
in-memory and SQLite stores: a host hands back a block no address of which has been in use for
the grace period, a release and an allocation racing on one block never both succeed, a host
whose blocks are full borrows from another host's when the pool has no free block, and a
borrowed address keeps its block from being released."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plexus.errors import Exhausted
from plexus.ipam.plans import Plan, claim_in_host_blocks, plan_block_release, plan_release
from plexus.model import keys
from plexus.model.types import Endpoint, IPNetwork, Network, Subnet
from plexus.services.blocks import BlockReleaser
from plexus.state.cache import Cache
from plexus.store import MemoryStore, SqliteStore
from plexus.store.base import Datastore
from plexus.store.informer import Change

# A /28 cut into four /30s: .0/30 holds .2 and .3 (.1 is the gateway), .4/30 and .8/30 three
# each, .12/30 two (.15 is the broadcast address); each block's first address is its VTEP's.
SUBNET = Subnet(ipaddress.ip_network("10.40.0.0/28"), ipaddress.ip_address("10.40.0.1"))
PREFIX = 30
NET = Network(name="ov", id="0123456789ab", driver="overlay", subnets=(SUBNET,), vni=42,
              block_size=PREFIX)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Datastore]:
    s: Datastore = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "db")
    yield s
    await s.close()


async def held_by(store: Datastore) -> dict[IPNetwork, str]:
    kvs, _ = await store.list(keys.host_blocks(SUBNET.cidr))
    return {net(keys.segment_cidr(kv.key.rsplit("/", 1)[1])): kv.value for kv in kvs}


async def plan_for(store: Datastore, node: str, owner: str) -> Plan:
    blocks = await held_by(store)
    mine = sorted(b for b, n in blocks.items() if n == node)
    return await claim_in_host_blocks(store, SUBNET, owner, node, mine, set(blocks), PREFIX)


async def allocate(store: Datastore, node: str, owner: str) -> Plan:
    for _ in range(50):
        plan = await plan_for(store, node, owner)
        if (await store.txn(plan.compares, plan.ops)).succeeded:
            return plan
    raise AssertionError(f"{owner}: no address after 50 tries")


async def release(store: Datastore, plan: Plan, owner: str) -> None:
    undo = await plan_release(store, plan.addresses, owner)
    assert (await store.txn(undo.compares, undo.ops)).succeeded


async def give_back(store: Datastore, block: IPNetwork, node: str) -> bool:
    plan = await plan_block_release(store, SUBNET.cidr, block, node)
    return plan is not None and (await store.txn(plan.compares, plan.ops)).succeeded


async def test_an_empty_block_goes_back_and_one_in_use_stays(store: Datastore) -> None:
    a = await allocate(store, "h1", "a")
    await allocate(store, "h2", "b")
    assert str(a.addresses[0].ip) == "10.40.0.2"
    assert await plan_block_release(store, SUBNET.cidr, net("10.40.0.0/30"), "h1") is None
    assert await plan_block_release(store, SUBNET.cidr, net("10.40.0.4/30"), "h1") is None
    await release(store, a, "a")  # the bitmap still exists (h2's bit): only h1's range counts
    assert await give_back(store, net("10.40.0.0/30"), "h1")
    assert await held_by(store) == {net("10.40.0.4/30"): "h2"}
    c = await allocate(store, "h3", "c")  # the block is free again: h3 claims it
    assert (await held_by(store))[net("10.40.0.0/30")] == "h3"
    assert str(c.addresses[0].ip) in ("10.40.0.2", "10.40.0.3")


async def test_an_allocation_that_commits_first_keeps_its_block(store: Datastore) -> None:
    a = await allocate(store, "h1", "a")
    await release(store, a, "a")
    giving_back = await plan_block_release(store, SUBNET.cidr, net("10.40.0.0/30"), "h1")
    assert giving_back is not None
    await allocate(store, "h1", "b")  # into the same block, before the release commits
    assert not (await store.txn(giving_back.compares, giving_back.ops)).succeeded
    assert (await held_by(store))[net("10.40.0.0/30")] == "h1"


async def test_a_release_that_commits_first_fails_the_allocation(store: Datastore) -> None:
    a = await allocate(store, "h1", "a")
    await release(store, a, "a")
    planned = await plan_for(store, "h1", "b")  # into h1's block, planned before the release
    assert planned.addresses[0].ip in net("10.40.0.0/30")
    assert await give_back(store, net("10.40.0.0/30"), "h1")
    assert not (await store.txn(planned.compares, planned.ops)).succeeded
    again = await allocate(store, "h1", "b")  # planned again: claims a block anew
    address = again.addresses[0].ip
    assert {b: n for b, n in (await held_by(store)).items() if address in b}.popitem()[1] == "h1"


async def test_racing_releases_and_allocations_never_strand_an_address(
    store: Datastore,
) -> None:
    async def churn(node: str) -> None:
        for i in range(15):
            plan = await allocate(store, node, f"{node}/{i}")
            await asyncio.sleep(0)
            if i % 4 != 3:  # every fourth stays: blocks in use and empty ones, mixed
                await release(store, plan, f"{node}/{i}")

    async def releaser(node: str) -> None:
        for _ in range(60):
            for block, holder in (await held_by(store)).items():
                if holder == node:
                    await give_back(store, block, node)
            await asyncio.sleep(0)

    await asyncio.gather(churn("h1"), churn("h2"), releaser("h1"), releaser("h2"))
    held = await held_by(store)
    addrs, _ = await store.list(keys.ipam_prefix(SUBNET.cidr))
    assert len(addrs) == 6
    for kv in addrs:  # every address still claimed lies in a block its owner's node holds
        address = ipaddress.ip_address(kv.key.rsplit("/", 1)[1])
        assert any(address in b and n == kv.value.split("/")[0] for b, n in held.items())


async def fill(store: Datastore) -> dict[str, list[Plan]]:
    """h1 takes .0/30 and .12/30, h2 .4/30, h3 .8/30, and h1's are full."""
    got: dict[str, list[Plan]] = {"h1": [], "h2": [], "h3": []}
    for node, owner in [("h1", "a1"), ("h2", "b1"), ("h3", "c1"), ("h1", "a2"), ("h1", "a3"),
                        ("h1", "a4")]:
        got[node].append(await allocate(store, node, owner))
    assert await held_by(store) == {net("10.40.0.0/30"): "h1", net("10.40.0.4/30"): "h2",
                                    net("10.40.0.8/30"): "h3", net("10.40.0.12/30"): "h1"}
    return got


async def test_a_host_whose_blocks_are_full_borrows_when_no_block_is_left(
    store: Datastore,
) -> None:
    await fill(store)
    borrowed = await allocate(store, "h1", "a5")
    assert [str(a.ip) for a in borrowed.addresses] == ["10.40.0.6"]  # in h2's block
    assert [str(a) for a in borrowed.borrowed] == ["10.40.0.6"]
    assert (await held_by(store))[net("10.40.0.4/30")] == "h2"  # still h2's
    own = await allocate(store, "h2", "b2")  # h2 goes on in its block, around the loan
    assert (str(own.addresses[0].ip), own.borrowed) == ("10.40.0.7", [])


async def test_a_loan_keeps_the_block_until_it_is_returned(store: Datastore) -> None:
    got = await fill(store)
    loan = await allocate(store, "h1", "a5")
    await release(store, got["h2"][0], "b1")  # the holder's own address goes: only the loan
    assert not await give_back(store, net("10.40.0.4/30"), "h2")
    await release(store, loan, "a5")
    assert await give_back(store, net("10.40.0.4/30"), "h2")


async def test_a_host_without_a_block_cannot_borrow(store: Datastore) -> None:
    await fill(store)
    with pytest.raises(Exhausted, match=r"no free /30 block left in 10.40.0.0/28 for host h4 "
                                        r"\(and it holds none"):
        await plan_for(store, "h4", "d1")


async def test_everything_taken_is_exhausted(store: Datastore) -> None:
    await fill(store)
    loans = [await allocate(store, "h1", f"loan{i}") for i in range(4)]
    assert [str(p.borrowed[0]) for p in loans] == ["10.40.0.6", "10.40.0.7", "10.40.0.10",
                                                    "10.40.0.11"]
    with pytest.raises(Exhausted):
        await plan_for(store, "h1", "one-too-many")


# -- the releaser: the grace period, this host's blocks only ---------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def feed(store: Datastore, cache: Cache) -> None:
    await store.put(keys.network(NET.name), NET.to_json())
    for prefix in (keys.NETWORKS, keys.HOST_BLOCKS, keys.ENDPOINTS):
        kvs, rev = await store.list(prefix)
        cache.apply([Change(kv.key, kv, rev) for kv in kvs])


async def test_the_releaser_waits_for_the_grace_period(store: Datastore) -> None:
    a = await allocate(store, "h1", "a")
    await allocate(store, "h2", "b")
    await release(store, a, "a")
    cache, clock = Cache("h1"), Clock()
    await feed(store, cache)
    releaser = BlockReleaser(store, cache, 300, clock)
    assert await releaser.run_once() == []  # first seen empty now
    clock.now += 299
    assert await releaser.run_once() == []
    clock.now += 1
    assert await releaser.run_once() == [(SUBNET.cidr, net("10.40.0.0/30"))]
    assert await held_by(store) == {net("10.40.0.4/30"): "h2"}  # h2's is not h1's to release


async def test_a_block_used_in_between_starts_its_grace_again(store: Datastore) -> None:
    a = await allocate(store, "h1", "a")
    await release(store, a, "a")
    cache, clock = Cache("h1"), Clock()
    await feed(store, cache)
    releaser = BlockReleaser(store, cache, 300, clock)
    await releaser.run_once()
    b = await allocate(store, "h1", "b")
    clock.now += 200
    assert await releaser.run_once() == []  # in use: forgotten
    await release(store, b, "b")
    clock.now += 200
    assert await releaser.run_once() == []  # empty again since now
    clock.now += 300
    assert len(await releaser.run_once()) == 1


async def test_the_borrowers_last_block_is_kept(store: Datastore) -> None:
    got = await fill(store)
    loan = await allocate(store, "h1", "a5")
    for plan, owner in zip(got["h1"], ["a1", "a2", "a3", "a4"], strict=True):
        await release(store, plan, owner)
    ep = Endpoint("x", "eth0", "ov", "h1", "/x", addresses=tuple(loan.addresses),
                  borrowed=tuple(loan.borrowed), state="ready")
    await store.put(ep.store_key, ep.to_json())
    cache, clock = Cache("h1"), Clock()
    await feed(store, cache)
    releaser = BlockReleaser(store, cache, 10, clock)
    await releaser.run_once()
    clock.now += 10
    # both of h1's blocks are empty: the higher goes, the lowest (its VTEP address) stays
    assert await releaser.run_once() == [(SUBNET.cidr, net("10.40.0.12/30"))]
    cache.apply([Change(keys.host_block(SUBNET.cidr, net("10.40.0.12/30")), None, 99)])
    clock.now += 10
    assert await releaser.run_once() == []
    assert {b for b, n in (await held_by(store)).items() if n == "h1"} == {net("10.40.0.0/30")}

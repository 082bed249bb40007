"""Hosts of a datastore: registration under a lease, unique node names among live agents, and
removing a dead host with everything it held, on the in-memory store and the fake dataplane."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from plexus.agent.wiring import Agent
from plexus.errors import Conflict, NotFound
from plexus.model import keys
from plexus.model.types import Endpoint, Host
from plexus.services import hosts
from plexus.services.endpoints import AttachSpec
from plexus.services.hosts import Registration
from plexus.services.networks import NetworkSpec
from plexus.state.cache import Cache
from plexus.store.base import Compare, Op, TxnResult
from plexus.store.informer import Change
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeKernel
from tests.unit.test_services import NETNS, make_agent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock)


async def expire(store: MemoryStore, clock: Clock, seconds: float) -> None:
    clock.now += seconds
    await store.get("/anything")  # the engine expires due leases before each operation


async def test_registration_writes_the_record_and_a_leased_liveness_key(
    store: MemoryStore, clock: Clock
) -> None:
    reg = Registration(store, Host("h1", "192.0.2.1", "id-1"), ttl=10)
    await reg.register()
    record = await store.get(keys.host("h1"))
    assert record is not None and Host.from_json(record.value).address == "192.0.2.1"
    alive = await store.get(keys.host_lease("h1"))
    assert alive is not None and alive.value == "id-1" and alive.lease == reg.lease
    await expire(store, clock, 11)  # the agent died: no keep-alive
    assert await store.get(keys.host_lease("h1")) is None
    assert await store.get(keys.host("h1")) is not None  # the host stays listed, as down


async def test_a_second_agent_with_the_same_node_name_is_refused(store: MemoryStore) -> None:
    await Registration(store, Host("h1", "192.0.2.1", "id-1")).register()
    with pytest.raises(Conflict, match=r"node name 'h1' is in use by a live agent \(192.0.2.1\)"):
        await Registration(store, Host("h1", "192.0.2.2", "id-2")).register()
    alive = await store.get(keys.host_lease("h1"))
    assert alive is not None and alive.value == "id-1"
    record = await store.get(keys.host("h1"))
    assert record is not None and Host.from_json(record.value).agent_id == "id-1"


async def test_the_same_agent_restarting_within_the_ttl_takes_its_name_back(
    store: MemoryStore,
) -> None:
    first = Registration(store, Host("h1", "192.0.2.1", "id-1"))
    await first.register()
    again = Registration(store, Host("h1", "192.0.2.1", "id-1"))  # kill -9, then a restart
    await again.register()
    alive = await store.get(keys.host_lease("h1"))
    assert alive is not None and alive.lease == again.lease != first.lease


async def test_a_clean_stop_shows_the_host_down_at_once(store: MemoryStore) -> None:
    reg = Registration(store, Host("h1", "192.0.2.1", "id-1"))
    await reg.register()
    await reg.close()
    assert await store.get(keys.host_lease("h1")) is None


async def test_the_agent_id_is_made_once_per_state_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = hosts.agent_id(tmp_path / "a")
    assert hosts.agent_id(tmp_path / "a") == first
    assert hosts.agent_id(tmp_path / "b") != first


async def test_host_rm_releases_a_dead_hosts_endpoints_and_addresses(
    tmp_path: Path, store: MemoryStore, clock: Clock
) -> None:
    kernel, firewall = FakeKernel(), FakeFirewall()
    agent = await make_agent(tmp_path, store, kernel, firewall)
    try:
        await agent.networks.create(NetworkSpec(name="n", subnets=["10.7.0.0/24"]))
        other = Registration(store, Host("h2", "192.0.2.2", "id-2"))
        await other.register()
        # h2's agent attached a container, then died (no keep-alive).
        ep = await agent.endpoints.attach(AttachSpec(container_id="c2", network="n",
                                                     netns=NETNS))
        ip = ep.addresses[0].ip
        await store.put(keys.endpoint("h2", "c2", "eth0"), replace(ep, node="h2").to_json())
        owner = keys.endpoint("h2", "c2", "eth0")
        await store.put(keys.ipam_addr("10.7.0.0/24", ip), owner)
        await store.delete(ep.store_key)
        await agent.ctx.settle(await store.revision())

        with pytest.raises(Conflict, match="is alive"):
            await hosts.remove_host(store, "h2", "n1", eps_of(agent, "h2"))
        await expire(store, clock, 11)
        with pytest.raises(Conflict, match="own node"):
            await hosts.remove_host(store, "n1", "n1", [])
        with pytest.raises(NotFound):
            await hosts.remove_host(store, "nosuch", "n1", [])
        await agent.ctx.settle(await store.revision())
        assert await hosts.remove_host(store, "h2", "n1", eps_of(agent, "h2")) == 1
        assert await store.get(keys.host("h2")) is None
        assert await store.get(keys.ipam_addr("10.7.0.0/24", ip)) is None
        assert (await store.list(keys.endpoints("h2")))[0] == []
    finally:
        await agent.close()


def eps_of(agent: Agent, node: str) -> list[Endpoint]:
    return [e for e in agent.cache.endpoints.values() if e.node == node]


async def test_a_lost_lease_is_registered_again() -> None:
    store = MemoryStore()
    reg = Registration(store, Host("h1", "192.0.2.1", "id-1"), ttl=0.3)
    await reg.register()
    first = reg.lease
    task = asyncio.create_task(reg.run())
    try:
        await store.revoke_lease(first)  # as if it expired while the store was away
        assert await store.get(keys.host_lease("h1")) is None
        for _ in range(50):
            await asyncio.sleep(0.05)
            alive = await store.get(keys.host_lease("h1"))
            if alive is not None:
                break
        assert alive is not None and alive.value == "id-1" and alive.lease == reg.lease != first
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_host_rm_of_many_endpoints_fits_etcds_transaction_limit() -> None:
    """etcd refuses more than 128 operations in one transaction: 100 endpoints go in chunks."""
    store = CountingStore()
    await store.put(keys.host("h2"), Host("h2", "192.0.2.2", "id-2").to_json())
    eps = []
    for i in range(100):
        ip = ipaddress.ip_interface(f"10.9.{i // 200}.{i % 200 + 2}/16")
        ep = Endpoint(container_id=f"c{i}", ifname="eth0", network="n", node="h2", netns="",
                      addresses=(ip,))
        await store.put(keys.endpoint("h2", f"c{i}", "eth0"), ep.to_json())
        await store.put(keys.ipam_addr(ip.network, ip.ip), ep.store_key)
        eps.append(ep)
    assert await hosts.remove_host(store, "h2", "n1", eps) == 100
    assert max(store.sizes) <= 128
    assert (await store.list(keys.ROOT))[0] == []


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        self.sizes.append(len(compares) + len(success) + len(failure))
        return await super().txn(compares, success, failure)


async def test_hosts_without_a_live_agent_for_long_enough_are_collected(
    store: MemoryStore, clock: Clock,
) -> None:
    cache = Cache("h1")
    now = time.time()
    old = Host("h2", "192.0.2.2", "id-2", started=now - 7200, seen=now - 4000)
    recent = Host("h3", "192.0.2.3", "id-3", started=now - 7200, seen=now - 100)
    alive = Host("h4", "192.0.2.4", "id-4", started=now - 7200, seen=now - 5000)
    for h in (old, recent, alive):
        await store.put(keys.host(h.name), h.to_json())
    await store.put(keys.host_lease("h4"), "id-4")
    kvs, rev = await store.list(keys.ROOT)
    cache.apply([Change(kv.key, kv, rev) for kv in kvs])
    assert hosts.expired(cache, now, 3600) == ["h2"]
    assert await hosts.collect_expired(store, cache, 3600) == ["h2"]
    assert await store.get(keys.host("h2")) is None
    assert await store.get(keys.host("h3")) is not None

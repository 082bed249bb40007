"""The periodic collection of orphan claims never takes a live endpoint's address, even one
the agent's cache has not seen yet (another attach's transaction, just committed)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from plexus.model import keys
from plexus.services.networks import NetworkSpec
from plexus.store.base import Event, Put
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeKernel
from tests.unit.test_services import attach, listed, make_agent

CIDR = "10.8.0.0/24"


class LateStore(MemoryStore):
    """Its watches deliver only while ``gate`` is set: a watch stream behind the reads, as an
    etcd watch can be (another stream, another connection)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        async for event in super().watch(prefix, start_revision):
            await self.gate.wait()
            yield event


async def test_a_claim_whose_endpoint_the_cache_has_not_seen_yet_is_kept(
    tmp_path: Path,
) -> None:
    store = LateStore()
    agent = await make_agent(tmp_path, store, FakeKernel(), FakeFirewall())
    try:
        await agent.networks.create(NetworkSpec(name="n", subnets=[CIDR]))
        a = await agent.endpoints.attach(attach("a"))
        # What a concurrent attach commits: its endpoint and its claim, together, while the
        # watch that brings it to the cache lags; it catches up during the collection.
        store.gate.clear()
        asyncio.get_running_loop().call_later(0.2, store.gate.set)
        b = replace(a, container_id="b", state="pending",
                    addresses=(ipaddress.ip_interface("10.8.0.9/24"),))
        await store.txn([], [Put(b.store_key, b.to_json()),
                             Put(keys.ipam_addr(CIDR, "10.8.0.9"), b.store_key)])
        assert agent.cache.endpoint(b.store_key) is None  # the cache is behind the store
        assert await agent.collector.collect_claims() == []
        assert keys.ipam_addr(CIDR, "10.8.0.9") in await listed(agent, keys.IPAM)
    finally:
        await agent.close()

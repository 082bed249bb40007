"""What a failed attach leaves in a store that stopped answering is rolled back once it answers
again, without an agent restart (services/leftovers.py), on in-memory doubles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from plexus.agent.wiring import Agent
from plexus.errors import StoreUnavailable
from plexus.model import keys
from plexus.services.networks import NetworkSpec
from plexus.store.base import Compare, Op, TxnResult
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeKernel
from tests.unit.test_services import attach, listed, make_agent


class FlakyStore(MemoryStore):
    """A store whose next ``lose`` transactions are applied but their answers lost (the
    connection broke after the request went out), and that refuses writes while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = 0
        self.down = False

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        if self.down:
            raise StoreUnavailable("etcd did not answer: connection refused")
        result = await super().txn(compares, success, failure)
        if self.lose:
            self.lose -= 1
            self.down = True  # and it stays away for a while, as a restarting etcd does
            raise StoreUnavailable("etcd at e1: Stream removed (Socket closed)")
        return result


@pytest.fixture
async def flaky(tmp_path: Path) -> AsyncIterator[tuple[Agent, FlakyStore]]:
    store = FlakyStore()
    agent = await make_agent(tmp_path, store, FakeKernel(), FakeFirewall())
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    try:
        yield agent, store
    finally:
        await agent.close()


async def _eventually_empty(agent: Agent, prefix: str) -> list[str]:
    for _ in range(100):  # bounded: 5 s
        found = await listed(agent, prefix)
        if not found:
            break
        await asyncio.sleep(0.05)
    return found


async def test_an_attach_whose_answer_was_lost_is_rolled_back_when_the_store_returns(
    flaky: tuple[Agent, FlakyStore],
) -> None:
    agent, store = flaky
    store.lose = 1
    with pytest.raises(StoreUnavailable):
        await agent.endpoints.attach(attach("a"))
    # Applied all the same: a pending endpoint and its claim, that nobody will ever use.
    assert await listed(agent, keys.endpoints("n1")) == [keys.endpoint("n1", "a", "eth0")]
    assert await listed(agent, keys.IPAM) != []
    await asyncio.sleep(0.5)
    assert len(agent.endpoints.leftovers) == 1  # kept while the store does not answer
    store.down = False
    assert await _eventually_empty(agent, keys.endpoints("n1")) == []
    assert await _eventually_empty(agent, keys.IPAM) == []
    for _ in range(100):  # bounded: the roll-back forgets it once the cache has let go
        if not agent.endpoints.leftovers:
            break
        await asyncio.sleep(0.05)
    assert len(agent.endpoints.leftovers) == 0


async def test_a_retry_at_once_rolls_back_its_own_leftovers_first(
    flaky: tuple[Agent, FlakyStore],
) -> None:
    agent, store = flaky
    store.lose = 1
    with pytest.raises(StoreUnavailable):
        await agent.endpoints.attach(attach("a"))
    store.down = False
    ep = await agent.endpoints.attach(attach("a"))  # not "already exists"
    assert ep.state == "ready"
    assert await listed(agent, keys.endpoints("n1")) == [ep.store_key]
    [claim] = await listed(agent, keys.IPAM)
    assert claim.endswith(f"/{ep.addresses[0].ip}")
    await asyncio.sleep(0.5)  # the background roll-back, if any, leaves the new one alone
    assert await listed(agent, keys.endpoints("n1")) == [ep.store_key]

"""The DNS reconciler loads the whole record table once at start-up and then applies only
what changed after it: the start-up queue (every endpoint of every host) is not applied again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import pytest

from plexus.agent.reconcilers.dns import DnsReconciler
from plexus.dns import DnsChanges, DnsService
from plexus.dns.records import RecordTable
from plexus.model.types import Endpoint, Network
from plexus.state.cache import Cache
from plexus.testing.dns import endpoint, network

pytestmark = pytest.mark.timeout(30)


class RecordingDns(DnsService):
    """A DnsService without listeners that remembers what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[int] = []  # endpoints per load
        self.applied: list[set[str]] = []  # endpoint keys per apply

    def load(self, networks: Iterable[Network],
             endpoints: Mapping[str, Endpoint] | Iterable[Endpoint]) -> RecordTable:
        table = super().load(networks, endpoints)
        self.loads.append(len(list(endpoints)))
        return table

    def apply(self, changes: DnsChanges) -> None:
        self.applied.append(set(changes.endpoints))
        super().apply(changes)

    async def sync_listeners(self) -> list[str]:
        return []


async def settled(r: DnsReconciler) -> None:
    for _ in range(1000):
        if not r.busy:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the reconciler did not settle")


async def test_the_start_up_queue_is_loaded_once_not_applied_again() -> None:
    cache = Cache("node1")
    cache.networks["front"] = network("front", "10.1.0.0/16")
    eps = [endpoint(f"c{i}", "front", f"10.1.{i // 250}.{i % 250 + 2}") for i in range(300)]
    for ep in eps:
        cache.endpoints[ep.store_key] = ep
    dns = RecordingDns()
    r = DnsReconciler(cache, dns)
    r.enqueue(["net:front", *(f"ep:{ep.store_key}" for ep in eps)], revision=7)
    r.start()
    try:
        await settled(r)
        assert dns.loads == [300]
        assert dns.applied == []  # 300 keys are more than one batch: none was applied again
        assert r.applied(9) == 9
        late = endpoint("late", "front", "10.1.9.9")
        cache.endpoints[late.store_key] = late
        r.enqueue([f"ep:{late.store_key}"], revision=8)
        await settled(r)
        assert dns.applied == [{late.store_key}]
    finally:
        await r.close()

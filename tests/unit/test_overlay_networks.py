"""Overlay networks in the model: a VNI each (given or the next free), per-host blocks for
addresses, and input that cannot work refused with one line naming the field; on the in-memory
store and the fake dataplane."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plexus.agent.wiring import Agent
from plexus.errors import Conflict, InvalidArgument
from plexus.model import keys
from plexus.services.endpoints import AttachSpec
from plexus.services.networks import NetworkSpec
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeKernel
from tests.unit.test_services import NETNS, make_agent


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = await make_agent(tmp_path, MemoryStore(), FakeKernel(), FakeFirewall())
    try:
        yield a
    finally:
        await a.close()


def overlay(name: str, **kw: object) -> NetworkSpec:
    return NetworkSpec(name=name, driver="overlay", **kw)  # type: ignore[arg-type]


async def test_vnis_are_the_next_free_from_4096_or_the_one_given(agent: Agent) -> None:
    a = await agent.networks.create(overlay("a", subnets=["10.40.0.0/16"]))
    b = await agent.networks.create(overlay("b", subnets=["10.41.0.0/16"], vni=77))
    c = await agent.networks.create(overlay("c", subnets=["10.42.0.0/16"]))
    assert (a.vni, b.vni, c.vni) == (4096, 77, 4097)
    assert (a.block_size, b.block_size) == (26, 26)
    held = await agent.store.get(keys.vni(77))
    assert held is not None and held.value == "b"
    with pytest.raises(Conflict, match="vni 77 is in use by network 'b'"):
        await agent.networks.create(overlay("d", subnets=["10.43.0.0/16"], vni=77))
    await agent.networks.remove("b")
    assert await agent.store.get(keys.vni(77)) is None


async def test_an_automatic_overlay_subnet_has_room_for_many_hosts(agent: Agent) -> None:
    net = await agent.networks.create(overlay("o"))
    assert net.subnets[0].cidr.prefixlen == 20  # 64 blocks of /26


@pytest.mark.parametrize(("spec", "field"), [
    (overlay("x", subnets=["10.0.0.0/27"]), "block-size"),
    (overlay("x", subnets=["10.0.0.0/16"], block_size=31), "block-size"),
    (overlay("x", subnets=["10.0.0.0/16"], vni=1 << 24), "vni"),
    (overlay("x", subnets=["10.0.0.0/16"], ip_ranges=["10.0.1.0/24"]), "ip-range"),
    (NetworkSpec(name="x", subnets=["10.0.0.0/16"], vni=5), "vni"),
    (NetworkSpec(name="x", subnets=["10.0.0.0/16"], block_size=24), "block-size"),
    (overlay("x", ipv6=True), "ipv6"),  # IPv4 only for now
    (overlay("x", subnets=["10.0.0.0/16", "fd00:1::/64"]), "subnet"),
])
async def test_overlay_input_that_cannot_work_is_refused(
    agent: Agent, spec: NetworkSpec, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await agent.networks.create(spec)
    assert err.value.field == field
    assert agent.cache.network("x") is None


async def test_addresses_come_from_this_hosts_blocks(agent: Agent) -> None:
    await agent.networks.create(overlay("o", subnets=["10.50.0.0/24"], block_size=28))
    eps = [await agent.endpoints.attach(AttachSpec(container_id=f"c{i}", network="o",
                                                   netns=NETNS)) for i in range(16)]
    got = [ep.addresses[0] for ep in eps]
    assert str(got[0]) == "10.50.0.2/24"  # the subnet's prefix; .1 is the gateway everywhere
    first, second = ipaddress.ip_network("10.50.0.0/28"), ipaddress.ip_network("10.50.0.16/28")
    assert agent.cache.blocks_of(first.supernet(new_prefix=24), "n1") == [first, second]
    assert all(a.ip in first or a.ip in second for a in got)
    with pytest.raises(InvalidArgument, match="ip"):
        await agent.endpoints.attach(AttachSpec(container_id="s", network="o", netns=NETNS,
                                                ips=[ipaddress.ip_address("10.50.0.99")]))
    await agent.networks.remove("o", force=True)
    assert (await agent.store.list(keys.HOST_BLOCKS))[0] == []

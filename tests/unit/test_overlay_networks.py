"""Overlay networks in the model: a VNI each (given or the next free), per-host blocks for
addresses (IPv6 ones on-link only within their block, with the block's gateway), and input
that cannot work refused with one line naming the field; on the in-memory store and the fake
dataplane."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plexus.agent.wiring import Agent
from plexus.cni.results import add_result
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
    # a gateway that is a block's VXLAN endpoint address, or an IPv6 block's own gateway
    (overlay("x", subnets=["10.0.0.0/16"], gateways=["10.0.0.64"]), "gateway"),
    (overlay("x", subnets=["fd00:1::/64"], gateways=["fd00:1::7f"]), "gateway"),
    # tx checksum offload: on or off, and only an overlay has a VXLAN device
    (overlay("x", subnets=["10.0.0.0/16"], options={"vxlan-offload": "yes"}),
     "opt vxlan-offload"),
    (NetworkSpec(name="x", subnets=["10.0.0.0/16"], options={"vxlan-offload": "on"}),
     "opt vxlan-offload"),
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


async def test_ipv6_alone_or_with_ipv4_makes_an_overlay(agent: Agent) -> None:
    dual = await agent.networks.create(overlay("dual", ipv6=True))
    assert [(s.cidr.version, s.cidr.prefixlen) for s in dual.subnets] == [(4, 20), (6, 64)]
    v6 = dual.subnets[1].cidr
    assert v6.subnet_of(ipaddress.ip_network("fd89:7c00::/48"))  # the ULA pool, as bridges
    only = await agent.networks.create(overlay("only6", subnets=["fd00:6::/64"]))
    assert (only.ipv6, [str(s.cidr) for s in only.subnets]) == (True, ["fd00:6::/64"])
    assert str(only.subnets[0].gateway) == "fd00:6::1"


async def test_ipv6_addresses_are_on_link_within_their_block(agent: Agent) -> None:
    await agent.networks.create(overlay("o", subnets=["10.60.0.0/24", "fd00:60::/64"],
                                        block_size=29))  # /29 and /125: 8 addresses a block
    eps = [await agent.endpoints.attach(AttachSpec(container_id=f"c{i}", network="o",
                                                   netns=NETNS)) for i in range(7)]
    v6 = [ep.addresses[1] for ep in eps]
    # IPAM keeps the subnet's prefix; block 0 loses ::0 (VTEP), ::1 (the subnet's gateway)
    # and ::7 (its own gateway), block 1 ::8 and ::f
    assert [str(a) for a in v6] == [f"fd00:60::{i:x}/64" for i in (2, 3, 4, 5, 6, 9, 0xa)]
    assert [str(g) for g in eps[0].gateways] == ["10.60.0.1", "fd00:60::7"]
    assert [str(g) for g in eps[5].gateways] == ["10.60.0.1", "fd00:60::f"]
    net = agent.networks.get("o")
    result = add_result("1.0.0", net, eps[5])
    assert [(ip["address"], ip["gateway"]) for ip in result["ips"]] == [
        ("10.60.0.7/24", "10.60.0.1"), ("fd00:60::9/125", "fd00:60::f")]
    assert {"dst": "::/0", "gw": "fd00:60::f"} in result["routes"]

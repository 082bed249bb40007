"""Overlay networks through the front doors other than ``plexus run``: Docker's IPAM pool and
remote driver, and CNI ADD. Their addresses must come from this host's blocks (other hosts route
each block to its holder), on the in-memory store and the fake dataplane."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plexus.agent.wiring import Agent
from plexus.api.docker.ipam import GATEWAY_REQUEST, DockerIpam
from plexus.cni.results import add_result
from plexus.errors import InvalidArgument
from plexus.model import keys
from plexus.services.endpoints import AttachSpec
from plexus.services.networks import NetworkSpec
from plexus.store.base import Put
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeKernel
from tests.unit.test_services import NETNS, make_agent

SUBNET = "10.50.0.0/24"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = await make_agent(tmp_path, MemoryStore(), FakeKernel(), FakeFirewall())
    try:
        yield a
    finally:
        await a.close()


async def _overlay_with_a_block_of_another_host(agent: Agent) -> None:
    """The overlay, whose first block host n2 already holds."""
    await agent.networks.create(NetworkSpec(name="ov", driver="overlay", subnets=[SUBNET],
                                            block_size=28))
    result = await agent.store.txn([], [Put(keys.host_block(SUBNET, "10.50.0.0/28"), "n2")])
    await agent.ctx.seen(result.revision)


async def _pool(ipam: DockerIpam) -> str:
    """What dockerd asks for ``docker network create --subnet SUBNET -o plexus.name=ov``."""
    answer = await ipam.request_pool({"AddressSpace": "LocalDefault", "Pool": SUBNET})
    gateway = await ipam.request_address({"PoolID": answer["PoolID"], "Options": {
        "RequestAddressType": GATEWAY_REQUEST}})
    assert gateway["Address"] == "10.50.0.1/24"  # the overlay's anycast gateway
    return str(answer["PoolID"])


async def test_a_docker_pool_of_an_overlay_hands_out_this_hosts_block(agent: Agent) -> None:
    await _overlay_with_a_block_of_another_host(agent)
    ipam = DockerIpam(agent.pools)
    pool = await _pool(ipam)
    got = [(await ipam.request_address({"PoolID": pool}))["Address"] for _ in range(16)]
    await agent.ctx.seen((await agent.store.list(keys.HOST_BLOCKS))[1])
    mine = agent.cache.blocks_of(ipaddress.ip_network(SUBNET), "n1")
    assert [str(b) for b in mine] == ["10.50.0.16/28", "10.50.0.32/28"]  # claimed as needed
    assert got[:2] == ["10.50.0.17/24", "10.50.0.18/24"]  # .16: the block's VXLAN endpoint
    assert all(any(ipaddress.ip_interface(a).ip in b for b in mine) for a in got), got
    # a requested address must be in this host's blocks too
    with pytest.raises(InvalidArgument, match="Address"):
        await ipam.request_address({"PoolID": pool, "Address": "10.50.0.5"})
    assert (await ipam.request_address({"PoolID": pool, "Address": "10.50.0.40"}))[
        "Address"] == "10.50.0.40/24"
    # released addresses go back to the block (the block stays this host's)
    await ipam.release_address({"PoolID": pool, "Address": got[0]})
    assert await agent.store.get(keys.ipam_addr(SUBNET, got[0].split("/")[0])) is None


async def test_a_docker_sub_pool_of_an_overlay_is_refused(agent: Agent) -> None:
    await _overlay_with_a_block_of_another_host(agent)
    ipam = DockerIpam(agent.pools)
    answer = await ipam.request_pool({"AddressSpace": "LocalDefault", "Pool": SUBNET,
                                      "SubPool": "10.50.0.128/25"})
    with pytest.raises(InvalidArgument, match="SubPool"):
        await ipam.request_address({"PoolID": answer["PoolID"]})


async def test_a_cni_result_never_claims_an_overlay_link_has_the_networks_mtu(
    agent: Agent,
) -> None:
    """The links of an overlay get the underlay's MTU less VXLAN's 50 bytes (the dataplane's
    business); a 1.1.0 result leaves its optional ``mtu`` out rather than say 1500."""
    await _overlay_with_a_block_of_another_host(agent)
    await agent.networks.create(NetworkSpec(name="br", subnets=["10.51.0.0/24"], mtu=1400))
    for name, mtu in (("ov", None), ("br", 1400)):
        ep = await agent.endpoints.attach(AttachSpec(container_id=f"c-{name}", network=name,
                                                     netns=NETNS, owner="cni"))
        net = agent.cache.network(name)
        assert net is not None
        [_, iface] = add_result("1.1.0", net, ep)["interfaces"]
        assert iface.get("mtu") == mtu, name
        assert add_result("1.1.0", net, ep)["ips"][0]["gateway"] == str(
            net.subnets[0].gateway)

"""The agent's services against in-memory doubles: no root, no kernel."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from plexus.agent.containers import ContainerService
from plexus.agent.core import AgentConfig, Core
from plexus.agent.endpoints import AttachSpec, EndpointService
from plexus.agent.networks import NetworkService, NetworkSpec
from plexus.agent.reconcile import Reconciler
from plexus.dataplane.driver import FakeDataplane
from plexus.dataplane.nft.firewall import FakeFirewall
from plexus.errors import (
    AlreadyExists,
    Conflict,
    DataplaneError,
    Exhausted,
    InUse,
    InvalidArgument,
    NotFound,
)
from plexus.model import keys, parse
from plexus.store.memory import MemoryStore


@pytest.fixture
def core(tmp_path: Path) -> Core:
    cfg = AgentConfig(state_dir=tmp_path, socket=tmp_path / "s", node="n1")
    c = Core(config=cfg, store=MemoryStore(), dataplane=FakeDataplane(), firewall=FakeFirewall())
    c.ready = True
    return c


@pytest.fixture
def nets(core: Core) -> NetworkService:
    return NetworkService(core)


@pytest.fixture
def eps(core: Core, monkeypatch: pytest.MonkeyPatch) -> EndpointService:
    # Unit tests have no real netns; the check itself is covered by integration tests.
    monkeypatch.setattr("plexus.agent.endpoints.netns.check_netns", lambda path: None)
    return EndpointService(core)


async def test_auto_subnets_skip_taken_and_local_prefixes(core: Core, nets: NetworkService) -> None:
    assert isinstance(core.dataplane, FakeDataplane)
    core.dataplane.prefixes = [(ipaddress.ip_network("10.89.0.0/24"), "route via eth0")]
    a = await nets.create(NetworkSpec(name="a"))
    b = await nets.create(NetworkSpec(name="b", ipv6=True))
    assert [str(s.cidr) for s in a.subnets] == ["10.89.1.0/24"]
    assert [str(s.cidr) for s in b.subnets] == ["10.89.2.0/24", "fd89:7c00::/64"]
    assert str(a.subnets[0].gateway) == "10.89.1.1"


async def test_explicit_subnet_conflicts_name_the_other_side(nets: NetworkService) -> None:
    await nets.create(NetworkSpec(name="a", subnets=["10.5.0.0/16"]))
    with pytest.raises(Conflict, match=r"10\.5\.1\.0/24 overlaps 10\.5\.0\.0/16 \(network a\)"):
        await nets.create(NetworkSpec(name="b", subnets=["10.5.1.0/24"]))
    with pytest.raises(AlreadyExists, match="network 'a' already exists"):
        await nets.create(NetworkSpec(name="a", subnets=["10.6.0.0/16"]))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (NetworkSpec(name="x", subnets=["10.0.0.0/33"]), "subnet"),
        (NetworkSpec(name="x", subnets=["10.0.0.0/24"], gateways=["10.1.0.1"]), "gateway"),
        (NetworkSpec(name="x", subnets=["10.0.0.0/24"], ip_ranges=["10.2.0.0/25"]), "ip-range"),
        (NetworkSpec(name="x", driver="vlan"), "driver"),
        (NetworkSpec(name="bad name"), "name"),
        (NetworkSpec(name="x", mtu=10), "mtu"),
    ],
)
async def test_bad_network_input_leaves_nothing(
    core: Core, nets: NetworkService, spec: NetworkSpec, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await nets.create(spec)
    assert err.value.field == field
    assert (await core.store.list("/plexus/"))[0] == []
    assert isinstance(core.dataplane, FakeDataplane) and not core.dataplane.bridges


async def test_two_hundred_parallel_attaches_never_share_an_address(
    core: Core, nets: NetworkService, eps: EndpointService
) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.7.0.0/23"], ipv6=True))
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with sem:
            ep = await eps.attach(AttachSpec(container_id=f"c{i}", network="n", netns="/x"))
            return ",".join(str(a.ip) for a in ep.addresses)

    got = await asyncio.gather(*(one(i) for i in range(200)))
    flat = [a for pair in got for a in pair.split(",")]
    assert len(flat) == 400 and len(set(flat)) == 400
    kvs, _ = await core.store.list(keys.IPAM)
    assert len(kvs) == 400


async def test_static_ip_errors(nets: NetworkService, eps: EndpointService) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await eps.attach(
        AttachSpec(
            container_id="a", network="n", netns="/x", ips=[ipaddress.ip_address("10.8.0.10")]
        )
    )
    with pytest.raises(InvalidArgument, match="'10.8.0.10': already in use"):
        await eps.attach(
            AttachSpec(
                container_id="b", network="n", netns="/x", ips=[ipaddress.ip_address("10.8.0.10")]
            )
        )
    with pytest.raises(InvalidArgument, match="not in network n"):
        await eps.attach(
            AttachSpec(
                container_id="b", network="n", netns="/x", ips=[ipaddress.ip_address("10.9.0.10")]
            )
        )


async def test_exhaustion(nets: NetworkService, eps: EndpointService) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/30"]))  # .1 gateway, .2 free
    await eps.attach(AttachSpec(container_id="a", network="n", netns="/x"))
    with pytest.raises(Exhausted, match="network n"):
        await eps.attach(AttachSpec(container_id="b", network="n", netns="/x"))


async def test_failed_programming_rolls_back_everything(
    core: Core, nets: NetworkService, eps: EndpointService
) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    assert isinstance(core.dataplane, FakeDataplane)
    core.dataplane.fail_endpoint = True
    with pytest.raises(DataplaneError):
        await eps.attach(
            AttachSpec(
                container_id="a", network="n", netns="/x", ports=[parse.port_mapping("8080:80")]
            )
        )
    assert (await core.store.list(keys.ENDPOINTS))[0] == []
    assert (await core.store.list(keys.IPAM))[0] == []
    assert (await core.store.list(keys.PORTS))[0] == []
    assert core.endpoints == {}


async def test_published_port_conflicts(nets: NetworkService, eps: EndpointService) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await eps.attach(
        AttachSpec(
            container_id="a", network="n", netns="/x", ports=[parse.port_mapping("8000-8010:80")]
        )
    )
    with pytest.raises(Conflict, match="already published by a"):
        await eps.attach(
            AttachSpec(
                container_id="b", network="n", netns="/x", ports=[parse.port_mapping("8005:80")]
            )
        )


async def test_network_in_use_needs_force(
    core: Core, nets: NetworkService, eps: EndpointService
) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await eps.attach(AttachSpec(container_id="a", network="n", netns="/x"))
    with pytest.raises(InUse, match="network 'n' has 1 endpoint"):
        await nets.remove("n")
    await nets.remove("n", force=True)
    assert (await core.store.list("/plexus/"))[0] == []


async def test_detach_is_strict_unless_missing_ok(
    nets: NetworkService, eps: EndpointService
) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    with pytest.raises(NotFound):
        await eps.detach("nobody", network="n")
    assert await eps.detach("nobody", network="n", missing_ok=True) is None


async def test_recovery_rolls_back_pending_and_collects_garbage(
    core: Core, nets: NetworkService, eps: EndpointService, tmp_path: Path
) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    alive = tmp_path / "netns-a"  # stands for a namespace that still exists
    alive.touch()
    ep = await eps.attach(AttachSpec(container_id="a", network="n", netns=str(alive)))
    # Simulate a crash between the pending write and the ready write of another attach, and
    # a stray address claim whose endpoint row is gone.
    pending = ep.__class__(
        **{
            **{f: getattr(ep, f) for f in ep.__dataclass_fields__},
            "container_id": "b",
            "state": "pending",
        }
    )
    await core.store.put(keys.endpoint("n1", "b", "eth0"), pending.to_json())
    await core.store.put(
        keys.ipam_addr("10.8.0.0/24", "10.8.0.99"), keys.endpoint("n1", "ghost", "eth0")
    )
    # The stale copy names a's address: rolling it back must not free what a owns.
    report = await Reconciler(core, ContainerService(core)).recover()
    assert "endpoint b/eth0" in report.rolled_back
    kvs, _ = await core.store.list(keys.ENDPOINTS)
    assert [kv.key for kv in kvs] == [keys.endpoint("n1", "a", "eth0")]
    addrs, _ = await core.store.list(keys.IPAM)
    assert [kv.key.rsplit("/", 1)[1] for kv in addrs] == [str(ep.addresses[0].ip)]


async def test_recovery_releases_endpoints_whose_netns_is_gone(
    core: Core, nets: NetworkService, eps: EndpointService
) -> None:
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await eps.attach(AttachSpec(container_id="a", network="n", netns="/nonexistent/netns"))
    report = await Reconciler(core, ContainerService(core)).recover()
    assert report.released == ["a/eth0"]
    assert (await core.store.list(keys.IPAM))[0] == []


async def test_recovery_leaves_docker_endpoints_to_docker(
    core: Core, nets: NetworkService, eps: EndpointService
) -> None:
    """Docker mounts the namespace at SandboxKey only after Join: a missing path is no sign
    that the container is gone, so only Docker's own Leave/DeleteEndpoint releases."""
    await nets.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await eps.attach(AttachSpec(container_id="d", network="n", netns="/not/yet/mounted",
                                owner="docker", peer_in_host=True))
    report = await Reconciler(core, ContainerService(core)).recover()
    assert report.released == []
    assert len((await core.store.list(keys.IPAM))[0]) == 1

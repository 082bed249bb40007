"""The agent's services and reconcilers, wired as the daemon wires them, on in-memory doubles:
no root, no kernel."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plexus.agent import wiring
from plexus.agent.reconcilers.firewall import VERIFY
from plexus.agent.wiring import Agent
from plexus.config import AgentConfig
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
from plexus.runtime.containers import RunSpec
from plexus.services.endpoints import AttachSpec
from plexus.services.networks import NetworkSpec
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeHost, FakeKernel, fake_drivers


async def make_agent(tmp_path: Path, store: MemoryStore, kernel: FakeKernel,
                     firewall: FakeFirewall, host: FakeHost | None = None) -> Agent:
    cfg = AgentConfig(state_dir=tmp_path, socket=tmp_path / "s", node="n1")
    agent = wiring.build(cfg, store, fake_drivers(kernel), firewall, host or FakeHost(), kernel)
    await agent.start()
    return agent


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def firewall() -> FakeFirewall:
    return FakeFirewall()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def agent(tmp_path: Path, store: MemoryStore, kernel: FakeKernel,
                firewall: FakeFirewall) -> AsyncIterator[Agent]:
    a = await make_agent(tmp_path, store, kernel, firewall)
    try:
        yield a
    finally:
        await a.close()


NETNS = "/proc/self/ns/net"
# Every agent has them (as Docker does), and its host's record and liveness key.
BUILTIN = [keys.host_lease("n1"), keys.host("n1"), keys.network("host"),
           keys.network("none")]


def attach(container: str, network: str = "n", **kw: object) -> AttachSpec:
    # An existing path: the link reconciler takes a missing namespace for a container gone.
    return AttachSpec(container_id=container, network=network, netns=NETNS, **kw)  # type: ignore[arg-type]


async def listed(agent: Agent, prefix: str) -> list[str]:
    return [kv.key for kv in (await agent.store.list(prefix))[0]]


# -- networks ------------------------------------------------------------------------------------


async def test_auto_subnets_skip_taken_and_local_prefixes(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    host = FakeHost(prefixes=[(ipaddress.ip_network("10.89.0.0/24"), "route via eth0")])
    agent = await make_agent(tmp_path, store, kernel, firewall, host)
    a = await agent.networks.create(NetworkSpec(name="a"))
    b = await agent.networks.create(NetworkSpec(name="b", ipv6=True))
    assert [str(s.cidr) for s in a.subnets] == ["10.89.1.0/24"]
    assert [str(s.cidr) for s in b.subnets] == ["10.89.2.0/24", "fd89:7c00::/64"]
    assert str(a.subnets[0].gateway) == "10.89.1.1"
    await agent.close()


async def test_a_created_network_is_programmed_when_create_returns(
    agent: Agent, kernel: FakeKernel
) -> None:
    net = await agent.networks.create(NetworkSpec(name="web"))
    assert kernel.links == {net.bridge: f"plexus:{kernel.owner}:net:web"}


async def test_explicit_subnet_conflicts_name_the_other_side(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="a", subnets=["10.5.0.0/16"]))
    with pytest.raises(Conflict, match=r"10\.5\.1\.0/24 overlaps 10\.5\.0\.0/16 \(network a\)"):
        await agent.networks.create(NetworkSpec(name="b", subnets=["10.5.1.0/24"]))
    with pytest.raises(AlreadyExists, match="network 'a' already exists"):
        await agent.networks.create(NetworkSpec(name="a", subnets=["10.6.0.0/16"]))


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
    agent: Agent, kernel: FakeKernel, spec: NetworkSpec, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await agent.networks.create(spec)
    assert err.value.field == field
    assert await listed(agent, keys.ROOT) == BUILTIN
    assert kernel.links == {}


# -- endpoints -----------------------------------------------------------------------------------


async def test_attach_answers_once_links_firewall_and_dns_hold_the_endpoint(
    agent: Agent, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    ep = await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("8080:80")]))
    assert ep.state == "ready" and str(ep.addresses[0]) == "10.8.0.2/24"
    assert kernel.endpoints[ep.store_key].addresses == ep.addresses
    assert firewall.state is not None
    assert {(p.host_port, str(p.container_ip)) for p in firewall.state.pubs} == {
        (8080, "10.8.0.2")}
    assert agent.cache.endpoint(ep.store_key) == ep  # the caller reads its own write


async def test_two_hundred_parallel_attaches_never_share_an_address(
    agent: Agent, firewall: FakeFirewall
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.7.0.0/23"], ipv6=True))
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> str:
        async with sem:
            ep = await agent.endpoints.attach(attach(f"c{i}", ports=[
                parse.port_mapping(f"{9000 + i}:80")]))
            return ",".join(str(a.ip) for a in ep.addresses)

    got = await asyncio.gather(*(one(i) for i in range(200)))
    flat = [a for pair in got for a in pair.split(",")]
    assert len(flat) == 400 and len(set(flat)) == 400
    assert len(await listed(agent, keys.IPAM)) == 400
    # One full table at start-up, then only element deltas: never the whole table again.
    assert firewall.syncs == 1
    assert firewall.state is not None and len(firewall.state.pubs) == 400


async def test_static_ip_errors(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    ten = ipaddress.ip_address("10.8.0.10")
    await agent.endpoints.attach(attach("a", name="web", ips=[ten]))
    with pytest.raises(Conflict, match="address 10.8.0.10 is already in use by web"):
        await agent.endpoints.attach(attach("b", ips=[ten]))
    with pytest.raises(InvalidArgument, match="not in network n"):
        await agent.endpoints.attach(attach("b", ips=[ipaddress.ip_address("10.9.0.10")]))
    with pytest.raises(Conflict, match="in use by the gateway of 10.8.0.0/24"):
        await agent.endpoints.attach(attach("b", ips=[ipaddress.ip_address("10.8.0.1")]))
    with pytest.raises(InvalidArgument, match="reserved address"):
        await agent.endpoints.attach(attach("b", ips=[ipaddress.ip_address("10.8.0.255")]))


async def test_exhaustion(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/30"]))  # .2 free
    await agent.endpoints.attach(attach("a"))
    with pytest.raises(Exhausted, match="network n"):
        await agent.endpoints.attach(attach("b"))


async def test_addresses_are_sequential_and_a_freed_one_is_not_reused_at_once(
    agent: Agent
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    a = await agent.endpoints.attach(attach("a"))
    b = await agent.endpoints.attach(attach("b"))
    await agent.endpoints.detach("a", network="n")
    c = await agent.endpoints.attach(attach("c"))
    assert [str(e.addresses[0].ip) for e in (a, b, c)] == ["10.8.0.2", "10.8.0.3", "10.8.0.4"]


async def test_failed_programming_rolls_back_everything(
    agent: Agent, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    kernel.fail_endpoint = "a"
    with pytest.raises(DataplaneError, match="links: fake: endpoint programming failed"):
        await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("8080:80")]))
    for prefix in (keys.ENDPOINTS, keys.IPAM, keys.IPAM_BLOCKS, keys.PORTS):
        assert await listed(agent, prefix) == []
    assert agent.cache.local_endpoints() == []
    assert firewall.state is not None and not firewall.state.pubs
    assert agent.progress.errors() == []  # the rollback converged: nothing left failing


async def test_an_object_that_keeps_failing_is_retried_and_shown_while_others_go_on(
    agent: Agent, kernel: FakeKernel
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    a = await agent.endpoints.attach(attach("a"))
    kernel.fail_endpoint = "a"
    agent.links.invalidate("ep:" + a.store_key)  # as a kernel event would
    await agent.endpoints.attach(attach("b"))  # not held up by a's trouble
    for _ in range(100):
        if agent.progress.errors():
            break
        await asyncio.sleep(0.01)
    [error] = agent.progress.errors()
    assert error["object"] == "ep:" + a.store_key and "fake" in str(error["error"])
    kernel.fail_endpoint = ""
    for _ in range(300):  # the retry's backoff starts at 0.2 s
        if not agent.progress.errors():
            break
        await asyncio.sleep(0.01)
    assert agent.progress.errors() == []
    assert a.store_key in kernel.endpoints


async def test_published_port_conflicts_name_the_port_and_the_holder(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await agent.endpoints.attach(attach("a", name="web",
                                        ports=[parse.port_mapping("8000-8010:80")]))
    with pytest.raises(Conflict, match=r"host port 8005/tcp is already published by web"):
        await agent.endpoints.attach(attach("b", ports=[parse.port_mapping("8005:80")]))
    with pytest.raises(Conflict, match=r"127\.0\.0\.1:8001/tcp is already published by web"):
        await agent.endpoints.attach(attach("b", ports=[parse.port_mapping("127.0.0.1:8001:80")]))


async def test_one_port_on_two_host_addresses_is_two_publications(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("127.0.0.1:8080:80")]))
    await agent.endpoints.attach(attach("b", ports=[parse.port_mapping("10.0.0.5:8080:80")]))
    with pytest.raises(Conflict, match="already published"):
        await agent.endpoints.attach(attach("c", ports=[parse.port_mapping("8080:80")]))
    await agent.endpoints.detach("a", network="n")
    await agent.endpoints.attach(attach("d", ports=[parse.port_mapping("127.0.0.1:8080:80")]))


async def test_set_ports_moves_claims_in_one_transaction(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    ep = await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("8080:80")]))
    await agent.endpoints.set_ports(ep.store_key, [parse.port_mapping("9090:80")])
    assert await listed(agent, keys.PORTS) == [keys.port("n1", "tcp", 9090)]
    await agent.endpoints.attach(attach("b", ports=[parse.port_mapping("8080:80")]))


async def test_network_in_use_needs_force_and_force_detaches_everything(
    agent: Agent, kernel: FakeKernel
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("8080:80")]))
    await agent.endpoints.attach(attach("b"))
    with pytest.raises(InUse, match="network 'n' has 2 endpoint"):
        await agent.networks.remove("n")
    assert await agent.networks.remove("n", force=True) == 2
    assert await listed(agent, keys.ROOT) == BUILTIN
    assert kernel.links == {} and kernel.endpoints == {}


async def test_detach_is_strict_unless_missing_ok(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    with pytest.raises(NotFound):
        await agent.endpoints.detach("nobody", network="n")
    assert await agent.endpoints.detach("nobody", network="n", missing_ok=True) is None


# -- restart and recovery ------------------------------------------------------------------------


async def test_a_restarted_agent_changes_nothing_that_is_right(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    first = await make_agent(tmp_path, store, kernel, firewall)
    await first.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    for i in range(5):
        await first.endpoints.attach(attach(f"c{i}", ports=[parse.port_mapping(f"{80 + i}:80")]))
    await first.close()
    calls, fw_calls = list(kernel.calls), list(firewall.calls)
    second = await make_agent(tmp_path, store, kernel, firewall)
    await second.fullpass.run()
    assert kernel.calls == calls and firewall.calls == fw_calls
    await second.close()


async def test_the_full_pass_leaves_another_agents_links_alone(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    # Another agent (another state directory: another store) left its links in this namespace.
    theirs = {"pxbr-theirs": "plexus:n1@ffffffff:net:n",
              "pxv-theirs": "plexus:n1@ffffffff:ep:c/eth0"}
    kernel.links.update(theirs)
    agent = await make_agent(tmp_path, store, kernel, firewall)
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    await agent.endpoints.attach(attach("c"))
    report = await agent.fullpass.run()
    assert report["orphans"] == [] and report["drifted"] == []
    assert {n: kernel.links[n] for n in theirs} == theirs
    assert ("delete_link", "pxbr-theirs") not in kernel.calls
    await agent.close()


async def test_legacy_links_are_adopted_and_re_tagged_not_deleted(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    first = await make_agent(tmp_path, store, kernel, firewall)
    net = await first.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    ep = await first.endpoints.attach(attach("c"))
    await first.close()
    # As an agent before owners left them: "plexus:KIND:NAME"; and one nothing wants.
    kernel.links = {net.bridge: "plexus:net:n", ep.host_ifname: "plexus:ep:c/eth0",
                    "pxv-stale": "plexus:ep:gone/eth0"}
    second = await make_agent(tmp_path, store, kernel, firewall)
    report = await second.fullpass.run()
    assert report["orphans"] == ["pxv-stale"]
    assert kernel.links == {net.bridge: f"plexus:{kernel.owner}:net:n",
                            ep.host_ifname: f"plexus:{kernel.owner}:ep:c/eth0"}
    assert ("delete_link", net.bridge) not in kernel.calls
    assert ("delete_link", ep.host_ifname) not in kernel.calls
    await second.close()


async def test_recovery_rolls_back_pending_and_collects_garbage(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    first = await make_agent(tmp_path, store, kernel, firewall)
    await first.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    ep = await first.endpoints.attach(attach("a"))
    await first.close()
    # A crash between the pending write and the ready write of another attach (its stale
    # copy names a's address), and a stray claim whose endpoint is gone.
    pending = ep.__class__(**{**{f: getattr(ep, f) for f in ep.__dataclass_fields__},
                              "container_id": "b", "state": "pending"})
    await store.put(keys.endpoint("n1", "b", "eth0"), pending.to_json())
    await store.put(keys.ipam_addr("10.8.0.0/24", "10.8.0.99"),
                    keys.endpoint("n1", "ghost", "eth0"))
    second = await make_agent(tmp_path, store, kernel, firewall)
    report = await second.fullpass.run()
    assert await listed(second, keys.ENDPOINTS) == [keys.endpoint("n1", "a", "eth0")]
    assert await listed(second, keys.IPAM) == [keys.ipam_addr("10.8.0.0/24", ep.addresses[0].ip)]
    assert report["claims_collected"] == [keys.ipam_addr("10.8.0.0/24", "10.8.0.99")]
    await second.close()


async def test_endpoints_whose_netns_is_gone_are_released(agent: Agent, tmp_path: Path) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    alive = tmp_path / "netns-a"
    alive.touch()
    await agent.endpoints.attach(AttachSpec(container_id="a", network="n", netns=str(alive)))
    await agent.endpoints.attach(AttachSpec(container_id="b", network="n", netns="/gone/b"))
    await agent.endpoints.attach(AttachSpec(container_id="d", network="n", netns="/not/yet",
                                            owner="docker", peer_in_host=True))
    report = await agent.fullpass.run()
    for _ in range(100):
        if agent.collector.released:
            break
        await asyncio.sleep(0.01)
    assert report["namespaces_gone"] == 1 and agent.collector.released == ["b/eth0"]
    # Docker mounts the namespace at SandboxKey only after Join: its endpoints are Docker's.
    assert {e.container_id for e in agent.cache.local_endpoints()} == {"a", "d"}


async def test_a_run_container_is_one_transaction_with_its_endpoints(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    made: list[str] = []
    monkeypatch.setattr("plexus.runtime.containers.netns.create_named", made.append)
    monkeypatch.setattr("plexus.runtime.containers.netns.delete_named", lambda n: None)
    with pytest.raises(InvalidArgument):
        await agent.containers.run(RunSpec(name="x", command=["no-such-binary-here"],
                                           networks=["n"]))
    c = await agent.containers.run(RunSpec(name="x", command=["true"], networks=["n"]))
    assert made == [c.netns_name]
    assert [e.network for e in agent.endpoints.of_container(c.id)] == ["n"]
    with pytest.raises(AlreadyExists, match="container 'x' already exists"):
        await agent.containers.run(RunSpec(name="x", command=["true"], networks=["n"]))
    await agent.containers.remove("x", force=True)
    assert await listed(agent, keys.ENDPOINTS) == [] and agent.cache.containers == {}


class SlowFirewall(FakeFirewall):
    """Reading the kernel takes time, as it does: the cache moves on meanwhile."""

    async def current(self):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.002)
        return await super().current()


async def test_a_full_comparison_racing_changes_never_loses_one(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel
) -> None:
    firewall = SlowFirewall()
    agent = await make_agent(tmp_path, store, kernel, firewall)
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    for i in range(30):
        agent.firewall.enqueue([VERIFY])  # as the periodic pass does, at any moment
        await agent.endpoints.attach(attach(f"c{i}", ports=[parse.port_mapping(f"{7000 + i}:80")]))
        if i % 2:
            await agent.endpoints.detach(f"c{i - 1}", network="n")
    await agent.ctx.settle(agent.informer.revision)
    assert firewall.state is not None
    assert firewall.state.pubs == agent.firewall.desired().state.pubs
    assert {p.host_port for p in firewall.state.pubs} == {7000 + i for i in range(1, 30, 2)}
    await agent.close()


async def test_host_and_none_are_built_in(agent: Agent) -> None:
    assert [n.name for n in agent.networks.all()] == ["host", "none"]
    with pytest.raises(Conflict, match="'host' is built in and cannot be removed"):
        await agent.networks.remove("host")
    ep = await agent.endpoints.attach(attach("a", network="none"))
    assert ep.addresses == () and ep.gateways == ()


@pytest.mark.parametrize(("spec", "field"), [
    (dict(aliases=["bad alias!"]), "alias"),
    (dict(namespace="Bad NS"), "namespace"),
    (dict(labels={"app": "x y"}), "label"),
    (dict(labels={"-x": "1"}), "label"),
])
async def test_names_are_dns_and_kubernetes_names(agent: Agent, spec: dict[str, object],
                                                  field: str) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    with pytest.raises(InvalidArgument) as err:
        await agent.endpoints.attach(attach("a", **spec))
    assert err.value.field == field
    assert await listed(agent, keys.ENDPOINTS) == []


@pytest.mark.parametrize(("spec", "field", "value"), [
    (NetworkSpec(name="x", subnets=["10.0.0.0/24"], gateways=["10.0.0.1", "10.0.0.2"]),
     "gateway", "10.0.0.2"),
])
async def test_network_input_that_cannot_work_is_refused(
    agent: Agent, spec: NetworkSpec, field: str, value: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        await agent.networks.create(spec)
    assert (err.value.field, err.value.value) == (field, value)


async def test_an_ipv6_subnet_alone_makes_an_ipv6_only_network(agent: Agent) -> None:
    net = await agent.networks.create(NetworkSpec(name="six", subnets=["fd00:1::/64"]))
    assert [str(s.cidr) for s in net.subnets] == ["fd00:1::/64"] and net.ipv6


async def test_an_ip_range_in_the_second_subnet(agent: Agent) -> None:
    net = await agent.networks.create(NetworkSpec(
        name="two", subnets=["10.61.0.0/24", "10.62.0.0/24"], ip_ranges=["10.62.0.128/25"]))
    assert [str(s.ip_range) for s in net.subnets] == ["None", "10.62.0.128/25"]


async def test_a_port_on_an_address_the_host_lacks_is_refused(
    tmp_path: Path, store: MemoryStore, kernel: FakeKernel, firewall: FakeFirewall
) -> None:
    agent = await make_agent(tmp_path, store, kernel, firewall,
                             FakeHost(addresses={"203.0.113.1"}))
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    with pytest.raises(InvalidArgument, match="the host has no address 10.9.9.9") as err:
        await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("10.9.9.9:7000:80")]))
    assert err.value.field == "publish" and await listed(agent, keys.ENDPOINTS) == []
    await agent.endpoints.attach(attach("a", ports=[parse.port_mapping("203.0.113.1:7000:80")]))
    await agent.close()

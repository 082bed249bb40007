"""Services through the agent's service layer, wired as the daemon wires it (in-memory store
and kernels): VIPs from the range, one transaction or nothing, and ``plexus apply`` of files
that mix Services with policies."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from plexus.agent import wiring
from plexus.agent.health import HealthProber
from plexus.agent.wiring import Agent
from plexus.config import AgentConfig
from plexus.errors import AlreadyExists, Conflict, InUse, InvalidArgument
from plexus.lb import vips
from plexus.lb.model import Backend
from plexus.lb.spec import Health, Publish, Service, ServicePort
from plexus.model import keys
from plexus.model.types import Endpoint, PortMapping
from plexus.services.lbservices import ServiceRegistry
from plexus.services.manifests import Manifests
from plexus.services.networks import NetworkSpec
from plexus.services.policies import PolicyService
from plexus.services.ports import PortChange, plan_ports
from plexus.store.base import Put
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeHost, FakeKernel, fake_drivers
from plexus.testing.lb import FakeServiceKernel

IP = ipaddress.ip_address
RANGE = "10.96.0.0/24"


@pytest.fixture
def lb() -> FakeServiceKernel:
    return FakeServiceKernel()


@pytest.fixture
async def agent(tmp_path: Path, lb: FakeServiceKernel) -> AsyncIterator[Agent]:
    cfg = AgentConfig(state_dir=tmp_path, socket=tmp_path / "s", node="n1",
                      service_cidrs=vips.parse([RANGE]))
    kernel = FakeKernel()
    a = wiring.build(cfg, MemoryStore(), fake_drivers(kernel), FakeFirewall(), FakeHost(),
                     kernel, lb_kernel=lb)
    await a.start()
    await a.networks.create(NetworkSpec(name="net"))
    try:
        yield a
    finally:
        await a.close()


def registry(agent: Agent) -> ServiceRegistry:
    return ServiceRegistry(agent.ctx)


def web(**kw: object) -> Service:
    base = Service("default", "web", "net", {"app": "web"}, (ServicePort(80, "tcp", 8080),))
    return replace(base, **kw)  # type: ignore[arg-type]


async def stored(agent: Agent) -> list[str]:
    found = []
    for prefix in (keys.SERVICES, keys.SERVICE_IPS, keys.SERVICE_PORTS, keys.NAMESPACES,
                   keys.POLICIES):
        found += [kv.key for kv in (await agent.store.list(prefix))[0]]
    return found


async def test_a_service_gets_a_vip_of_the_range_and_is_programmed_when_create_returns(
        agent: Agent, lb: FakeServiceKernel) -> None:
    made = await registry(agent).create(web(), [])
    [vip] = made.vips
    assert vip in ipaddress.ip_network(RANGE)
    assert lb.table is not None and (vip, "tcp", 80) in lb.table
    assert await stored(agent) == [keys.service("default", "web"), keys.service_ip(vip)]
    gone = await registry(agent).remove("default", "web")
    assert gone.vips == (vip,) and await stored(agent) == [] and lb.table is None


async def test_bad_requests_name_the_field_and_leave_nothing(agent: Agent) -> None:
    reg = registry(agent)
    await reg.create(web(), [IP("10.96.0.7")])
    before = await stored(agent)
    cases: list[tuple[Service, list[ipaddress.IPv4Address], str]] = [
        (web(name="b"), [IP("10.96.0.7")], "ip"),  # taken
        (web(name="b"), [IP("10.97.0.7")], "ip"),  # outside the range
        (web(name="b", network="nope"), [], "network"),
        (web(name="B_ad"), [], "name"),
        (web(name="b", namespace="Bad Ns"), [], "namespace"),
    ]
    for svc, ips, field in cases:
        with pytest.raises(InvalidArgument) as err:
            await reg.create(svc, ips)
        assert err.value.field == field, err.value.message
        assert "\n" not in err.value.message
    with pytest.raises(AlreadyExists, match="service web already exists in namespace default"):
        await reg.create(web(), [])
    assert await stored(agent) == before


async def test_published_host_ports_are_claimed_once(agent: Agent) -> None:
    reg = registry(agent)
    await reg.create(web(publish=(Publish(8080, 80),)), [])
    with pytest.raises(InvalidArgument, match="published by service default/web") as err:
        await reg.create(web(name="other", publish=(Publish(8080, 80),)), [])
    assert err.value.field == "publish"
    taken = await agent.store.txn([], [Put(keys.port("n1", "tcp", 9090),
                                           '{"127.0.0.1": "/plexus/endpoints/n1/c/eth0"}')])
    await agent.ctx.seen(taken.revision)
    with pytest.raises(InvalidArgument, match="published by a container on n1"):
        await reg.create(web(name="c", publish=(Publish(9090, 80),)), [])
    await reg.create(web(name="d", publish=(Publish(9090, 80, "tcp", IP("10.0.0.5")),)), [])


async def test_a_container_cannot_take_a_port_a_service_publishes(agent: Agent) -> None:
    await registry(agent).create(web(publish=(Publish(8080, 80),)), [])
    wants = PortChange("n1", "/plexus/endpoints/n1/c/eth0", new=(PortMapping(8080, 80),))
    with pytest.raises(Conflict, match="host port 8080/tcp is published by service default/web"):
        await plan_ports(agent.store, [wants])
    udp = PortChange("n1", "/plexus/endpoints/n1/c/eth0", new=(PortMapping(8080, 80, "udp"),))
    plan = await plan_ports(agent.store, [udp])  # another protocol: free, and guarded
    assert keys.service_port("udp", 8080) in {c.key for c in plan.compares}


FILE = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  type: NodePort
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: shop}
spec:
  clusterIP: None
  selector: {app: api}
  ports: [{port: 7000}]
"""


def manifests(agent: Agent) -> Manifests:
    return Manifests(agent.ctx, PolicyService(agent.ctx), registry(agent))


async def test_apply_writes_services_and_policies_together(agent: Agent) -> None:
    done = await manifests(agent).apply(FILE, "f.yaml")
    assert [o.line() for o in done] == ["NetworkPolicy shop/deny created",
                                        "Service shop/api created", "Service shop/peers created"]
    api = agent.cache.service("shop", "api")
    assert api is not None and api.publish == (Publish(30000, 80),) and len(api.vips) == 1
    peers = agent.cache.service("shop", "peers")
    assert peers is not None and peers.headless and peers.vips == ()
    again = await manifests(agent).apply(FILE, "f.yaml")
    assert [o.outcome for o in again] == ["unchanged"] * 3
    moved = FILE.replace("type: NodePort", f"clusterIP: 10.96.0.{api.vips[0].packed[-1] ^ 1}")
    with pytest.raises(InvalidArgument, match="a VIP cannot change"):
        await manifests(agent).apply(moved, "f.yaml")


async def test_a_bad_document_applies_nothing(agent: Agent) -> None:
    bad = FILE.replace("port: 7000", "port: 70000")
    with pytest.raises(InvalidArgument, match=r"f.yaml document 3 \(Service shop/peers\).*"
                                              r"spec.ports\[0\].port"):
        await manifests(agent).apply(bad, "f.yaml")
    twice = FILE + "---\n" + FILE.split("---")[0]
    with pytest.raises(InvalidArgument, match="Service shop/api appears twice"):
        await manifests(agent).apply(twice, "f.yaml")
    assert await stored(agent) == []


async def test_a_failing_readiness_check_takes_the_endpoint_out_and_a_pass_puts_it_back(
        agent: Agent, lb: FakeServiceKernel, tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    flag.touch()
    check = Health(command=f"test -e {flag}", interval=0.05, threshold=2)
    [vip] = (await registry(agent).create(web(health=check), [])).vips
    ep = Endpoint("c1", "eth0", "net", "n1", "", (ipaddress.ip_interface("10.89.0.9/24"),),
                  name="c1", labels={"app": "web"}, state="ready", owner="cni-ipam")
    result = await agent.store.txn([], [Put(ep.store_key, ep.to_json())])
    await agent.ctx.settle(result.revision)
    prober = HealthProber(agent.ctx)

    async def backends_after_checks(checks: int) -> tuple[Backend, ...]:
        for _ in range(checks):
            await asyncio.sleep(0.06)
            await prober.run_once()
            await asyncio.sleep(0.02)  # the check itself (sh -c) runs as a task
        await agent.ctx.settle(agent.informer.revision)
        assert lb.table is not None
        return lb.table[(vip, "tcp", 80)].backends

    try:
        assert await backends_after_checks(2) == (Backend(IP("10.89.0.9"), 8080),)
        flag.unlink()
        for _ in range(20):  # threshold 2: out after two failed checks
            if not await backends_after_checks(1):
                break
        assert await backends_after_checks(0) == ()
        assert agent.cache.failing == {(keys.service("default", "web"), ep.store_key)}
        flag.touch()
        for _ in range(20):
            if await backends_after_checks(1):
                break
        assert await backends_after_checks(0) == (Backend(IP("10.89.0.9"), 8080),)
    finally:
        await prober.close()


async def test_two_services_of_one_file_cannot_share_a_node_port(agent: Agent) -> None:
    one = FILE.split("---")[0].replace("{name: http, port: 80, targetPort: http}",
                                       "{name: http, port: 80, nodePort: 30100}")
    two = one.replace("name: api", "name: api2")
    with pytest.raises(InvalidArgument, match="another service of this file"):
        await manifests(agent).apply(one + "---" + two, "f.yaml")
    assert await stored(agent) == []


async def test_a_network_with_services_is_not_removed(agent: Agent) -> None:
    await registry(agent).create(web(), [])
    with pytest.raises(InUse, match=r"network 'net' has 1 service\(s\) \(default/web\)"):
        await agent.networks.remove("net", force=True)
    await registry(agent).remove("default", "web")
    await agent.networks.remove("net")


async def test_the_default_range_is_stored_by_the_first_service_and_two_hosts_agree(
        tmp_path: Path) -> None:
    store = MemoryStore()
    agents = []
    for node in ("n1", "n2"):  # two agents of one cluster, neither given --service-cidr
        cfg = AgentConfig(state_dir=tmp_path / node, socket=tmp_path / node / "s", node=node)
        kernel = FakeKernel()
        agents.append(wiring.build(cfg, store, fake_drivers(kernel), FakeFirewall(),
                                   FakeHost(), kernel, lb_kernel=FakeServiceKernel()))
    try:
        for a in agents:
            await a.start()
        await agents[0].networks.create(NetworkSpec(name="net", subnets=["10.96.0.0/16"]))
        assert await store.get(keys.SERVICE_RANGE) is None  # nothing reserved at start
        await agents[1].ctx.settle((await store.list(keys.NETWORKS))[1])
        with pytest.raises(InvalidArgument):  # a request that fails stores no range either
            await registry(agents[0]).create(web(name="bad"), [IP("192.0.2.1")])
        assert await store.get(keys.SERVICE_RANGE) is None
        made = await asyncio.gather(*(registry(a).create(web(name=f"s{i}"), [])
                                      for i, a in enumerate(agents)))
        kv = await store.get(keys.SERVICE_RANGE)
        assert kv is not None and kv.value.split(",")[0] == "10.97.0.0/16"  # avoids the net
        assert all(s.vips[0] in ipaddress.ip_network("10.97.0.0/16") for s in made)
    finally:
        for a in agents:
            await a.close()

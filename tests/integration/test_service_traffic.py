"""Services through the agent, with real traffic: connections to a VIP spread over the ready
backends and follow them as they go; a service without endpoints refuses at once; the host and
(``--publish``) the outside reach it; a client on another network is isolated from it as from
its backends; a policy judges the backend after DNAT. (The dataplane's own tests, with 10,000
connections, affinity and the UDP flush: test_lb_dataplane.py.)"""

from __future__ import annotations

import collections
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.probes import ANSWERED, DROPPED, REFUSED, tcp_probe
from tests.harness.world import Agent, World, nsexec

pytestmark = pytest.mark.privileged
BACKENDS = ("web1", "web2", "web3", "web4")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, Agent, str]]:
    world = World(tmp_path_factory.mktemp("svc") / "world")
    try:
        agent = world.add_host("host1")
        agent.cli("network", "create", "net", "--subnet", "10.81.0.0/24")
        agent.cli("network", "create", "other", "--subnet", "10.81.1.0/24")
        for name in BACKENDS:
            agent.run_echo(name, "net", "--label", "app=web")
        agent.run_echo("cli", "net", "--label", "app=client")
        agent.run_echo("stranger", "other")
        for name in (*BACKENDS, "cli", "stranger"):
            agent.wait_listening(name)
        out = agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
                        "--port", "80", "--publish", "8088:80").stdout.split()
        yield world, agent, out[1].split(",")[0]
    finally:
        world.close()


def spread(agent: Agent, vip: str, count: int) -> collections.Counter[str]:
    ns = agent.netns("cli")

    def one(_: int) -> str:
        probe = tcp_probe(ns, vip, 80, 2.0)
        return probe.answer.split()[0] if probe.outcome is ANSWERED else str(probe.outcome)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return collections.Counter(pool.map(one, range(count)))


def test_connections_spread_over_the_backends_and_follow_them(
        lab: tuple[World, Agent, str]) -> None:
    _, agent, vip = lab
    seen = spread(agent, vip, 400)
    assert set(seen) == set(BACKENDS), seen
    assert all(60 <= n <= 140 for n in seen.values()), seen  # 100 each, give or take
    agent.cli("label", "web4", "app=retired")
    try:
        seen = spread(agent, vip, 150)
        assert set(seen) == {"web1", "web2", "web3"}, seen
    finally:
        agent.cli("label", "web4", "app=web")


def test_the_host_and_the_outside_reach_it_another_network_does_not(
        lab: tuple[World, Agent, str]) -> None:
    world, agent, vip = lab
    assert tcp_probe("host1", vip, 80).outcome is ANSWERED
    assert tcp_probe("outside", world.host_addr("host1"), 8088).outcome is ANSWERED
    assert tcp_probe(agent.netns("stranger"), vip, 80, 0.5).outcome is DROPPED


def test_a_service_without_endpoints_refuses_at_once(lab: tuple[World, Agent, str]) -> None:
    _, agent, _ = lab
    out = agent.cli("service", "create", "nobody", "--network", "net", "--selector",
                    "app=none", "--port", "80").stdout.split()
    try:
        probe = tcp_probe(agent.netns("cli"), out[1].split(",")[0], 80, 2.0)
        assert probe.outcome is REFUSED, probe
    finally:
        agent.cli("service", "rm", "nobody")


def test_a_policy_judges_the_backend_behind_the_vip(lab: tuple[World, Agent, str],
                                                    tmp_path: Path) -> None:
    _, agent, vip = lab
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web-from-nobody, namespace: default}
        spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress]}
        """))
    agent.cli("policy", "apply", "-f", str(path))
    try:
        assert tcp_probe(agent.netns("cli"), vip, 80, 0.5).outcome is DROPPED
    finally:
        agent.cli("policy", "delete", "--all")
    assert tcp_probe(agent.netns("cli"), vip, 80).outcome is ANSWERED


def test_a_deleted_element_is_put_back_by_plexus_reconcile(
        lab: tuple[World, Agent, str]) -> None:
    """Someone deletes the VIP's element by hand: clients reach nothing; ``plexus reconcile``
    checks the services table against what was applied and writes it again."""
    _, agent, vip = lab
    element = f"{{ {vip} . tcp . 80 }}"
    nsexec(agent.host, "nft", "delete", "element", "inet", "plexus_services", "vips4", element)
    assert tcp_probe(agent.netns("cli"), vip, 80, 1.0).outcome is not ANSWERED
    agent.cli("reconcile")
    assert tcp_probe(agent.netns("cli"), vip, 80, 2.0).outcome is ANSWERED


def test_a_container_cannot_publish_a_port_the_service_publishes(
        lab: tuple[World, Agent, str]) -> None:
    _, agent, _ = lab
    r = agent.cli("run", "-d", "--name", "squatter", "--network", "net", "-p", "8088:80",
                  "--", "sleep", "30", check=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "plexus: host port 8088/tcp is published by service default/web"], r.stderr
    assert "squatter" not in agent.cli("ps").stdout

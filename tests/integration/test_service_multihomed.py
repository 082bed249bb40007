"""A client attached to two networks reaches a service of either, through its VIP: the kernel
routes the VIP by the client's default route, so its connection leaves through its first
network with that network's address, and the backend (on the other network) must still accept
it, as it accepts the same client calling the backend's own address. Network isolation stays:
a client on the first network only is dropped (a client on the service's network answered,
the control). The kernel holds one ``vip_clients4`` element per (network link, address of a
member on another network), nothing for single-homed containers, and no rule per container."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.probes import ANSWERED, DROPPED, tcp_probe
from tests.harness.world import Agent, World

from .helpers import bridge_of, elements_of, nft_table, wait_until
from .service_probes import answers

pytestmark = pytest.mark.privileged
BACKENDS = ("web1", "web2")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, dict[str, str]]]:
    world = World(tmp_path_factory.mktemp("svc-multi") / "world")
    try:
        agent = world.add_host("host1")
        agent.cli("network", "create", "front", "--subnet", "10.83.0.0/24")
        agent.cli("network", "create", "back", "--subnet", "10.83.1.0/24")
        for name in BACKENDS:
            agent.run_echo(name, "back", "--label", "app=web")
        agent.run_echo("api", "front", "--label", "app=api")
        agent.run_echo("dual", ["front", "back"])  # default route: front
        agent.run_echo("lual", ["back", "front"])  # default route: back
        agent.run_echo("stranger", "front")
        agent.run_echo("neighbour", "back")
        for name in (*BACKENDS, "api", "dual", "lual", "stranger", "neighbour"):
            agent.wait_listening(name)
        vips = {}
        for svc, net, app in (("web", "back", "web"), ("api", "front", "api")):
            vips[svc] = agent.cli("service", "create", svc, "--network", net, "--selector",
                                  f"app={app}", "--port", "80").stdout.split()[1]
        yield agent, vips
    finally:
        world.close()


@pytest.mark.parametrize("client", ["dual", "lual"])
def test_a_two_network_client_reaches_the_service_of_either_network(
        lab: tuple[Agent, dict[str, str]], client: str) -> None:
    agent, vips = lab
    ns = agent.netns(client)
    for web in BACKENDS:  # the same backends by their own addresses: allowed
        assert tcp_probe(ns, agent.address(web), 80).outcome is ANSWERED, web
    seen = answers(ns, vips["web"], 30)
    assert {k.split()[0] for k in seen} == set(BACKENDS), seen
    seen = answers(ns, vips["api"], 10)
    assert {k.split()[0] for k in seen} == {"api"}, seen


def test_a_client_of_one_network_only_is_still_isolated_from_the_other(
        lab: tuple[Agent, dict[str, str]]) -> None:
    agent, vips = lab
    assert tcp_probe(agent.netns("neighbour"), vips["web"], 80).outcome is ANSWERED
    assert tcp_probe(agent.netns("stranger"), vips["web"], 80, 0.5).outcome is DROPPED
    assert tcp_probe(agent.netns("neighbour"), vips["api"], 80, 0.5).outcome is DROPPED


def clients(agent: Agent) -> set[tuple[str, str]]:
    """``nft -j list set inet plexus vip_clients4``: (link, address) pairs."""
    return {tuple(e["concat"]) for e in elements_of(agent.host, "set", "plexus", "vip_clients4")}


def forward_rules(agent: Agent) -> int:
    return sum(1 for o in nft_table(agent.host) if o.get("rule", {}).get("chain") == "forward")


def test_the_kernel_holds_one_element_per_foreign_address_and_no_rule_per_container(
        lab: tuple[Agent, dict[str, str]]) -> None:
    agent, vips = lab
    front, back = bridge_of(agent, "front"), bridge_of(agent, "back")
    want = {(back, agent.address(c, "front")) for c in ("dual", "lual")} | {
        (front, agent.address(c, "back")) for c in ("dual", "lual")}
    assert clients(agent) == want
    rules = forward_rules(agent)
    agent.run_echo("third", ["front", "back"])
    third = {(back, agent.address("third", "front")), (front, agent.address("third", "back"))}
    assert wait_until(lambda: clients(agent) == want | third)
    assert forward_rules(agent) == rules
    agent.wait_listening("third")
    assert {k.split()[0] for k in answers(agent.netns("third"), vips["web"], 30)} == set(BACKENDS)
    agent.cli("rm", "-f", "third")
    assert wait_until(lambda: clients(agent) == want)  # its elements leave with it

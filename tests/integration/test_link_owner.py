"""An agent only touches the kernel links it owns (issue 13): each link's alias names the agent
that made it (``plexus:NODE@STOREID8:KIND:NAME``), so an agent of another state directory in the
same namespace neither deletes, nor repairs, nor takes over the first one's links; and the links
of an agent from before owners (``plexus:KIND:NAME``) are adopted and re-tagged."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.api.client import ApiError, Client
from tests.harness.probes import connect
from tests.harness.world import Agent, World, nsexec, tcp_request

from .helpers import addresses, link_owner, links, wait_until

Links = dict[str, tuple[int, str, str | None]]  # name -> (ifindex, ifalias, master)


def tagged(ns: str, owner: str) -> Links:
    """The links in ``ns`` whose alias carries ``owner``'s tag, read with ``ip -j -d link``."""
    return {link["ifname"]: (link["ifindex"], link["ifalias"], link.get("master"))
            for link in links(ns) if link.get("ifalias", "").startswith(f"plexus:{owner}:")}


def full_pass(agent: Agent) -> dict[str, Any]:
    """POST /v1/reconcile: the full pass now, and what it found."""
    return dict(Client(str(agent.socket)).post("/v1/reconcile", {}))


def link(ns: str, name: str) -> dict[str, Any]:
    return next(l for l in links(ns) if l["ifname"] == name)


def answers(ns: str, ip: str, name: str) -> bool:
    return tcp_request(ns, ip, 80, timeout=1).startswith(f"{name} ")


@pytest.fixture
def second(tmp_path: Path) -> Iterator[Agent]:
    """Another agent for host1, with a state directory (a datastore) of its own; not started."""
    other = Agent("host1", tmp_path / "b" / "state", tmp_path / "b" / "plexus.sock")
    (tmp_path / "b").mkdir()
    try:
        yield other
    finally:
        other.kill(signal.SIGTERM)


def test_an_agent_of_another_state_dir_leaves_the_first_ones_links_alone(
    agent: Agent, second: Agent
) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.70.0.0/24")
    agent.run_echo("a", "web")
    agent.wait_listening("a")
    ip_a, owner_a = agent.address("a"), link_owner(agent)
    veth = agent.container("a")["endpoints"][0]["host_ifname"]
    first = tagged("host1", owner_a)
    assert {alias.split(":", 3)[2] for _, alias, _ in first.values()} == {"net", "ep"}
    assert veth in first
    agent.kill(signal.SIGTERM)  # the links stay, as they do when an agent stops

    second.start()
    owner_b = link_owner(second)
    assert owner_b != owner_a and owner_b.startswith("host1@")  # same node, another store
    second.cli("network", "create", "web", "--subnet", "10.71.0.0/24")
    second.run_echo("b", "web")
    second.wait_listening("b")
    report = full_pass(second)
    assert report["orphans"] == [] and report["errors"] == []
    assert tagged("host1", owner_a) == first  # not deleted, re-aliased or moved
    ip_b = second.address("b")
    assert answers("host1", ip_b, "b") and answers("host1", ip_a, "a")
    theirs = tagged("host1", owner_b)
    assert len(theirs) == 2
    second.kill(signal.SIGTERM)

    agent.start()  # the first agent again: its own links are right, the other's not its own
    report = full_pass(agent)
    assert (report["orphans"], report["drifted"]) == ([], [])
    assert tagged("host1", owner_a) == first and tagged("host1", owner_b) == theirs
    assert answers("host1", ip_a, "a")


def test_a_link_of_the_wanted_name_that_another_agent_owns_is_refused(
    agent: Agent, second: Agent, world: World
) -> None:
    """The same node and container id make the same veth name: the second agent says whose it
    is instead of taking it over."""
    body = {"container_id": "c1", "network": "n", "netns": "/run/netns/c1", "ifname": "eth0"}
    Client(str(agent.socket)).post("/v1/networks", {"name": "n", "subnets": ["10.72.0.0/24"]})
    world.add_ns("c1")
    Client(str(agent.socket)).post("/v1/endpoints", body)
    owner_a = link_owner(agent)
    first = tagged("host1", owner_a)
    agent.kill(signal.SIGTERM)

    second.start()
    client = Client(str(second.socket))
    client.post("/v1/networks", {"name": "n", "subnets": ["10.73.0.0/24"]})
    world.add_ns("c2")
    with pytest.raises(ApiError) as refused:
        client.post("/v1/endpoints", {**body, "netns": "/run/netns/c2"})
    [veth] = [name for name, (_, alias, _) in first.items() if ":ep:" in alias]
    assert f"link {veth} belongs to another plexus agent ({owner_a})" in str(refused.value)
    assert tagged("host1", owner_a) == first
    assert [l["ifname"] for l in links("c2")] == ["lo"]


def test_another_agents_links_do_not_move_the_kernel_watcher(
    agent: Agent, second: Agent
) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.74.0.0/24")
    owner_a = link_owner(agent)
    [bridge_a] = tagged("host1", owner_a)
    agent.kill(signal.SIGTERM)
    second.start()
    second.cli("network", "create", "web", "--subnet", "10.75.0.0/24")  # the same name
    [bridge_b] = tagged("host1", link_owner(second))
    repairs = second.json("status")["kernel_repairs"]

    nsexec("host1", "ip", "addr", "del", "10.74.0.1/24", "dev", bridge_a)
    nsexec("host1", "ip", "link", "set", bridge_a, "down")
    # Then one of its own: once it is repaired, the events before it have been handled.
    nsexec("host1", "ip", "link", "set", bridge_b, "down")
    assert wait_until(lambda: "UP" in link("host1", bridge_b)["flags"], timeout=10)
    assert second.json("status")["kernel_repairs"] == repairs + 1
    assert "UP" not in link("host1", bridge_a)["flags"]
    assert addresses("host1", bridge_a) == []


def test_links_of_an_agent_before_owners_are_adopted_and_re_tagged(agent: Agent) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.76.0.0/24")
    agent.run_echo("a", "web")
    agent.wait_listening("a")
    conn = connect(agent.netns("a"), agent.address("a"))
    owner = link_owner(agent)
    first = tagged("host1", owner)
    agent.kill(signal.SIGTERM)
    # As an agent before owners left them, and one such link that nothing wants.
    for name, (_, alias, _) in first.items():
        nsexec("host1", "ip", "link", "set", name, "alias", alias.replace(f"{owner}:", ""))
    nsexec("host1", "ip", "link", "add", "pxbr-legacy", "type", "bridge")
    nsexec("host1", "ip", "link", "set", "pxbr-legacy", "alias", "plexus:net:gone")
    assert tagged("host1", owner) == {}

    agent.start()
    assert wait_until(lambda: tagged("host1", owner) == first, timeout=10)  # same links
    assert "pxbr-legacy" not in {l["ifname"] for l in links("host1")}
    conn.sendall(b"still there?\n")
    assert conn.recv(100).startswith(b"a ")
    conn.close()

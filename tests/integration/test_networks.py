"""Networks and attachments: what plexus writes into the kernel, read back with `ip -j`/`nft -j`."""

from __future__ import annotations

import json

import pytest

from tests.harness.world import Agent, World, nsexec, sh, wait_tcp

from .helpers import (
    addresses,
    bridge_of,
    links,
    nft_elements,
    plexus_links,
    store_rows,
    user_networks,
)


def test_bridge_network_in_the_kernel(agent: Agent) -> None:
    net = agent.json(
        "network", "create", "n1", "--subnet", "10.20.0.0/24", "--ipv6", "--mtu", "1400"
    )
    bridge = net["bridge"]
    assert sorted(addresses("host1", bridge)) == sorted(
        ["10.20.0.1/24", net["subnets"][1]["gateway"] + "/64"]
    )
    link = next(l for l in links("host1") if l["ifname"] == bridge)
    assert link["linkinfo"]["info_kind"] == "bridge" and link["mtu"] == 1400
    assert "UP" in link["flags"]
    assert [bridge] == nft_elements("host1")["bridges"]


def test_container_interfaces_addresses_routes_and_mtu(agent: Agent) -> None:
    agent.cli("network", "create", "a", "--subnet", "10.21.0.0/24", "--ipv6", "--mtu", "1400")
    agent.cli("network", "create", "b", "--subnet", "10.22.0.0/24")
    agent.run_echo("c", ["a", "b"], "--ip", "10.21.0.50")
    ns = agent.netns("c")
    assert addresses(ns, "eth0")[0] == "10.21.0.50/24"
    assert addresses(ns, "eth1") == ["10.22.0.2/24"]
    lo = next(l for l in links(ns) if l["ifname"] == "lo")
    assert "UP" in lo["flags"]
    assert next(l for l in links(ns) if l["ifname"] == "eth0")["mtu"] == 1400
    routes = json.loads(nsexec(ns, "ip", "-j", "route", "show", "default").stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("10.21.0.1", "eth0")]
    routes6 = json.loads(nsexec(ns, "ip", "-j", "-6", "route", "show", "default").stdout)
    assert [r["dev"] for r in routes6] == ["eth0"]
    assert next(l for l in links(ns) if l["ifname"] == "eth1")["mtu"] == 1500
    # each host-side veth has its own network's MTU: 1400 on "a", the default 1500 on "b"
    mtu = {l["ifname"]: l["mtu"] for l in links("host1") if l["ifname"].startswith("pxv")}
    endpoints = {e["network"]: e["host_ifname"] for e in agent.container("c")["endpoints"]}
    assert set(mtu) == set(endpoints.values())
    assert {net: mtu[veth] for net, veth in endpoints.items()} == {"a": 1400, "b": 1500}


def test_attach_and_detach_a_namespace_made_by_someone_else(agent: Agent, world: World) -> None:
    agent.cli("network", "create", "n", "--subnet", "10.23.0.0/24")
    world.add_ns("foreign")
    out = agent.json("attach", "--netns", "/run/netns/foreign", "--id", "ctr1", "--network", "n")
    assert out["ifname"] == "eth0" and addresses("foreign", "eth0") == out["addresses"]
    agent.cli("detach", "--id", "ctr1", "--network", "n")
    assert "eth0" not in {l["ifname"] for l in links("foreign")}
    assert plexus_links("host1") == {bridge_of(agent)}
    assert store_rows(agent.state_dir, "/plexus/ipam/") == {}


def test_auto_subnet_avoids_routes_and_addresses_of_the_host(agent: Agent) -> None:
    nsexec("host1", "ip", "route", "add", "10.89.0.0/24", "via", "203.0.113.100")
    nsexec("host1", "ip", "addr", "add", "10.89.1.5/24", "dev", "up0")
    net = agent.json("network", "create", "auto")
    assert net["subnets"][0]["cidr"] == "10.89.2.0/24"
    r = agent.cli("network", "create", "clash", "--subnet", "10.89.0.0/24", check=False)
    assert r.returncode != 0 and "overlaps 10.89.0.0/24 (route via up0)" in r.stderr
    r = agent.cli("network", "create", "clash", "--subnet", "10.89.1.0/24", check=False)
    assert r.returncode != 0 and "overlaps 10.89.1.0/24 (address on up0)" in r.stderr


def _nothing_left(agent: Agent, networks: int = 0) -> None:
    assert len(plexus_links("host1")) == networks  # only the bridges that existed before
    assert store_rows(agent.state_dir, "/plexus/endpoints/") == {}
    assert store_rows(agent.state_dir, "/plexus/ipam/") == {}
    assert store_rows(agent.state_dir, "/plexus/ports/") == {}
    assert all(not v for k, v in nft_elements("host1").items() if k.startswith("pub"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["network", "create", "x", "--subnet", "10.0.0.300/24"], "invalid subnet '10.0.0.300/24'"),
        (
            ["network", "create", "x", "--subnet", "10.30.0.0/24", "--subnet", "10.30.0.0/25"],
            "overlaps 10.30.0.0/24",
        ),
        (
            ["network", "create", "x", "--subnet", "10.31.0.0/24", "--gateway", "10.9.9.9"],
            "invalid gateway '10.9.9.9'",
        ),
        (["network", "create", "bad/name"], "invalid name 'bad/name'"),
        (["network", "create", "x", "--driver", "vlan"], "invalid driver 'vlan'"),
        (
            ["run", "-d", "--name", "c", "--network", "base", "-p", "80", "--", "true"],
            "invalid publish '80'",
        ),
        (
            ["run", "-d", "--name", "c", "--network", "base", "--ip", "10.99.0.5", "--", "true"],
            "invalid ip '10.99.0.5'",
        ),
        (
            ["run", "-d", "--name", "c", "--network", "nope", "--", "true"],
            "network 'nope' not found",
        ),
        (
            ["attach", "--netns", "/run/netns/missing", "--id", "x", "--network", "base"],
            "invalid netns '/run/netns/missing'",
        ),
        (["network", "create", "base"], "network 'base' already exists"),
        (
            ["run", "-d", "--name", "c", "--network", "base", "--", "/no/such/binary"],
            "invalid command '/no/such/binary'",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(
    agent: Agent, args: list[str], message: str
) -> None:
    agent.cli("network", "create", "base", "--subnet", "10.40.0.0/24")
    before_ns = set(sh("ip", "netns", "list").stdout.split())
    r = agent.cli(*args, check=False)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    _nothing_left(agent, networks=1)
    assert [n["name"] for n in user_networks(agent)] == ["base"]
    assert agent.json("ps", "-a") == []
    assert set(sh("ip", "netns", "list").stdout.split()) == before_ns


def test_address_taken_and_network_in_use(agent: Agent) -> None:
    agent.cli("network", "create", "n", "--subnet", "10.41.0.0/24")
    agent.run_echo("a", "n", "--ip", "10.41.0.10")
    r = agent.cli(
        "run",
        "-d",
        "--name",
        "b",
        "--network",
        "n",
        "--ip",
        "10.41.0.10",
        "--",
        "true",
        check=False,
    )
    assert r.returncode == 1 and "address 10.41.0.10 is already in use by a" in r.stderr
    r = agent.cli("network", "rm", "n", check=False)
    assert r.returncode != 0 and "network 'n' has 1 endpoint(s)" in r.stderr
    r = agent.cli("run", "-d", "--name", "a", "--network", "n", "--", "true", check=False)
    assert r.returncode != 0 and "container 'a' already exists" in r.stderr
    agent.cli("rm", "-f", "a")
    agent.cli("network", "rm", "n")
    _nothing_left(agent)
    assert nft_elements("host1")["bridges"] == []


def test_ip_range_and_sequential_allocation(agent: Agent, world: World) -> None:
    agent.cli("network", "create", "n", "--subnet", "10.42.0.0/24", "--ip-range", "10.42.0.128/25")
    got = []
    for i in range(3):
        world.add_ns(f"c{i}")
        ep = agent.json("attach", "--netns", f"/run/netns/c{i}", "--id", f"c{i}", "--network", "n")
        got.append(ep["addresses"][0])
    assert got == ["10.42.0.128/24", "10.42.0.129/24", "10.42.0.130/24"]
    agent.cli("detach", "--id", "c1", "--network", "n")
    world.add_ns("c3")
    ep = agent.json("attach", "--netns", "/run/netns/c3", "--id", "c3", "--network", "n")
    assert ep["addresses"] == ["10.42.0.131/24"]  # the freed .129 is not handed straight back


def test_host_and_none_drivers(agent: Agent) -> None:
    agent.cli("network", "create", "h", "--driver", "host")
    agent.cli("network", "create", "z", "--driver", "none")
    agent.run_echo("onhost", "h", ports=(8181,))
    agent.run_echo("isolated", "z")
    assert agent.container("onhost")["netns"] == ""
    ns = agent.netns("isolated")
    assert [l["ifname"] for l in links(ns)] == ["lo"]
    assert wait_tcp("host1", "127.0.0.1", 8181).startswith("onhost")

"""Agents of several simulated hosts on one real etcd: every host sees every host and network,
a live node name is refused to a second agent, an overlay network hands each host addresses of
its own blocks (never one address twice), and a dead host is shown down and can be removed,
which releases what it held."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.model import keys
from tests.harness.cluster import cluster
from tests.harness.etcd import EtcdCluster
from tests.harness.world import VENV_BIN, Agent, World, netns_path

from .helpers import wait_until


@pytest.fixture
def hosts(world: World, tmp_path: Path) -> Iterator[tuple[EtcdCluster, list[Agent]]]:
    with cluster(world, tmp_path, ["host1", "host2"]) as found:
        yield found


def host_table(agent: Agent) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in agent.json("host", "ls")}


def overlay(a: Agent, b: Agent, name: str, subnet: str) -> None:
    """An overlay of /28 blocks made on ``a``, once ``b`` sees it too."""
    a.cli("network", "create", name, "--driver", "overlay", "--subnet", subnet,
          "--block-size", "28")
    assert wait_until(lambda: name in {n["name"] for n in b.json("network", "ls")}, timeout=20)


def test_every_host_sees_every_host_and_network(
    hosts: tuple[EtcdCluster, list[Agent]],
) -> None:
    _, (a, b) = hosts
    table = host_table(a)
    assert {n: (h["alive"], h["address"]) for n, h in table.items()} == {
        "host1": (True, "203.0.113.1"), "host2": (True, "203.0.113.2")}
    a.cli("network", "create", "shared", "--subnet", "10.77.0.0/24")
    assert wait_until(lambda: "shared" in {n["name"] for n in b.json("network", "ls")}, timeout=20)


def test_a_live_node_name_is_refused_to_a_second_agent(
    hosts: tuple[EtcdCluster, list[Agent]], world: World, tmp_path: Path,
) -> None:
    etcd, (a, _) = hosts
    world.add_host("host3", start_agent=False)
    argv = ["nsenter", f"--net={netns_path('host3')}", "--", str(VENV_BIN / "plexus"),
            "--socket", str(tmp_path / "c.sock"), "agent", "--state-dir", str(tmp_path / "c"),
            "--node", "host1", "--store", etcd.url,
            "--docker-plugin-socket", "", "--docker-api", ""]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "plexus: node name 'host1' is in use by a live agent (203.0.113.1): "
        "give this one another --node"]
    assert host_table(a)["host1"]["alive"]


def test_overlay_addresses_come_from_each_hosts_own_blocks(
    hosts: tuple[EtcdCluster, list[Agent]],
) -> None:
    _, (a, b) = hosts
    overlay(a, b, "ov", "10.78.0.0/24")
    blocks: dict[str, set[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
    for agent in (a, b):
        for i in range(3):
            agent.run_echo(f"{agent.host}-c{i}", "ov")
        # what the kernel holds, in each container's namespace
        found = [kernel_address(agent, f"{agent.host}-c{i}") for i in range(3)]
        assert all(f.network == ipaddress.ip_network("10.78.0.0/24") for f in found)
        blocks[agent.host] = {ipaddress.ip_network(f"{f.ip}/28", strict=False) for f in found}
    assert len(blocks["host1"]) == len(blocks["host2"]) == 1
    assert not blocks["host1"] & blocks["host2"]
    # what the agents say of it: every host's blocks, from either host
    table = host_table(b)
    for host in ("host1", "host2"):
        assert {ipaddress.ip_network(x) for x in table[host]["blocks"]} == blocks[host]
        assert table[host]["blocks_used"] == 1
    inspect = json.loads(a.cli("network", "inspect", "ov").stdout)
    assert {ipaddress.ip_network(k): v for k, v in inspect["blocks"].items()} == {
        next(iter(blocks["host1"])): "host1", next(iter(blocks["host2"])): "host2"}


def kernel_address(agent: Agent, name: str) -> ipaddress.IPv4Interface:
    netns = agent.container(name)["netns"]
    links = json.loads(subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", "-4", "addr"],
                                      capture_output=True, text=True, check=True).stdout)
    [addr] = [ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
              for link in links if link["ifname"] != "lo" for a in link["addr_info"]]
    return addr


def test_a_dead_host_is_down_and_host_rm_releases_what_it_held(
    hosts: tuple[EtcdCluster, list[Agent]],
) -> None:
    etcd, (a, b) = hosts
    overlay(a, b, "web", "10.79.0.0/24")
    b.run_echo("gone", "web")
    held = b.address("gone", "web")
    refused = a.cli("host", "rm", "host2", check=False)
    assert refused.returncode == 1 and "is alive" in refused.stderr
    b.kill()  # kill -9: its lease runs out
    assert wait_until(lambda: not host_table(a)["host2"]["alive"], timeout=30)
    assert host_table(a)["host2"]["endpoints"] == 1
    assert len(host_table(a)["host2"]["blocks"]) == 1
    done = a.cli("host", "rm", "host2")
    assert done.stdout.strip() == "host2 (released 1 endpoints)"
    assert "host2" not in host_table(a)
    # its address's claim is gone from etcd: the address can be handed out again
    assert etcd.etcdctl("get", keys.ipam_addr("10.79.0.0/24", held)).strip() == ""
    assert etcd.etcdctl("get", "--prefix", keys.endpoints("host2")).strip() == ""
    assert etcd.etcdctl("get", "--prefix", keys.HOST_BLOCKS).strip() == ""

"""Per-host blocks of an overlay coming and going, on three simulated hosts sharing one real
etcd: a tiny subnet (a /28 cut into four /30 blocks) runs out of blocks, a host whose block is
full then borrows an address of another host's block, and that container is reached from the
block's holder, from a third host and from its own host (TCP and ping), through one /32 route
per other host (``ip -j route``) and one route on its own bridge. A block with no address in
use goes back to the pool after the grace period (``--block-release-after``, 3 s here): it
disappears from etcd and from the other hosts' routes; a block holding a borrowed address does
not, until the loan is returned."""

from __future__ import annotations

import ipaddress
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plexus.model import keys
from tests.harness.cluster import cluster
from tests.harness.etcd import EtcdCluster
from tests.harness.probes import ANSWERED, answered, tcp_probe
from tests.harness.world import Agent, World, nsexec, ping

from .helpers import wait_until

SUBNET = "10.81.0.0/28"
GRACE = 3.0  # --block-release-after


@dataclass
class Cluster:
    etcd: EtcdCluster
    agents: dict[str, Agent]
    where: dict[str, str]  # container -> host

    def run(self, name: str, host: str) -> str:
        """Runs an echo server named ``name`` on ``host``; its address."""
        self.agents[host].run_echo(name, "ov")
        self.where[name] = host
        return self.ip(name)

    def rm(self, name: str) -> None:
        self.agents[self.where.pop(name)].cli("rm", "-f", name)

    def ip(self, name: str) -> str:
        return self.agents[self.where[name]].address(name, "ov")

    def ns(self, name: str) -> str:
        return self.agents[self.where[name]].netns(name)

    def endpoint(self, name: str) -> dict[str, Any]:
        [ep] = self.agents[self.where[name]].container(name)["endpoints"]
        return dict(ep)


@pytest.fixture(scope="module")
def three() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="plexus-blocks-") as tmp:
        w = World(Path(tmp) / "world")
        hosts = ["host1", "host2", "host3"]
        try:
            with cluster(w, Path(tmp), hosts, start=[]) as (etcd, agents):
                for agent in agents:
                    agent.start(extra=["--store", etcd.url,
                                       "--block-release-after", str(GRACE)])
                agents[0].cli("network", "create", "ov", "--driver", "overlay", "--subnet",
                              SUBNET, "--block-size", "30")
                assert wait_until(lambda: all("ov" in {n["name"] for n in a.json("network", "ls")}
                                              for a in agents), timeout=20)
                yield Cluster(etcd, {a.host: a for a in agents}, {})
        finally:
            w.close()


def blocks(etcd: EtcdCluster) -> dict[str, str]:
    """block -> the host holding it, as etcd has it."""
    out = etcd.etcdctl("get", "--prefix", keys.host_blocks(SUBNET)).split()
    return {keys.segment_cidr(k.rsplit("/", 1)[1]): v for k, v in zip(out[::2], out[1::2],
                                                                       strict=True)}


def routes(host: str) -> dict[str, dict[str, Any]]:
    """plexus's routes (proto 112) on ``host``, by destination, as ``ip -j route`` lists them."""
    found = json.loads(nsexec(host, "ip", "-j", "route", "show", "proto", "112").stdout or "[]")
    return {r["dst"]: r for r in found}


def bridge_macs(host: str) -> tuple[str, set[str]]:
    """The MAC of ``host``'s overlay bridge and those of its ports (``ip -j link``)."""
    found = json.loads(nsexec(host, "ip", "-j", "link", "show").stdout)
    [bridge] = [link for link in found if link["ifname"].startswith("pxbr-")]
    ports = {link["address"] for link in found if link.get("master") == bridge["ifname"]}
    return bridge["address"], ports


def in_block(address: str, block: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(block)


def test_a_host_borrows_when_no_block_is_left_and_everyone_reaches_the_loan(
    three: Cluster,
) -> None:
    # One at a time, so that who takes which block is known: host1 .0/30 (.2 .3), host2
    # .4/30, host3 .8/30, host1 again .12/30; then host2 fills its block.
    for name, host in [("a1", "host1"), ("b1", "host2"), ("c1", "host3"), ("a2", "host1"),
                       ("a3", "host1"), ("b2", "host2"), ("b3", "host2")]:
        three.run(name, host)
    assert blocks(three.etcd) == {"10.81.0.0/30": "host1", "10.81.0.4/30": "host2",
                                  "10.81.0.8/30": "host3", "10.81.0.12/30": "host1"}
    loan = three.run("b4", "host2")  # host2's block is full and no block is free
    assert in_block(loan, "10.81.0.8/30")  # host3's
    assert three.endpoint("b4")["borrowed"] == [loan]
    assert blocks(three.etcd)["10.81.0.8/30"] == "host3"  # lent, not given
    vtep2 = "10.81.0.4"  # host2's VTEP address: its block's first address
    for other in ("host1", "host3"):  # the holder too: more specific than its own block
        assert wait_until(lambda o=other: loan in routes(o), timeout=10), other
        route = routes(other)[loan]
        assert (route["gateway"], route["dev"].startswith("pxvx-")) == (vtep2, True), route
    local = routes("host2")[loan]  # host2 delivers it on its bridge, not to host3
    assert (local["dev"].startswith("pxbr-"), local["scope"], "gateway" in local) == (
        True, "link", False), local
    assert "10.81.0.8/30" in routes("host2")  # the rest of host3's block still goes there
    for client in ("c1", "a1", "b1"):  # the holder, a third host, the borrower's own host
        got = answered(lambda c=client: tcp_probe(three.ns(c), loan, 80))
        assert (got.outcome, got.answer) == (ANSWERED, f"b4 {three.ip(client)}"), client
        assert ping(three.ns(client), loan), client
    # kernel state per container only for the loan: one /32 on each host
    for host in ("host1", "host2", "host3"):
        assert [d for d in routes(host) if "/" not in d] == [loan], host


def test_an_empty_block_goes_back_to_the_pool_and_leaves_every_hosts_routes(
    three: Cluster,
) -> None:
    assert in_block(three.ip("a3"), "10.81.0.12/30")  # host1's only address in that block
    for other in ("host2", "host3"):
        assert "10.81.0.12/30" in routes(other)
    # The bridge has a MAC of its own: had it its lowest port's (the kernel's choice), the
    # removal of that port would change it under the ARP entries of the host's containers.
    mac, ports = bridge_macs("host1")
    assert mac not in ports
    three.rm("a3")
    assert bridge_macs("host1")[0] == mac
    assert wait_until(lambda: "10.81.0.12/30" not in blocks(three.etcd), timeout=GRACE + 10)
    for other in ("host2", "host3"):
        assert wait_until(lambda o=other: "10.81.0.12/30" not in routes(o), timeout=10), other
    assert three.agents["host1"].json("host", "ls")  # still serving
    # a free block again: the next container that needs one claims it
    b5 = three.run("b5", "host2")
    assert in_block(b5, "10.81.0.12/30") and three.endpoint("b5")["borrowed"] == []
    assert blocks(three.etcd)["10.81.0.12/30"] == "host2"
    got = answered(lambda: tcp_probe(three.ns("a1"), b5, 80))
    assert got.outcome is ANSWERED, got


def test_a_loan_keeps_its_block_until_it_is_returned(three: Cluster) -> None:
    loan = three.ip("b4")
    three.rm("c1")  # host3's own address: only the loan is left in its block
    time.sleep(GRACE * 2.5)  # well past the grace period (and several looks)
    assert blocks(three.etcd)["10.81.0.8/30"] == "host3"
    got = answered(lambda: tcp_probe(three.ns("a1"), loan, 80))
    assert got.outcome is ANSWERED, got
    three.rm("b4")  # returned: the /32s go at once, the block after the grace period
    for host in ("host1", "host2", "host3"):
        assert wait_until(lambda h=host: loan not in routes(h), timeout=10), host
    assert wait_until(lambda: "10.81.0.8/30" not in blocks(three.etcd), timeout=GRACE + 10)
    for other in ("host1", "host2"):
        assert wait_until(lambda o=other: "10.81.0.8/30" not in routes(o), timeout=10), other

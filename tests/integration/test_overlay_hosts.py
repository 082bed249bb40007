"""Overlay networks across hosts: three simulated hosts whose agents share one real etcd, each
with containers on one overlay network (VXLAN between the hosts, an anycast gateway and proxy
ARP on each host's bridge). Proven with traffic between containers of different hosts (TCP,
UDP, ping, names through the embedded DNS), isolation from other networks (dropped, with a
positive control), masquerade only towards the outside, and the kernel's state read with
``ip -j`` and ``bridge -j``: one FDB entry and one neighbour per other host, one route per
other host's block, nothing per container."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from plexus.model import keys
from tests.harness.cluster import cluster
from tests.harness.etcd import EtcdCluster
from tests.harness.probes import (
    ANSWERED,
    DROPPED,
    UNREACHABLE,
    answered,
    connect,
    tcp_probe,
    udp_probe,
)
from tests.harness.world import (
    ECHO,
    INTERNET_ADDR,
    OUTSIDE_ADDR,
    Agent,
    World,
    nsexec,
    ping,
    sh,
)

from .helpers import wait_until

SUBNET = ipaddress.ip_network("10.78.0.0/24")
BLOCK = 28  # /28 blocks: 16 addresses a host


@dataclass
class Cluster:
    world: World
    etcd: EtcdCluster
    agents: list[Agent]

    def at(self, host: str) -> Agent:
        return next(a for a in self.agents if a.host == host)

    def ns(self, container: str) -> str:
        return str(self.at(_host_of(container)).netns(container))

    def ip(self, container: str, network: str = "ov") -> str:
        return self.at(_host_of(container)).address(container, network)


def _host_of(container: str) -> str:
    """Containers are named after their host: c1 and d1 live on host1."""
    return f"host{container[-1]}"


def _wait_network(agents: list[Agent], name: str) -> None:
    assert wait_until(lambda: all(name in {n["name"] for n in a.json("network", "ls")}
                                  for a in agents), timeout=20)


@pytest.fixture(scope="module")
def three() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="plexus-overlay-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2", "host3"]) as (etcd, agents):
                agents[0].cli("network", "create", "ov", "--driver", "overlay", "--subnet",
                              str(SUBNET), "--block-size", str(BLOCK))
                _wait_network(agents, "ov")
                for agent in agents:
                    agent.run_echo(f"c{agent.host[-1]}", "ov")
                # An "internet" server in the outside namespace: which source address arrives?
                subprocess.Popen(["ip", "netns", "exec", "outside", sys.executable, ECHO,
                                  "internet", "80"], start_new_session=True)
                yield Cluster(w, etcd, agents)
        finally:
            w.close()


PAIRS = [(a, b) for a in ("c1", "c2", "c3") for b in ("c1", "c2", "c3") if a != b]


@pytest.mark.parametrize(("client", "server"), PAIRS)
def test_containers_on_different_hosts_talk_tcp_udp_and_ping(
    three: Cluster, client: str, server: str,
) -> None:
    ns, ip, mine = three.ns(client), three.ip(server), three.ip(client)
    got = answered(lambda: tcp_probe(ns, ip, 80))
    assert got.outcome is ANSWERED, got
    assert got.answer == f"{server} {mine}"  # the server sees the container's own address
    got = udp_probe(ns, ip, 80)
    assert (got.outcome, got.answer) == (ANSWERED, f"{server} {mine}")
    assert ping(ns, ip)


def _resolve(agent: Agent, container: str, name: str) -> str:
    """glibc's resolver in the container, with the resolv.conf plexus wrote for it (its own
    host's DNS server, on the anycast gateway)."""
    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False).stdout
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def test_names_resolve_to_containers_of_other_hosts(three: Cluster) -> None:
    for client, server in (("c1", "c2"), ("c2", "c3"), ("c3", "c1")):
        assert _resolve(three.at(_host_of(client)), client, server) == three.ip(server)
    assert _resolve(three.at("host1"), "c1", "nobody") == ""


def test_traffic_to_the_outside_is_masqueraded_and_between_hosts_it_is_not(
    three: Cluster,
) -> None:
    got = answered(lambda: tcp_probe(three.ns("c1"), INTERNET_ADDR, 80))
    assert got.answer == "internet 203.0.113.1"  # host1's underlay address, not 10.78.0.x
    got = tcp_probe(three.ns("c1"), three.ip("c3"), 80)
    assert got.answer == f"c3 {three.ip('c1')}"


def test_a_port_published_on_any_host_answers_from_the_outside_and_other_hosts(
    three: Cluster,
) -> None:
    a2 = three.at("host2")
    a2.run_echo("p2", "ov", "-p", "8082:80")
    a2.wait_listening("p2")
    try:
        got = tcp_probe("outside", "203.0.113.2", 8082)  # host2's underlay address
        assert got.answer == f"p2 {OUTSIDE_ADDR}", got  # the client's own address, kept
        # The container it answers is on the overlay: c1 on host1 reaches it directly too.
        got = answered(lambda: tcp_probe(three.ns("c1"), three.ip("p2"), 80))
        assert got.answer == f"p2 {three.ip('c1')}"
    finally:
        a2.cli("rm", "-f", "p2")


def test_two_overlay_networks_are_isolated_across_hosts(three: Cluster) -> None:
    _, a2, a3 = three.agents
    a2.cli("network", "create", "ov2", "--driver", "overlay", "--subnet", "10.79.0.0/24",
           "--block-size", str(BLOCK))
    _wait_network(three.agents, "ov2")
    a2.run_echo("d2", "ov2")
    a3.run_echo("d3", "ov2")
    d2 = three.ip("d2", "ov2")
    control = answered(lambda: tcp_probe(three.ns("d3"), d2, 80))  # ov2 across hosts
    assert control.outcome is ANSWERED, control
    for client in ("c1", "c3"):  # ov on another host, ov on d2's own
        blocked = tcp_probe(three.ns(client), d2, 80, timeout=1)
        assert blocked.outcome is DROPPED, (client, blocked)


def test_an_overlay_and_a_bridge_network_are_isolated(three: Cluster) -> None:
    a1 = three.at("host1")
    a1.cli("network", "create", "br", "--subnet", "10.80.0.0/24")
    _wait_network(three.agents, "br")
    a1.run_echo("b1", "br")
    # host1 routes ov's blocks of other hosts through the VXLAN device: not for br's containers
    blocked = tcp_probe(a1.netns("b1"), three.ip("c2"), 80, timeout=1)
    control = tcp_probe(three.ns("c1"), three.ip("c2"), 80)
    assert (blocked.outcome, control.outcome) == (DROPPED, ANSWERED), (blocked, control)
    b1 = a1.address("b1", "br")
    blocked = tcp_probe(three.ns("c1"), b1, 80, timeout=1)
    control = answered(lambda: tcp_probe("host1", b1, 80))
    assert (blocked.outcome, control.outcome) == (DROPPED, ANSWERED), (blocked, control)


def test_a_removed_container_is_unreachable_from_every_host(three: Cluster) -> None:
    a2 = three.at("host2")
    a2.run_echo("g2", "ov")
    gone = three.ip("g2")
    for client in ("c1", "c3"):
        assert answered(lambda c=client: tcp_probe(three.ns(c), gone, 80)).outcome is ANSWERED
    a2.cli("rm", "-f", "g2")
    for client in ("c1", "c3"):
        p = tcp_probe(three.ns(client), gone, 80, timeout=1)
        assert p.outcome in (DROPPED, UNREACHABLE), (client, p)
    assert tcp_probe(three.ns("c1"), three.ip("c2"), 80).outcome is ANSWERED  # the control


# -- the kernel, read with ip and bridge -------------------------------------------------------


def _json(host: str, *argv: str) -> Any:
    return json.loads(nsexec(host, *argv).stdout or "[]")


def _vxlan(host: str) -> dict[str, dict[str, Any]]:
    """VXLAN links of ``host`` by VNI (ip -j -d link)."""
    return {int(link["linkinfo"]["info_data"]["id"]): link
            for link in _json(host, "ip", "-j", "-d", "link", "show", "type", "vxlan")}


@dataclass(frozen=True)
class Overlay:
    """One host's overlay entries of one device, as the kernel lists them."""

    fdb: tuple[tuple[str, str], ...]  # (mac, dst), sorted
    neigh: tuple[tuple[str, str], ...]  # (address, mac)
    routes: tuple[tuple[str, str], ...]  # (block, via)
    addresses: tuple[str, ...]
    ifindex: int


def _overlay(host: str, device: str) -> Overlay:
    fdb = _json(host, "bridge", "-j", "fdb", "show", "dev", device)
    neigh = _json(host, "ip", "-j", "neigh", "show", "dev", device)
    routes = _json(host, "ip", "-j", "route", "show", "dev", device)
    [link] = _json(host, "ip", "-j", "addr", "show", "dev", device)
    return Overlay(
        tuple(sorted((e["mac"], e["dst"]) for e in fdb)),
        tuple(sorted((n["dst"], n["lladdr"]) for n in neigh)),
        tuple(sorted((r["dst"], r.get("gateway", "")) for r in routes)),
        tuple(sorted(f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"])),
        int(link["ifindex"]),
    )


def _blocks(etcd: EtcdCluster, subnet: str) -> dict[str, list[ipaddress.IPv4Network]]:
    """host -> the blocks it holds, read from etcd."""
    out = etcd.etcdctl("get", "--prefix", keys.host_blocks(subnet)).split()
    held: dict[str, list[ipaddress.IPv4Network]] = {}
    for key, node in zip(out[::2], out[1::2], strict=True):
        block = ipaddress.IPv4Network(keys.segment_cidr(key.rsplit("/", 1)[1]))
        held.setdefault(node, []).append(block)
    return {node: sorted(blocks) for node, blocks in held.items()}


def _expected(three: Cluster, host: str, vni: int) -> tuple[set[tuple[str, str]], ...]:
    """What ``host`` must hold for the other hosts: computed from etcd's blocks and the other
    hosts' own devices (their MACs, read from their kernels)."""
    held = _blocks(three.etcd, str(SUBNET))
    fdb, neigh, routes = set(), set(), set()
    for other, blocks in held.items():
        if other == host:
            continue
        mac = _vxlan(other)[vni]["address"]
        vtep = str(blocks[0].network_address)
        fdb.add((mac, three.world.host_addr(other)))
        neigh.add((vtep, mac))
        routes |= {(str(b), vtep) for b in blocks}
    return fdb, neigh, routes


def _vni(agent: Agent, network: str = "ov") -> int:
    return int(next(n["vni"] for n in agent.json("network", "ls") if n["name"] == network))


def test_each_host_holds_one_entry_per_other_host_and_one_route_per_block(
    three: Cluster,
) -> None:
    a2 = three.at("host2")
    for name in ("xa2", "xb2", "xc2"):  # more containers, in host2's block: nothing changes
        a2.run_echo(name, "ov")
    vni = _vni(three.agents[0])
    held = _blocks(three.etcd, str(SUBNET))
    assert sorted(held) == ["host1", "host2", "host3"]
    for agent in three.agents:
        host = agent.host
        [device] = [_vxlan(host)[vni]]
        info = device["linkinfo"]["info_data"]
        assert (info["local"], info["port"], info.get("learning")) == (
            three.world.host_addr(host), 4789, False)
        assert device["mtu"] == 1450 and device["ifalias"].endswith(":net:ov")
        got = _overlay(host, device["ifname"])
        fdb, neigh, routes = _expected(three, host, vni)
        assert (set(got.fdb), set(got.neigh), set(got.routes)) == (fdb, neigh, routes), host
        assert (len(got.fdb), len(got.neigh)) == (2, 2)  # one per other host, no duplicates
        assert len(got.routes) == sum(len(b) for h, b in held.items() if h != host)
        assert got.addresses == (f"{held[host][0].network_address}/32",)  # its VTEP address
        bridge = next(n["bridge"] for n in agent.json("network", "ls") if n["name"] == "ov")
        proxy = nsexec(host, "sysctl", "-n", f"net.ipv4.conf.{bridge}.proxy_arp").stdout
        assert proxy.strip() == "1"
        [eth0] = _json(host, "ip", "-j", "link", "show", "dev", bridge)
        assert eth0["mtu"] == 1450
    [eth0] = json.loads(subprocess.run(
        ["nsenter", f"--net={three.ns('c1')}", "ip", "-j", "link", "show", "dev", "eth0"],
        capture_output=True, text=True, check=True).stdout)
    assert eth0["mtu"] == 1450  # a container never sends what the VXLAN device would refuse
    for name in ("xa2", "xb2", "xc2"):
        a2.cli("rm", "-f", name)


def _kernel(three: Cluster, vni: int) -> dict[str, tuple[Overlay, list[Any]]]:
    """Every host's overlay entries and its plexus routes (proto 112), as the kernel has them."""
    return {a.host: (_overlay(a.host, _vxlan(a.host)[vni]["ifname"]),
                     _json(a.host, "ip", "-j", "route", "show", "proto", "112"))
            for a in three.agents}


def _full_pass(agent: Agent) -> None:
    agent.cli("reconcile")
    assert wait_until(lambda: not agent.json("status")["reconcilers"]["overlay"]["queued"])


def test_a_deleted_device_comes_back_at_once_and_a_deleted_entry_with_the_full_pass(
    three: Cluster,
) -> None:
    a1 = three.at("host1")
    vni = _vni(a1)
    device = _vxlan("host1")[vni]["ifname"]
    before = replace(_overlay("host1", device), ifindex=0)
    nsexec("host1", "ip", "link", "del", device)  # a kernel event: repaired without a pass
    assert wait_until(lambda: vni in _vxlan("host1")
                      and replace(_overlay("host1", device), ifindex=0) == before)
    assert answered(lambda: tcp_probe(three.ns("c1"), three.ip("c2"), 80)).outcome is ANSWERED
    (mac, dst), route = before.fdb[0], before.routes[0]
    nsexec("host1", "bridge", "fdb", "del", mac, "dev", device, "dst", dst)
    nsexec("host1", "ip", "route", "del", route[0], "dev", device)
    assert len(_overlay("host1", device).fdb) == len(before.fdb) - 1
    _full_pass(a1)
    assert replace(_overlay("host1", device), ifindex=0) == before


def test_a_killed_agent_leaves_its_containers_reachable_and_changes_nothing_on_restart(
    three: Cluster,
) -> None:
    """Last in this module: it kills host2's agent."""
    a1, a2, _ = three.agents
    vni = _vni(a1)
    before = _kernel(three, vni)
    c2, clients = three.ip("c2"), [three.ns(c) for c in ("c1", "c3")]
    conns = [connect(ns, c2) for ns in clients]
    a2.kill()  # SIGKILL: its lease runs out, the other hosts see it down
    down = wait_until(lambda: not {h["name"]: h for h in a1.json("host", "ls")}["host2"]["alive"],
                      timeout=30)
    assert down
    for conn in conns:  # the connections opened before keep going
        conn.sendall(b"still there?\n")
        assert conn.recv(100).startswith(b"c2 ")
    for ns in clients:  # and new ones open: the dead host stays routed
        assert tcp_probe(ns, c2, 80).outcome is ANSWERED
    assert _kernel(three, vni) == before
    a2.start(extra=["--store", three.etcd.url])
    for agent in (a1, a2):  # a full pass: every entry compared with the kernel (and repaired)
        _full_pass(agent)
    assert _kernel(three, vni) == before  # same devices (ifindex), entries, routes: no doubles
    for conn in conns:
        conn.sendall(b"and now?\n")
        assert conn.recv(100).startswith(b"c2 ")
        conn.close()

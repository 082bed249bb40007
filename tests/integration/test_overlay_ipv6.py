"""IPv6 on overlay networks across hosts: three simulated hosts whose agents share one real etcd,
a dual-stack overlay and an IPv6-only one. A container's IPv6 address has its block's prefix and
its block's gateway (on its host's bridge), so other blocks are routed by the hosts: no proxy
NDP. Proven with traffic (ping6, TCP, UDP) between containers of different hosts and of two
blocks of one host, AAAA answers of the embedded DNS across hosts, isolation between overlays,
and the kernel's state read with ``ip -j`` and ``bridge -j``: per other host and per block,
never per container."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plexus.model import keys
from tests.harness.cluster import cluster
from tests.harness.etcd import EtcdCluster
from tests.harness.probes import ANSWERED, DROPPED, answered, tcp_probe, udp_probe
from tests.harness.world import Agent, World, nsexec, ping, sh

from .helpers import wait_until

SUBNET4, SUBNET6, ONLY6 = "10.77.0.0/24", "fd00:77::/64", "fd00:78::/64"
BLOCK = 29  # /29 and /125 blocks: 8 addresses, so a host soon holds two


@dataclass
class Cluster:
    world: World
    etcd: EtcdCluster
    agents: list[Agent]

    def at(self, container: str) -> Agent:
        """Containers are named after their host: c1 and x1 live on host1."""
        return next(a for a in self.agents if a.host == f"host{container[-1]}")

    def ns(self, container: str) -> str:
        return str(self.at(container).netns(container))

    def ip6(self, container: str, network: str = "ov6") -> str:
        return self.at(container).address(container, network, version=6)


def _wait_network(agents: list[Agent], name: str) -> None:
    assert wait_until(lambda: all(name in {n["name"] for n in a.json("network", "ls")}
                                  for a in agents), timeout=20)


@pytest.fixture(scope="module")
def three() -> Iterator[Cluster]:
    with tempfile.TemporaryDirectory(prefix="plexus-overlay6-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2", "host3"]) as (etcd, agents):
                agents[0].cli("network", "create", "ov6", "--driver", "overlay", "--subnet",
                              SUBNET4, "--subnet", SUBNET6, "--block-size", str(BLOCK))
                agents[1].cli("network", "create", "only6", "--driver", "overlay", "--subnet",
                              ONLY6, "--block-size", str(BLOCK))
                _wait_network(agents, "ov6")
                _wait_network(agents, "only6")
                for agent in agents:
                    agent.run_echo(f"c{agent.host[-1]}", "ov6")
                for agent in (agents[0], agents[2]):
                    agent.run_echo(f"s{agent.host[-1]}", "only6")
                yield Cluster(w, etcd, agents)
        finally:
            w.close()


PAIRS = [(a, b) for a in ("c1", "c2", "c3") for b in ("c1", "c2", "c3") if a != b]


@pytest.mark.parametrize(("client", "server"), PAIRS)
def test_dual_stack_containers_of_different_hosts_talk_ipv6(
    three: Cluster, client: str, server: str,
) -> None:
    ns, ip, mine = three.ns(client), three.ip6(server), three.ip6(client)
    got = answered(lambda: tcp_probe(ns, ip, 80))
    assert (got.outcome, got.answer) == (ANSWERED, f"{server} {mine}"), got  # routed, not NATed
    got = udp_probe(ns, ip, 80)
    assert (got.outcome, got.answer) == (ANSWERED, f"{server} {mine}")
    assert ping(ns, ip)
    ip4 = three.at(server).address(server, "ov6")
    assert tcp_probe(ns, ip4, 80).outcome is ANSWERED  # and IPv4 alongside


def test_an_ipv6_only_overlay_carries_traffic_and_names_across_hosts(three: Cluster) -> None:
    s1, s3 = three.ip6("s1", "only6"), three.ip6("s3", "only6")
    got = answered(lambda: tcp_probe(three.ns("s1"), s3, 80))
    assert (got.outcome, got.answer) == (ANSWERED, f"s3 {s1}"), got
    assert ping(three.ns("s3"), s1)
    # resolv.conf names the subnet's gateway (on every host's bridge): an IPv6 server
    assert _resolve(three.at("s1"), "s1", "s3") == s3


def _container_view(ns: str) -> tuple[list[str], list[str]]:
    """The container's global IPv6 addresses and its IPv6 default routes' gateways."""
    [eth0] = _nsjson(ns, "ip", "-j", "-6", "addr", "show", "dev", "eth0", "scope", "global")
    routes = _nsjson(ns, "ip", "-j", "-6", "route", "show", "default")
    return ([f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if "local" in a],
            [r["gateway"] for r in routes])


def test_a_container_has_its_blocks_prefix_and_gateway(three: Cluster) -> None:
    addresses, gateways = _container_view(three.ns("c2"))
    ip = ipaddress.ip_interface(addresses[0])
    assert ip.network.prefixlen == 125 and [str(ip.ip)] == [three.ip6("c2")]
    assert gateways == [str(ip.network.broadcast_address)]  # the block's last address
    shown = three.at("c2").container("c2")["endpoints"][0]
    assert shown["gateways"][1] == gateways[0]


def _resolve(agent: Agent, container: str, name: str) -> str:
    """glibc's resolver in the container with the resolv.conf plexus wrote for it: AAAA."""
    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv6", name, check=False).stdout
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def test_names_resolve_to_ipv6_addresses_of_other_hosts(three: Cluster) -> None:
    for client, server in (("c1", "c2"), ("c2", "c3"), ("c3", "c1")):
        assert _resolve(three.at(client), client, server) == three.ip6(server)


def test_two_ipv6_overlays_are_isolated_across_hosts(three: Cluster) -> None:
    s3 = three.ip6("s3", "only6")
    control = answered(lambda: tcp_probe(three.ns("s1"), s3, 80))
    assert control.outcome is ANSWERED, control
    for client in ("c1", "c3"):  # ov6 on another host, ov6 on s3's own
        blocked = tcp_probe(three.ns(client), s3, 80, timeout=1)
        assert blocked.outcome is DROPPED, (client, blocked)


def test_ipv6_to_the_outside_is_masqueraded_as_on_bridge_networks(three: Cluster) -> None:
    """The world has no IPv6 uplink to send through: the rule's set is read instead (the same
    ``masq6`` a bridge network's IPv6 subnet lands in)."""
    [found] = json.loads(nsexec("host1", "nft", "-j", "list", "set", "inet", "plexus",
                                "masq6").stdout)["nftables"][1:]
    elems = json.dumps(found["set"].get("elem", []))
    assert '"fd00:77::"' in elems and '"fd00:78::"' in elems, elems


# -- the kernel, read with ip and bridge -------------------------------------------------------


def _nsjson(ns: str, *argv: str) -> Any:
    out = subprocess.run(["nsenter", f"--net={ns}", *argv], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out or "[]")


def _json(host: str, *argv: str) -> Any:
    return json.loads(nsexec(host, *argv).stdout or "[]")


def _blocks(etcd: EtcdCluster, subnet: str) -> dict[str, set[str]]:
    """host -> the blocks it holds in ``subnet``, read from etcd."""
    out = etcd.etcdctl("get", "--prefix", keys.host_blocks(subnet)).split()
    held: dict[str, set[str]] = {}
    for key, node in zip(out[::2], out[1::2], strict=True):
        held.setdefault(node, set()).add(keys.segment_cidr(key.rsplit("/", 1)[1]))
    return held


def _network(agent: Agent, name: str) -> dict[str, Any]:
    return dict(next(n for n in agent.json("network", "ls") if n["name"] == name))


@dataclass(frozen=True)
class Kernel:
    """One host's IPv6 state for one overlay, as ``ip`` and ``bridge`` list it."""

    routes: frozenset[tuple[str, str]]  # (block, via) on the VXLAN device
    neigh: frozenset[tuple[str, str]]  # (address, mac) on the VXLAN device
    fdb: frozenset[tuple[str, str]]  # (mac, underlay address)
    bridge: frozenset[str]  # the bridge's global IPv6 addresses
    proxies: int  # proxy NDP entries, anywhere


def _kernel(host: str, net: dict[str, Any]) -> Kernel:
    device = next(link["ifname"]
                  for link in _json(host, "ip", "-j", "-d", "link", "show", "type", "vxlan")
                  if link["linkinfo"]["info_data"]["id"] == net["vni"])
    routes = _json(host, "ip", "-j", "-6", "route", "show", "dev", device, "proto", "112")
    neigh = _json(host, "ip", "-j", "-6", "neigh", "show", "dev", device)
    fdb = _json(host, "bridge", "-j", "fdb", "show", "dev", device)
    [bridge] = _json(host, "ip", "-j", "-6", "addr", "show", "dev", net["bridge"],
                     "scope", "global")
    return Kernel(
        frozenset((r["dst"], r.get("gateway", "")) for r in routes),
        frozenset((n["dst"], n["lladdr"]) for n in neigh),
        frozenset((e["mac"], e["dst"]) for e in fdb),
        frozenset(f"{a['local']}/{a['prefixlen']}"
                  for a in bridge["addr_info"] if "local" in a),
        len(_json(host, "ip", "-j", "-6", "neigh", "show", "proxy")),
    )


def _expected(three: Cluster, host: str) -> tuple[set[str], set[str], set[str]]:
    """(the other hosts' IPv6 blocks, their VTEP addresses, this host's bridge addresses)
    from etcd: a route per block, a neighbour per host, a gateway per own block."""
    held = _blocks(three.etcd, SUBNET6)
    others = {b for h, blocks in held.items() if h != host for b in blocks}
    vteps = {str(min(ipaddress.ip_network(b) for b in blocks).network_address)
             for h, blocks in held.items() if h != host}
    own = {f"{ipaddress.ip_network(b).broadcast_address}/125" for b in held.get(host, ())}
    return others, vteps, own | {"fd00:77::1/128"}


def _check(three: Cluster, net: dict[str, Any]) -> dict[str, Kernel]:
    found = {}
    for agent in three.agents:
        k = _kernel(agent.host, net)
        others, vteps, bridge = _expected(three, agent.host)
        assert {dst for dst, _ in k.routes} == others, agent.host
        assert {ip for ip, _ in k.neigh} == vteps and len(k.fdb) == len(vteps), agent.host
        assert k.bridge == bridge and k.proxies == 0, agent.host
        found[agent.host] = k
    return found


def test_kernel_state_grows_with_hosts_and_blocks_not_containers(three: Cluster) -> None:
    net = _network(three.agents[0], "ov6")
    before = _check(three, net)
    a1, a2 = three.at("x1"), three.at("x2")
    for name in ("x2", "y2", "z2"):  # more containers in host2's block: nothing changes
        a2.run_echo(name, "ov6")
    assert wait_until(lambda: _check(three, net) == before)
    blocks1 = _blocks(three.etcd, SUBNET6)["host1"]
    extra = [f"x{i}1" for i in range(7)]  # more than a /125 holds: host1 takes a second block
    for name in extra:
        a1.run_echo(name, "ov6")
    assert wait_until(lambda: len(_blocks(three.etcd, SUBNET6)["host1"]) == len(blocks1) + 1)
    after = _check(three, net)
    for host in ("host2", "host3"):  # one more route each, no other entry
        assert len(after[host].routes) == len(before[host].routes) + 1
        assert (after[host].neigh, after[host].fdb) == (before[host].neigh, before[host].fdb)
    # Containers of host1's two blocks reach each other through their host, and a container
    # of the new block reaches the other hosts.
    first, last = extra[0], extra[-1]
    first_ip, last_ip = three.ip6(first), three.ip6(last)
    assert ipaddress.ip_network(f"{first_ip}/125", strict=False) != ipaddress.ip_network(
        f"{last_ip}/125", strict=False)
    got = answered(lambda: tcp_probe(three.ns(first), last_ip, 80))
    assert (got.outcome, got.answer) == (ANSWERED, f"{last} {first_ip}"), got
    got = answered(lambda: tcp_probe(three.ns(last), three.ip6("c3"), 80))
    assert (got.outcome, got.answer) == (ANSWERED, f"c3 {last_ip}"), got
    for name in ("x2", "y2", "z2"):
        a2.cli("rm", "-f", name)
    for name in extra:
        a1.cli("rm", "-f", name)

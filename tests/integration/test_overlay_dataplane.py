"""The VXLAN overlay's kernel half on a real kernel: hosts are namespaces on one underlay
segment (tests/harness/overlay.py), each with a bridge holding its blocks' gateways and
containers on it; the overlay applier programs each host with the others as remotes. Proven
with traffic between containers on different hosts (ping and TCP, IPv4 and IPv6) and with the
kernel's state read by ``ip``, ``bridge`` and ``ethtool``, never through plexus's own code."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from plexus.dataplane.links import tag
from plexus.dataplane.overlay.apply import OverlayApplier
from plexus.dataplane.overlay.model import (
    HostVtep,
    OverlayKernelState,
    OverlaySpec,
    RemoteHost,
    device_name,
    vtep_mac,
)
from plexus.dataplane.overlay.render import OverlayDelta, desired, host_delta
from plexus.errors import DataplaneError
from plexus.model.types import IPAddress, IPNetwork
from tests.harness.overlay import Lab, Monitor, member
from tests.harness.probes import ANSWERED, tcp_probe, wait_tcp
from tests.harness.world import nsexec, ping

ip = ipaddress.ip_address
net = ipaddress.ip_network
WEB = OverlaySpec("web", "0123456789abcdef", vni=4242)
MTU = 1450  # the underlay's 1500 less VXLAN's 50


def block4(i: int) -> IPNetwork:
    return net(f"10.100.{i // 4}.{(i % 4) * 64}/26")


def block6(i: int) -> IPNetwork:
    return net(f"fd00:100::{i * 64:x}/122")


@dataclass
class Node:
    n: int
    ns: str
    blocks: tuple[IPNetwork, ...]
    containers: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"node{self.n}"

    @property
    def underlay(self) -> IPAddress:
        return ip(f"192.0.2.{self.n}")

    def remote(self) -> RemoteHost:
        return RemoteHost(self.name, self.underlay, self.blocks)


@dataclass
class Cluster:
    """Hosts of one overlay network in a lab, and an applier per host."""

    lab: Lab
    spec: OverlaySpec = WEB
    nodes: dict[int, Node] = field(default_factory=dict)
    appliers: dict[int, OverlayApplier] = field(default_factory=dict)

    @property
    def dev(self) -> str:
        return device_name(self.spec.network_id)

    @property
    def bridge(self) -> str:
        return f"pxbr-{self.spec.network_id[:10]}"

    def add_host(self, n: int, blocks: Sequence[IPNetwork], make_ns: bool = True) -> Node:
        ns = self.lab.host(n) if make_ns else f"{self.lab.prefix}-h{n}"
        node = self.nodes[n] = Node(n, ns, tuple(blocks))
        self.lab.bridge(ns, self.bridge, blocks, MTU)
        self.appliers[n] = OverlayApplier(f"/run/netns/{ns}")
        return node

    def add_container(self, n: int, k: int = 0) -> str:
        """Container k of host n: an address per IP version, from the host's blocks in turn."""
        node = self.nodes[n]
        name = f"{self.spec.vni % 100}c{n}-{len(node.containers)}"
        addresses = []
        for version in (4, 6):
            held = [b for b in node.blocks if b.version == version]
            if held:
                addresses.append(member(held[k % len(held)], k // len(held)))
        ns = self.lab.container(node.ns, self.bridge, name, addresses, MTU)
        node.containers.append(ns)
        return ns

    def want(self, n: int, remotes: Sequence[int] | None = None) -> OverlayKernelState:
        others = [m for m in self.nodes if m != n] if remotes is None else remotes
        local = HostVtep(self.nodes[n].name, self.nodes[n].underlay, 1500, self.nodes[n].blocks)
        return desired(self.spec, local, [self.nodes[m].remote() for m in others])

    async def sync(self, n: int, remotes: Sequence[int] | None = None) -> OverlayDelta:
        return await self.appliers[n].sync(self.want(n, remotes))

    async def sync_all(self) -> None:
        for n in self.nodes:
            await self.sync(n)

    def close(self) -> None:
        for applier in self.appliers.values():
            applier.close()


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def cluster(lab: Lab) -> Iterator[Cluster]:
    made = Cluster(lab)
    try:
        yield made
    finally:
        made.close()


# --- independent oracles ----------------------------------------------------------------------


def ipj(ns: str, *argv: str) -> Any:
    return json.loads(nsexec(ns, *argv).stdout or "[]")


def fdb(ns: str, dev: str) -> set[tuple[str, str]]:
    entries = ipj(ns, "bridge", "-j", "fdb", "show", "dev", dev)
    assert all("self" in e["flags"] and "permanent" in e["state"] for e in entries), entries
    return {(e["mac"], e["dst"]) for e in entries}


def neighbours(ns: str, dev: str) -> set[tuple[str, str]]:
    entries = ipj(ns, "ip", "-j", "neigh", "show", "dev", dev, "nud", "permanent")
    return {(e["dst"], e["lladdr"]) for e in entries}


def routes(ns: str, dev: str) -> set[tuple[str, str]]:
    found = set()
    for family in ("-4", "-6"):
        for r in ipj(ns, "ip", "-j", family, "route", "show", "proto", "112", "dev", dev):
            assert "onlink" in r["flags"], r
            found.add((r["dst"], r["gateway"]))
    return found


def tx_checksumming(ns: str, dev: str) -> str:
    out = nsexec(ns, "ethtool", "-k", dev).stdout
    return next(line.split(":")[1].strip() for line in out.splitlines()
                if line.startswith("tx-checksumming:"))


def reaches(src: str, dst: str, tries: int = 3) -> bool:
    """Ping, a few times (the first packet of a new path may wait on neighbour discovery)."""
    return any(ping(src, dst, timeout=1) for _ in range(tries))


def addr(container_ns: str, version: int) -> str:
    data = ipj(container_ns, "ip", "-j", f"-{version}", "addr", "show", "dev", "eth0",
               "scope", "global")
    return str(data[0]["addr_info"][0]["local"])


# --- tests ------------------------------------------------------------------------------------


async def three_hosts(c: Cluster, v6: bool = True) -> None:
    for n in (1, 2, 3):
        blocks = [block4(4 * n)] + ([block6(4 * n)] if v6 else [])
        c.add_host(n, blocks)
        c.add_container(n)
    await c.sync_all()


async def test_containers_on_three_hosts_reach_each_other_over_ipv4_and_ipv6(
        cluster: Cluster, lab: Lab) -> None:
    await three_hosts(cluster)
    for node in cluster.nodes.values():
        lab.serve(node.containers[0], node.name)
    for a in cluster.nodes.values():
        for b in cluster.nodes.values():
            if a is b:
                continue
            for version in (4, 6):
                dst = addr(b.containers[0], version)
                assert reaches(a.containers[0], dst), f"{a.name} -> {b.name} {dst}"
                answer = wait_tcp(a.containers[0], dst, 80)
                # The server saw the client's own address: routed, never NATed.
                assert answer == f"{b.name} {addr(a.containers[0], version)}"


async def test_kernel_state_is_one_device_and_per_host_entries(cluster: Cluster) -> None:
    await three_hosts(cluster)
    h1, dev = cluster.nodes[1].ns, cluster.dev
    link = ipj(h1, "ip", "-j", "-d", "link", "show", dev)[0]
    data = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["local"], data["port"], data["learning"]) == (
        4242, "192.0.2.1", 4789, False)
    assert "group" not in data and "remote" not in data
    assert link["mtu"] == MTU and link["address"] == vtep_mac("node1", 4242)
    assert link["inet6_addr_gen_mode"] == "none" and "UP" in link["flags"]
    addresses = {f"{a['local']}/{a['prefixlen']}"
                 for a in ipj(h1, "ip", "-j", "addr", "show", "dev", dev)[0]["addr_info"]}
    assert addresses == {"10.100.1.0/32", "fd00:100::100/128"}  # no link-local
    mac2, mac3 = vtep_mac("node2", 4242), vtep_mac("node3", 4242)
    assert fdb(h1, dev) == {(mac2, "192.0.2.2"), (mac3, "192.0.2.3")}
    assert neighbours(h1, dev) == {("10.100.2.0", mac2), ("fd00:100::200", mac2),
                                   ("10.100.3.0", mac3), ("fd00:100::300", mac3)}
    assert routes(h1, dev) == {("10.100.2.0/26", "10.100.2.0"), ("10.100.3.0/26", "10.100.3.0"),
                               ("fd00:100::200/122", "fd00:100::200"),
                               ("fd00:100::300/122", "fd00:100::300")}
    assert tx_checksumming(h1, dev) == "off"


async def test_reapplying_the_same_state_changes_nothing(cluster: Cluster) -> None:
    await three_hosts(cluster)
    monitor = Monitor(cluster.nodes[1].ns)
    dev = cluster.dev

    def events() -> list[str]:
        # Only the device's: the new links of the lab still finish IPv6 duplicate address
        # detection around now, which the monitor shows too. Everything the applier changes
        # (the link, its addresses, FDB entries, neighbours, routes) names the device.
        return [line for line in monitor.mark() if dev in line]

    try:
        _, before = cluster.appliers[1].counters()
        delta = await cluster.sync(1)
        assert delta.empty and cluster.appliers[1].counters()[1] == before
        assert events() == []  # the kernel announced no change at all
        await cluster.sync(1, remotes=[2])  # the control: a real change is seen
        assert len(events()) >= 4
    finally:
        monitor.close()


async def test_removing_a_remote_host_removes_exactly_its_entries(cluster: Cluster) -> None:
    await three_hosts(cluster)
    h1, dev = cluster.nodes[1].ns, cluster.dev
    c1, c2, c3 = (cluster.nodes[n].containers[0] for n in (1, 2, 3))
    assert reaches(c1, addr(c3, 4))
    fdb_before, neigh_before, routes_before = fdb(h1, dev), neighbours(h1, dev), routes(h1, dev)
    sent, changes = cluster.appliers[1].counters()
    device = cluster.want(1).device
    assert device is not None
    delta = host_delta(4242, device, cluster.nodes[3].remote(), None)
    assert await cluster.appliers[1].update(delta)
    mac3 = vtep_mac("node3", 4242)
    assert fdb_before - fdb(h1, dev) == {(mac3, "192.0.2.3")} and fdb(h1, dev) < fdb_before
    assert neigh_before - neighbours(h1, dev) == {("10.100.3.0", mac3), ("fd00:100::300", mac3)}
    assert routes_before - routes(h1, dev) == {("10.100.3.0/26", "10.100.3.0"),
                                               ("fd00:100::300/122", "fd00:100::300")}
    assert len(routes(h1, dev)) == 2 and len(neighbours(h1, dev)) == 2
    # One datagram of its five entries, no reads.
    assert len(delta) == 5 and cluster.appliers[1].counters() == (sent + 5, changes + 5)
    for version in (4, 6):
        assert not ping(c1, addr(c3, version)), "node3 must be unreachable from node1"
        assert reaches(c1, addr(c2, version)) and reaches(c2, addr(c3, version))


async def test_adding_a_remote_host_is_one_datagram_of_its_entries(cluster: Cluster) -> None:
    for n in (1, 2, 3):
        cluster.add_host(n, [block4(4 * n), block4(4 * n + 1)])
        cluster.add_container(n)
    await cluster.sync(1, remotes=[2])
    await cluster.sync(2, remotes=[1, 3])
    await cluster.sync(3, remotes=[1, 2])
    c1, c3 = cluster.nodes[1].containers[0], cluster.nodes[3].containers[0]
    assert not ping(c1, addr(c3, 4))
    sent, _ = cluster.appliers[1].counters()
    device = cluster.want(1).device
    assert device is not None
    delta = host_delta(4242, device, None, cluster.nodes[3].remote())
    assert await cluster.appliers[1].update(delta)
    assert len(delta) == 4  # an FDB entry, a neighbour, a route for each of its two blocks
    assert cluster.appliers[1].counters()[0] == sent + 4
    assert reaches(c1, addr(c3, 4))


async def test_a_resync_restores_what_was_flushed_and_leaves_others_entries(
        cluster: Cluster) -> None:
    await three_hosts(cluster, v6=False)
    h1, dev = cluster.nodes[1].ns, cluster.dev
    c1, c2 = cluster.nodes[1].containers[0], cluster.nodes[2].containers[0]
    fdb_before, neigh_before, routes_before = fdb(h1, dev), neighbours(h1, dev), routes(h1, dev)
    nsexec(h1, "ip", "route", "flush", "proto", "112")
    nsexec(h1, "bridge", "fdb", "del", vtep_mac("node2", 4242), "dev", dev, "self")
    nsexec(h1, "ip", "route", "add", "198.51.100.0/24", "dev", dev)  # someone else's
    assert not ping(c1, addr(c2, 4))
    delta = await cluster.sync(1)
    assert len(delta) == 3  # two routes and the FDB entry
    assert (fdb(h1, dev), neighbours(h1, dev), routes(h1, dev)) == (
        fdb_before, neigh_before, routes_before)
    assert ipj(h1, "ip", "-j", "route", "show", "198.51.100.0/24")[0]["dev"] == dev
    assert reaches(c1, addr(c2, 4))


async def test_kernel_objects_grow_with_hosts_and_blocks_not_containers(
        cluster: Cluster) -> None:
    for n in (1, 2, 3):
        cluster.add_host(n, [block4(4 * n), block4(4 * n + 1)])
    await cluster.sync_all()
    counts = {n: (len(fdb(node.ns, cluster.dev)), len(neighbours(node.ns, cluster.dev)),
                  len(routes(node.ns, cluster.dev))) for n, node in cluster.nodes.items()}
    assert counts == {n: (2, 2, 4) for n in (1, 2, 3)}
    for i in range(20):  # 20 containers, spread over the hosts and both blocks of each
        cluster.add_container(i % 3 + 1, k=i // 3)
    used = {ipaddress.ip_interface(f"{addr(c, 4)}/26").network
            for node in cluster.nodes.values() for c in node.containers}
    assert used == {b for node in cluster.nodes.values() for b in node.blocks}
    await cluster.sync_all()
    after = {n: (len(fdb(node.ns, cluster.dev)), len(neighbours(node.ns, cluster.dev)),
                 len(routes(node.ns, cluster.dev))) for n, node in cluster.nodes.items()}
    assert after == counts
    first, last = cluster.nodes[1].containers[0], cluster.nodes[3].containers[-1]
    assert reaches(first, addr(last, 4)) and reaches(last, addr(first, 4))


async def test_two_overlay_networks_are_separate_devices(cluster: Cluster, lab: Lab) -> None:
    other = Cluster(lab, OverlaySpec("db", "fedcba9876543210", vni=77))
    try:
        for n in (1, 2):
            cluster.add_host(n, [block4(4 * n)])
            other.add_host(n, [net(f"10.200.{n}.0/26")], make_ns=False)
            cluster.add_container(n)
            other.add_container(n)
        await cluster.sync_all()
        await other.sync_all()
        h1 = cluster.nodes[1].ns
        devices = {link["ifname"]: link["linkinfo"]["info_data"]["id"]
                   for link in ipj(h1, "ip", "-j", "-d", "link", "show", "type", "vxlan")}
        assert devices == {cluster.dev: 4242, other.dev: 77}
        assert fdb(h1, cluster.dev) == {(vtep_mac("node2", 4242), "192.0.2.2")}
        assert fdb(h1, other.dev) == {(vtep_mac("node2", 77), "192.0.2.2")}
        assert routes(h1, other.dev) == {("10.200.2.0/26", "10.200.2.0")}
        for c in (cluster, other):
            assert reaches(c.nodes[1].containers[0], addr(c.nodes[2].containers[0], 4))
    finally:
        other.close()


async def test_checksum_offload_follows_the_spec(cluster: Cluster) -> None:
    cluster.add_host(1, [block4(4)])
    cluster.add_host(2, [block4(8)])
    cluster.spec = replace(WEB, offload=True)
    await cluster.sync(1)
    assert tx_checksumming(cluster.nodes[1].ns, cluster.dev) == "on"
    cluster.spec = WEB
    delta = await cluster.sync(1)
    assert delta.tx_checksum is False and len(delta) == 1
    assert tx_checksumming(cluster.nodes[1].ns, cluster.dev) == "off"


async def test_an_ipv6_underlay_carries_the_overlay(cluster: Cluster) -> None:
    spec = replace(WEB, vni=6)
    for n in (1, 2):
        cluster.add_host(n, [block4(4 * n), block6(4 * n)])
        cluster.add_container(n)
    remotes = {n: RemoteHost(f"node{n}", ip(f"2001:db8::{n}"), cluster.nodes[n].blocks)
               for n in (1, 2)}
    for n, m in ((1, 2), (2, 1)):
        local = HostVtep(f"node{n}", ip(f"2001:db8::{n}"), 1500, cluster.nodes[n].blocks)
        await cluster.appliers[n].sync(desired(spec, local, [remotes[m]]))
    link = ipj(cluster.nodes[1].ns, "ip", "-j", "-d", "link", "show", cluster.dev)[0]
    assert link["mtu"] == 1430 and link["linkinfo"]["info_data"]["local6"] == "2001:db8::1"
    assert fdb(cluster.nodes[1].ns, cluster.dev) == {(vtep_mac("node2", 6), "2001:db8::2")}
    c1, c2 = cluster.nodes[1].containers[0], cluster.nodes[2].containers[0]
    for version in (4, 6):
        assert reaches(c1, addr(c2, version))


async def test_a_removed_network_takes_its_device_and_routes_along(cluster: Cluster) -> None:
    await three_hosts(cluster, v6=False)
    h1 = cluster.nodes[1].ns
    assert await cluster.appliers[1].remove(cluster.dev)
    assert not await cluster.appliers[1].remove(cluster.dev)  # gone already: no error
    assert ipj(h1, "ip", "-j", "link", "show", "type", "vxlan") == []
    assert ipj(h1, "ip", "-j", "route", "show", "proto", "112") == []
    assert tcp_probe(cluster.nodes[1].containers[0], addr(cluster.nodes[2].containers[0], 4),
                     80, timeout=1).outcome is not ANSWERED


async def test_a_link_of_the_devices_name_that_is_not_this_agents_is_refused(
        cluster: Cluster) -> None:
    cluster.add_host(1, [block4(4)])
    cluster.add_host(2, [block4(8)])
    h1, dev = cluster.nodes[1].ns, cluster.dev
    nsexec(h1, "ip", "link", "add", dev, "type", "bridge")  # someone else's, by chance
    cluster.spec = replace(WEB, alias=tag("node1@aaaa", "net:web"))
    with pytest.raises(DataplaneError, match="not plexus's"):
        await cluster.sync(1)
    with pytest.raises(DataplaneError, match="not plexus's VXLAN device"):
        await cluster.appliers[1].remove(dev)
    assert ipj(h1, "ip", "-j", "-d", "link", "show", dev)[0]["linkinfo"]["info_kind"] == "bridge"
    nsexec(h1, "ip", "link", "del", dev)
    await cluster.sync(1)
    assert ipj(h1, "ip", "-j", "link", "show", dev)[0]["ifalias"] == "plexus:node1@aaaa:net:web"
    cluster.spec = replace(WEB, alias=tag("other@bbbb", "net:web"))  # another agent
    with pytest.raises(DataplaneError, match="belongs to another plexus agent"):
        await cluster.sync(1)
    assert routes(h1, dev) == {("10.100.2.0/26", "10.100.2.0")}  # left as it was

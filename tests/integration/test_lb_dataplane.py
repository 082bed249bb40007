"""Services in a real kernel: ``table inet plexus_services`` applied by ``ServiceTable``, proved
with real traffic (runs inside tests/sandbox; no agent: the table is applied directly).

The world (all namespaces private to the sandbox):

    outside 203.0.113.2 ── up0 203.0.113.1 ┐ host: ip_forward on; default route via outside
                                           ├─ pxbr-s 10.1.0.1/24 fd01::1/64 ── s1..s4 .2-.5 ::2-::5
                                           │                                   n1 .9 (no backend)
                                           └─ pxbr-c 10.2.0.1/24 fd02::1/64 ── c1 .2 ::2

s1..s4 (and n1) run tests/harness/echo.py on ports 80 and 53 (tcp and udp): every connection
and datagram is answered "NAME PEER", so a client learns which backend it reached and which
source address that backend saw. The host's default route is what lets it reach a VIP at all
(the trap in nft.lb's notes). The kernel's table is read back with the ``nft`` command.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from plexus.dataplane.netns import run_in_netns
from plexus.dataplane.nft import FirewallState, LibNft, NetRule
from plexus.dataplane.nft import render_table as render_main_table
from plexus.dataplane.nft import render_teardown as render_main_teardown
from plexus.dataplane.nft.lb_table import ServiceTable
from plexus.lb.model import Backend, Frontend, Published, diff, index
from tests.harness.probes import ANSWERED, DROPPED, REFUSED, connect, tcp_probe, udp_probe

ip = ipaddress.ip_address
HOST4, OUT4 = "203.0.113.1", "203.0.113.2"
BACKENDS = {"s1": "10.1.0.2", "s2": "10.1.0.3", "s3": "10.1.0.4", "s4": "10.1.0.5"}
N1, C1, C1_6 = "10.1.0.9", "10.2.0.2", "fd02::2"
VIP, STICKY, EMPTY, UDP, VIP6 = "10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4", "fd96::1"
ECHO = Path(__file__).parents[1] / "harness" / "echo.py"
SPREAD_CONNECTIONS = 10_000
SPREAD_TOLERANCE = 0.10  # each of 4 backends within ±10% of an even share


def backends(*names: str, port: int = 80) -> tuple[Backend, ...]:
    return tuple(Backend(ip(BACKENDS[n]), port) for n in names)


WEB = Frontend("ns/web", "", "tcp", ip(VIP), 80, backends("s1", "s2", "s3", "s4"),
               published=(Published(None, 8080),))
AFFINE = Frontend("ns/sticky", "", "tcp", ip(STICKY), 80, backends("s1", "s2", "s3", "s4"),
                  affinity=300)
NOBODY = Frontend("ns/empty", "", "tcp", ip(EMPTY), 80, published=(Published(None, 8081),))
NOBODY_UDP = Frontend("ns/empty", "dns", "udp", ip(EMPTY), 53)
DNS = Frontend("ns/dns", "", "udp", ip(UDP), 53, backends("s1", "s2", port=53))
SIX = Frontend("ns/six", "", "tcp", ip(VIP6), 80, (Backend(ip("fd01::3"), 80),))
ALL = (WEB, AFFINE, NOBODY, NOBODY_UDP, DNS, SIX)


# -- the world -------------------------------------------------------------------------------


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv}: {proc.stderr.strip()}")
    return proc.stdout


def plug(ns: str, bridge: str, addrs: list[str], gateways: list[str]) -> None:
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", "host", "link", "add", f"v-{ns}", "type", "veth", "peer", "name", "eth0",
       "netns", ns)
    sh("ip", "-n", "host", "link", "set", f"v-{ns}", "master", bridge, "up")
    # As plexus's link layer does: with br_netfilter, a backend DNATed to itself is bridged
    # back out of the port it came in by, which a bridge does only in hairpin mode.
    sh("ip", "netns", "exec", "host", "bridge", "link", "set", "dev", f"v-{ns}", "hairpin", "on")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    for a in addrs:
        sh("ip", "-n", ns, "addr", "add", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    for gw in gateways:
        sh("ip", "-n", ns, "-6" if ":" in gw else "-4", "route", "add", "default", "via", gw)


def build_world() -> None:
    for ns in ("host", "outside"):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    for name, addrs in (("pxbr-s", ["10.1.0.1/24", "fd01::1/64"]),
                        ("pxbr-c", ["10.2.0.1/24", "fd02::1/64"])):
        sh("ip", "-n", "host", "link", "add", name, "type", "bridge")
        for a in addrs:
            sh("ip", "-n", "host", "addr", "add", a, "dev", name, *(["nodad"] if ":" in a else []))
        sh("ip", "-n", "host", "link", "set", name, "up")
    for i, (ns, addr) in enumerate(sorted(BACKENDS.items())):
        plug(ns, "pxbr-s", [f"{addr}/24", f"fd01::{i + 2}/64"], ["10.1.0.1", "fd01::1"])
    plug("n1", "pxbr-s", [f"{N1}/24"], ["10.1.0.1"])
    plug("c1", "pxbr-c", [f"{C1}/24", f"{C1_6}/64"], ["10.2.0.1", "fd02::1"])
    sh("ip", "-n", "host", "link", "add", "up0", "type", "veth", "peer", "name", "eth0",
       "netns", "outside")
    sh("ip", "-n", "host", "addr", "add", f"{HOST4}/24", "dev", "up0")
    sh("ip", "-n", "host", "link", "set", "up0", "up")
    sh("ip", "-n", "outside", "addr", "add", f"{OUT4}/24", "dev", "eth0")
    sh("ip", "-n", "outside", "link", "set", "eth0", "up")
    sh("ip", "-n", "host", "route", "add", "default", "via", OUT4)
    for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        sh("ip", "netns", "exec", "host", "sysctl", "-qw", key)


@pytest.fixture(scope="module")
def world() -> Iterator[None]:
    build_world()
    servers = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(ECHO), ns,
                                 "80", "53"]) for ns in (*BACKENDS, "n1")]
    try:
        for ns in (*BACKENDS, "n1"):
            _wait_listening(ns)
        yield
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (*BACKENDS, "n1", "c1", "host", "outside"):
            sh("ip", "netns", "del", ns, check=False)


def _wait_listening(ns: str) -> None:
    for _ in range(100):  # bounded: 10 s
        if tcp_probe(ns, "127.0.0.1", 80, 0.5).outcome is ANSWERED:
            return
        time.sleep(0.1)
    raise RuntimeError(f"echo server in {ns} did not start")


def set_br_netfilter(on: bool) -> None:
    for key in ("iptables", "ip6tables"):
        sh("ip", "netns", "exec", "host", "sysctl", "-qw",
           f"net.bridge.bridge-nf-call-{key}={int(on)}")


@pytest.fixture
async def table(world: None) -> AsyncIterator[ServiceTable]:
    """The table holding ALL, fresh for each test (and no conntrack entries left over), and
    br_netfilter off unless the test asks for ``br_nf``."""
    set_br_netfilter(False)
    with LibNft("host") as nft:
        t = ServiceTable(nft, netns="host")
        await t.replace(ALL)
        sh("ip", "netns", "exec", "host", "conntrack", "-F", check=False)
        yield t
        await t.remove()
        t.close()


@pytest.fixture(params=[False, True], ids=["br_netfilter-off", "br_netfilter-on"])
def br_nf(request: pytest.FixtureRequest, table: ServiceTable) -> bool:
    set_br_netfilter(request.param)
    return bool(request.param)


def listing() -> list[dict]:  # type: ignore[type-arg]
    """The table as the ``nft`` command sees it (independent of the code under test)."""
    out = sh("ip", "netns", "exec", "host", "nft", "-j", "list", "table", "inet",
             "plexus_services", check=False)
    return [o for o in json.loads(out)["nftables"] if "metainfo" not in o] if out else []


def who(answer: str) -> tuple[str, str]:
    """("s2", "10.2.0.2"): which backend answered and the source address it saw."""
    name, _, peer = answer.partition(" ")
    return name, peer


def many(ns: str, addr: str, port: int, count: int,
         source: str | None = None) -> collections.Counter[str]:
    """``count`` TCP connections from ``ns`` (from ``source``, if given), one after the other:
    who answered how often."""
    def go() -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        for _ in range(count):
            with socket.create_connection((addr, port), timeout=2,
                                          source_address=(source, 0) if source else None) as s:
                seen[who(s.recv(100).decode().strip())[0]] += 1
        return seen

    return run_in_netns(f"/run/netns/{ns}", go)


# -- the kernel's table ----------------------------------------------------------------------


async def test_the_kernel_holds_elements_per_frontend_and_chains_per_shape(
        table: ServiceTable) -> None:
    """A VIP is one element leading to its frontend's number, its published port another with
    the same number; 200 more services of the same shape add elements and no chain."""
    objs = listing()
    maps = {o["map"]["name"]: o["map"].get("elem", []) for o in objs if "map" in o}
    number = {json.dumps(k): d for k, d in maps["vips4"]}
    web = number[json.dumps({"concat": [VIP, "tcp", 80]})]
    assert [{"concat": ["tcp", 8080]}, web] in maps["ports4"]
    assert len(maps["vips6"]) == 1
    sizes = await table.sizes()
    assert sizes is not None
    assert (sizes["vips4"], sizes["noep4"], sizes["noports4"]) == (3, 2, 1)
    assert (sizes["backends4"], sizes["slots"]) == (10, 11)  # 4 + 4 + 2 backends, + 1 in v6
    more = [replace(WEB, service=f"ns/more{i}", vip=ip(f"10.97.{i // 250}.{i % 250 + 1}"),
                    published=()) for i in range(200)]
    await table.change(diff({}, index(more)))
    after = await table.sizes()
    assert after is not None
    assert (after["vips4"], after["chains"]) == (203, sizes["chains"])
    assert who(tcp_probe("c1", "10.97.0.200", 80).answer)[0] in BACKENDS


# -- traffic ---------------------------------------------------------------------------------


def test_connections_spread_evenly_over_four_backends(table: ServiceTable) -> None:
    seen = many("c1", VIP, 80, SPREAD_CONNECTIONS)
    share = SPREAD_CONNECTIONS / 4
    assert set(seen) == set(BACKENDS)
    for name, count in seen.items():
        assert abs(count - share) <= SPREAD_TOLERANCE * share, (name, seen)


def test_a_client_keeps_its_backend_with_affinity(table: ServiceTable) -> None:
    seen = many("c1", STICKY, 80, 40)
    assert len(seen) == 1, seen
    assert len(many("c1", VIP, 80, 40)) > 1  # without affinity the same client moves (control)


async def test_affinity_over_ipv6(table: ServiceTable) -> None:
    """Also when its backend leaves: the client's entry (keyed by the last 96 bits of its
    address, see nft.lb) is forgotten and it keeps the new one."""
    six = Frontend("ns/six-sticky", "", "tcp", ip("fd96::2"), 80,
                   tuple(Backend(ip(f"fd01::{i}"), 80) for i in range(2, 6)), affinity=600)
    await table.change(diff({}, index([six])))
    (mine,) = many("c1", "fd96::2", 80, 20)
    assert mine in BACKENDS
    address = ip(f"fd01::{sorted(BACKENDS).index(mine) + 2}")  # as build_world numbers them
    gone = replace(six, backends=tuple(b for b in six.backends if b.address != address))
    await table.change(diff(index([six]), index([gone])))
    moved = many("c1", "fd96::2", 80, 20)
    assert len(moved) == 1 and mine not in moved, moved


async def test_affinity_of_a_client_whose_address_is_listed_in_hex(table: ServiceTable) -> None:
    """nft lists an IPv6 client's 96 bits as a number up to 64 bits and as a hex string
    beyond: a client with high bits set (fd02:0:1::2) is forgotten too when its backend
    leaves."""
    client = "fd02:0:1::2"
    sh("ip", "-n", "c1", "addr", "add", f"{client}/128", "dev", "eth0", "nodad")
    sh("ip", "-n", "host", "route", "add", f"{client}/128", "dev", "pxbr-c")
    try:
        six = Frontend("ns/hex", "", "tcp", ip("fd96::3"), 80,
                       tuple(Backend(ip(f"fd01::{i}"), 80) for i in range(2, 6)), affinity=600)
        await table.change(diff({}, index([six])))
        (mine,) = many("c1", "fd96::3", 80, 10, source=client)
        address = ip(f"fd01::{sorted(BACKENDS).index(mine) + 2}")
        gone = replace(six, backends=tuple(b for b in six.backends if b.address != address))
        await table.change(diff(index([six]), index([gone])))
        moved = many("c1", "fd96::3", 80, 10, source=client)
        assert len(moved) == 1 and mine not in moved, moved
    finally:
        sh("ip", "-n", "host", "route", "del", f"{client}/128", check=False)
        sh("ip", "-n", "c1", "addr", "del", f"{client}/128", "dev", "eth0", check=False)


async def test_a_missing_base_chain_is_noticed_and_written_again(table: ServiceTable) -> None:
    sh("ip", "netns", "exec", "host", "nft", "delete", "chain", "inet", "plexus_services",
       "nat_prerouting")
    assert tcp_probe("c1", VIP, 80, 0.5).outcome is not ANSWERED
    assert not await table.intact()
    await table.replace(ALL)
    assert await table.intact()
    assert who(tcp_probe("c1", VIP, 80).answer)[0] in BACKENDS


async def test_affinity_outlives_other_backends_changes_not_its_own_backend(
        table: ServiceTable) -> None:
    """Removing another backend keeps the client where it was; removing its own sends it to a
    new one, which it then keeps (its old entry was forgotten, not left to lead nowhere)."""
    (mine,) = many("c1", STICKY, 80, 10)
    other = next(n for n in BACKENDS if n != mine)
    kept = tuple(b for b in AFFINE.backends if b.address != ip(BACKENDS[other]))
    fewer = replace(AFFINE, backends=kept)
    await table.change(diff(index([AFFINE]), index([fewer])))
    assert set(many("c1", STICKY, 80, 20)) == {mine}
    left = tuple(b for b in kept if b.address != ip(BACKENDS[mine]))
    await table.change(diff(index([fewer]), index([replace(fewer, backends=left)])))
    moved = many("c1", STICKY, 80, 20)
    assert len(moved) == 1 and mine not in moved, moved


def test_the_client_keeps_its_address(table: ServiceTable) -> None:
    assert who(tcp_probe("c1", VIP, 80).answer)[1] == C1
    assert who(tcp_probe("c1", VIP6, 80).answer) == ("s2", C1_6)


def test_the_scratch_marks_are_left_clean(table: ServiceTable) -> None:
    """The frontend's number (meta mark) and the drawn backend (ct mark) are scratch: the
    connection's conntrack entry ends up with mark 0, with and without affinity."""
    for vip in (VIP, STICKY):
        assert who(tcp_probe("c1", vip, 80).answer)[0] in BACKENDS
        out = sh("ip", "netns", "exec", "host", "conntrack", "-L", "-p", "tcp", "--orig-dst", vip)
        marks = {f for line in out.splitlines() for f in line.split() if f.startswith("mark=")}
        assert marks == {"mark=0"}, out


async def test_removing_a_backend_keeps_connections_to_the_others(table: ServiceTable) -> None:
    conns = [connect("c1", VIP, 80) for _ in range(24)]
    try:
        fewer = replace(WEB, backends=backends("s1", "s2", "s3"))
        await table.change(diff(index([WEB]), index([fewer])))
        for s in conns:
            s.sendall(b"still there?")
            assert who(s.recv(100).decode().strip())[0] in BACKENDS
        assert "s4" not in many("c1", VIP, 80, 60)
    finally:
        for s in conns:
            s.close()


def test_no_backend_is_refused_at_once_not_a_timeout(table: ServiceTable) -> None:
    for ns, addr, port in (("c1", EMPTY, 80), ("host", EMPTY, 80), ("outside", HOST4, 8081)):
        probe = tcp_probe(ns, addr, port, timeout=5)
        assert probe.outcome is REFUSED, (ns, addr, port, probe)
    assert udp_probe("c1", EMPTY, 53, timeout=5).outcome is REFUSED


def test_a_backend_reaches_its_own_service(table: ServiceTable, br_nf: bool) -> None:
    """Hairpin: s1 → VIP lands on s1 itself as often as on the others, and every backend sees
    the bridge's address (masqueraded by ``table inet plexus``, as plexus always runs it) so
    that its answer comes back through the host. With br_netfilter the DNAT happens at bridge
    level (s1 to itself needs the port's hairpin mode); without, the host routes the packet
    back out of the bridge."""
    with main_table():
        seen = many("s1", VIP, 80, 40)
        assert set(seen) == set(BACKENDS), seen
        for _ in range(20):
            assert who(tcp_probe("s1", VIP, 80).answer)[1] == "10.1.0.1"


def test_the_host_reaches_a_vip(table: ServiceTable) -> None:
    name, peer = who(tcp_probe("host", VIP, 80).answer)
    assert (name in BACKENDS, peer) == (True, HOST4)


def test_outside_reaches_a_published_port_with_its_own_address(table: ServiceTable) -> None:
    name, peer = who(tcp_probe("outside", HOST4, 8080).answer)
    assert (name in BACKENDS, peer) == (True, OUT4)
    assert tcp_probe("outside", HOST4, 8082).outcome is REFUSED  # nothing published there


async def test_udp_entries_of_a_removed_backend_are_forgotten(table: ServiceTable) -> None:
    """A client that keeps one UDP flow goes on reaching a removed backend until its
    conntrack entry goes (the failure mode); ``forget_udp`` deletes it."""
    sock = run_in_netns("/run/netns/c1",
                        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with sock:
        sock.settimeout(2)
        sock.connect((UDP, 53))

        def ask() -> str:
            sock.send(b"who?")
            return who(sock.recv(100).decode().strip())[0]

        first = ask()
        kept = [b for b in DNS.backends if b.address != ip(BACKENDS[first])]
        await table.change(diff(index([DNS]), index([replace(DNS, backends=tuple(kept))])))
        assert ask() == first  # stale: the flow still leads to the removed backend
        await table.forget_udp(DNS, [b for b in DNS.backends if b not in kept])
        assert ask() != first


# -- coexistence -----------------------------------------------------------------------------


async def test_a_neighbour_on_the_backends_bridge_with_the_main_table(
        table: ServiceTable, br_nf: bool) -> None:
    """n1 shares the backends' bridge; the answer of a backend to it would go straight over
    the bridge, so ``table inet plexus`` (which masquerades DNATed sources of the output
    bridge) must work with this table. c1, on another network, is isolated from the VIP as from
    the backends behind it (``render.VIA_VIP``)."""
    with main_table():
        assert set(many("n1", VIP, 80, 40)) == set(BACKENDS)
        assert tcp_probe("c1", VIP, 80, 0.5).outcome is DROPPED  # another network


@contextlib.contextmanager
def main_table() -> Iterator[None]:
    """``table inet plexus`` for the two bridges, as the agent would write it."""
    nets = (NetRule("pxbr-s", (ipaddress.ip_network("10.1.0.0/24"),)),
            NetRule("pxbr-c", (ipaddress.ip_network("10.2.0.0/24"),)))
    with LibNft("host") as nft:
        nft.run_sync(render_main_table(FirewallState(nets, frozenset())))
        try:
            yield
        finally:
            nft.run_sync(render_main_teardown())

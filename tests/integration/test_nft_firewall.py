"""The firewall against a real kernel, proved with real traffic (runs inside tests/sandbox).

The world (all namespaces private to the sandbox):

    outside 203.0.113.2 ── up0 203.0.113.1 ┐
            2001:db8::2    2001:db8::1  │ host (ip_forward on; route_localnet on the bridges)
                                        ├─ pxbr-a 10.1.0.1/24 fd01::1/64 ── a1 .2/::2, a2 .3/::3
                                        ├─ pxbr-b 10.2.0.1/24            ── b1 .2
                                        └─ pxbr-i 10.3.0.1/24 (internal) ── i1 .2

"outside" routes 10.0.0.0/8 and fd01::/64 through the host, so "blocked" means the firewall
blocked it, not that there was no route. Sockets are opened inside a namespace by a throw-away
thread that setns()s (a socket stays in the netns it was created in), so the test process never
changes namespace. The kernel's table is read back with the `nft` command, independently of
the code under test.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from plexus.dataplane.nft import (
    FirewallState,
    LibNft,
    NetRule,
    NftCli,
    NftFirewall,
    Publication,
    parse_table,
    render_pub_delta,
    render_table,
    render_teardown,
)
from plexus.errors import DataplaneError
from tests.harness.probes import DROPPED, REFUSED, Probe, tcp_probe, udp_probe

ip_address, ip_network = ipaddress.ip_address, ipaddress.ip_network
CLONE_NEWNET = 0x40000000
TIMEOUT = 1.0  # a blocked connection costs this much; an allowed one answers in microseconds
HOST4, HOST6, OUT4, OUT6 = "203.0.113.1", "2001:db8::1", "203.0.113.2", "2001:db8::2"
A1, A2, B1, I1 = "10.1.0.2", "10.1.0.3", "10.2.0.2", "10.3.0.2"
A1_6 = "fd01::2"
SERVED_PORT = 80  # every container answers here (tcp and udp)

NETS = (
    NetRule("pxbr-a", (ip_network("10.1.0.0/24"), ip_network("fd01::/64"))),
    NetRule("pxbr-b", (ip_network("10.2.0.0/24"),)),
    NetRule("pxbr-i", (ip_network("10.3.0.0/24"),), internal=True),
)


def pub(host_port: int, container: str, *, host_ip: str | None = None, proto: str = "tcp") -> (
    Publication
):
    host = None if host_ip is None else ip_address(host_ip)
    return Publication(proto, host, host_port, ip_address(container), SERVED_PORT)  # type: ignore[arg-type]


PUBS = frozenset({
    pub(8080, A1),                          # every host address, v4
    pub(8080, A1_6),                        # every host address, v6
    pub(8081, A2, host_ip="127.0.0.1"),     # localhost only
    pub(8082, B1),
    pub(5300, A2, proto="udp"),
})
STATE = FirewallState(NETS, PUBS)


# -- shell, namespaces, sockets --------------------------------------------------------------------


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv}: {proc.stderr.strip()}")
    return proc.stdout


def ip(ns: str, *args: str) -> None:
    sh("ip", "-n", ns, *args)


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` on a throw-away thread that first enters ``ns``."""
    box: dict[str, object] = {}

    def work() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def netns_socket(ns: str, addr: str, proto: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = in_netns(ns, lambda: socket.socket(family, kind))
    assert isinstance(s, socket.socket)
    return s


@dataclass
class Server:
    """Answers every TCP connection / UDP datagram with "<name> <client address>"."""

    ns: str
    addr: str
    port: int
    proto: str = "tcp"
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = netns_socket(self.ns, self.addr, self.proto)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.sock.family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        self.sock.bind((self.addr, self.port))
        if self.proto == "tcp":
            self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                if self.proto == "tcp":
                    conn, peer = self.sock.accept()
                    with conn:
                        conn.sendall(f"{self.ns} {peer[0]}".encode())
                else:
                    _, peer = self.sock.recvfrom(64)
                    self.sock.sendto(f"{self.ns} {peer[0]}".encode(), peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def talk(ns: str, addr: str, port: int, proto: str = "tcp") -> Probe:
    """What happened to one connection or datagram: answered (and what), dropped, refused."""
    probe = tcp_probe if proto == "tcp" else udp_probe
    return probe(ns, addr, port, TIMEOUT)


def answer(ns: str, addr: str, port: int, proto: str = "tcp") -> str:
    """The server's answer ("" if there was none), for checks that expect one."""
    return talk(ns, addr, port, proto).answer


def listing(ns: str = "host") -> list[dict]:  # type: ignore[type-arg]
    """The table as the `nft` command sees it (an oracle independent of plexus)."""
    out = sh("nft", "-j", "list", "table", "inet", "plexus", ns=ns, check=False)
    return [o for o in json.loads(out)["nftables"] if "metainfo" not in o] if out else []


def elements(name: str) -> list[object]:
    for o in listing():
        body = o.get("set") or o.get("map")
        if body and body["name"] == name:
            return list(body.get("elem", []))
    raise AssertionError(f"no set {name}")


def handles() -> set[tuple[str, int]]:
    """Handles of the table, chains and rules: stable unless the table is rebuilt."""
    out = set()
    for o in listing():
        for kind in ("table", "chain", "rule", "set", "map"):
            if kind in o:
                out.add((kind, o[kind]["handle"]))
    return out


# -- the world -----------------------------------------------------------------------------------


def veth_to_bridge(ns: str, bridge: str, addrs: list[str], gateways: list[str]) -> None:
    sh("ip", "netns", "add", ns)
    ip("host", "link", "add", f"v-{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("host", "link", "set", f"v-{ns}", "master", bridge, "up")
    # With br_netfilter, a hairpin to oneself is DNATed at bridge level and bridged back out of
    # the port it came in by; the bridge only does that on a port in hairpin mode (as Docker
    # sets it). The link layer must do the same; the firewall cannot.
    sh("bridge", "link", "set", "dev", f"v-{ns}", "hairpin", "on", ns="host")
    ip(ns, "link", "set", "lo", "up")
    for a in addrs:
        ip(ns, "addr", "add", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
    ip(ns, "link", "set", "eth0", "up")
    for gw in gateways:
        ip(ns, "-6" if ":" in gw else "-4", "route", "add", "default", "via", gw)


def build_world() -> None:
    for ns in ("host", "outside"):
        sh("ip", "netns", "add", ns)
        ip(ns, "link", "set", "lo", "up")
    for name, addrs in (("pxbr-a", ["10.1.0.1/24", "fd01::1/64"]), ("pxbr-b", ["10.2.0.1/24"]),
                        ("pxbr-i", ["10.3.0.1/24"])):
        ip("host", "link", "add", name, "type", "bridge")
        for a in addrs:
            ip("host", "addr", "add", a, "dev", name, *(["nodad"] if ":" in a else []))
        ip("host", "link", "set", name, "up")
        sh("sysctl", "-qw", f"net.ipv4.conf.{name}.route_localnet=1", ns="host")
    veth_to_bridge("a1", "pxbr-a", [f"{A1}/24", f"{A1_6}/64"], ["10.1.0.1", "fd01::1"])
    veth_to_bridge("a2", "pxbr-a", [f"{A2}/24", "fd01::3/64"], ["10.1.0.1", "fd01::1"])
    veth_to_bridge("b1", "pxbr-b", [f"{B1}/24"], ["10.2.0.1"])
    veth_to_bridge("i1", "pxbr-i", [f"{I1}/24"], ["10.3.0.1"])
    ip("host", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", "outside")
    ip("host", "addr", "add", f"{HOST4}/24", "dev", "up0")
    ip("host", "addr", "add", f"{HOST6}/64", "dev", "up0", "nodad")
    ip("host", "link", "set", "up0", "up")
    ip("outside", "addr", "add", f"{OUT4}/24", "dev", "eth0")
    ip("outside", "addr", "add", f"{OUT6}/64", "dev", "eth0", "nodad")
    ip("outside", "link", "set", "eth0", "up")
    ip("outside", "route", "add", "10.0.0.0/8", "via", HOST4)
    ip("outside", "-6", "route", "add", "fd01::/64", "via", HOST6)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns="host")


def set_br_netfilter(on: bool) -> None:
    for key in ("iptables", "ip6tables"):
        sh("sysctl", "-qw", f"net.bridge.bridge-nf-call-{key}={int(on)}", ns="host")


@pytest.fixture(scope="module")
def world() -> Iterator[list[Server]]:
    build_world()
    servers = [Server(ns, addr, SERVED_PORT, proto) for ns, addrs in
               (("a1", ["0.0.0.0", "::"]), ("a2", ["0.0.0.0", "::"]), ("b1", ["0.0.0.0"]),
                ("i1", ["0.0.0.0"])) for addr in addrs for proto in ("tcp", "udp")]
    servers += [Server("outside", "0.0.0.0", 9000), Server("outside", "::", 9000),
                Server("host", "10.3.0.1", 53, "udp"), Server("host", "10.3.0.1", 53),
                Server("host", "10.3.0.1", 2222)]
    yield servers
    for s in servers:
        s.close()
    for ns in ("a1", "a2", "b1", "i1", "host", "outside"):
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def nft(world: object) -> Iterator[LibNft]:
    with LibNft("host") as n:
        yield n


@pytest.fixture
def fw(nft: LibNft) -> NftFirewall:
    """The table holding STATE, and br_netfilter off unless the test asks for ``br_nf``: no
    test inherits what an earlier one left."""
    set_br_netfilter(False)
    nft.run_sync(render_table(STATE))
    return NftFirewall(nft)


@pytest.fixture(params=[False, True], ids=["br_netfilter-off", "br_netfilter-on"])
def br_nf(request: pytest.FixtureRequest, fw: NftFirewall) -> bool:
    set_br_netfilter(request.param)
    return bool(request.param)


# -- the table -------------------------------------------------------------------------------------


def test_the_kernel_holds_the_rendered_elements(fw: NftFirewall) -> None:
    assert sorted(elements("bridges")) == ["pxbr-a", "pxbr-b", "pxbr-i"]  # type: ignore[type-var]
    assert elements("internal") == ["pxbr-i"]
    assert [{"concat": ["127.0.0.1", "tcp", 8081]}, A2] in elements("pub4_addr")
    assert [{"concat": ["tcp", 8080]}, A1] in elements("pub4_any_addr")
    assert [{"concat": ["tcp", 8080]}, A1_6] in elements("pub6_any_addr")
    assert [{"concat": ["udp", 5300]}, 80] in elements("pub4_any_port")
    assert {"prefix": {"addr": "10.1.0.0", "len": 24}} in elements("masq4")
    assert {"prefix": {"addr": "10.3.0.0", "len": 24}} not in elements("masq4")  # internal


async def test_current_reads_back_the_state(fw: NftFirewall) -> None:
    assert await fw.current() == STATE.canonical()


# -- traffic ---------------------------------------------------------------------------------------


def test_same_network_containers_connect(fw: NftFirewall, br_nf: bool) -> None:
    assert answer("a1", A2, SERVED_PORT) == f"a2 {A1}"
    assert answer("a2", A1_6, SERVED_PORT) == "a1 fd01::3"


def test_networks_are_isolated_both_ways(fw: NftFirewall, br_nf: bool) -> None:
    assert talk("a1", B1, SERVED_PORT).outcome is DROPPED
    assert answer("host", B1, SERVED_PORT) == "b1 10.2.0.1"  # b1 serves (control)
    assert talk("b1", A1, SERVED_PORT).outcome is DROPPED
    assert answer("a2", A1, SERVED_PORT) == f"a1 {A2}"  # a1 serves (control)


def test_outside_reaches_a_published_port_with_its_own_source_address(
    fw: NftFirewall, br_nf: bool
) -> None:
    assert answer("outside", HOST4, 8080) == f"a1 {OUT4}"
    assert answer("outside", HOST6, 8080) == f"a1 {OUT6}"
    assert answer("outside", HOST4, 5300, "udp") == f"a2 {OUT4}"
    assert answer("outside", HOST4, 8082) == f"b1 {OUT4}"


def test_outside_cannot_reach_containers_directly(fw: NftFirewall) -> None:
    assert talk("outside", A1, SERVED_PORT).outcome is DROPPED
    assert talk("outside", A1_6, SERVED_PORT).outcome is DROPPED
    assert answer("outside", HOST4, 8080) == f"a1 {OUT4}"  # the same server, published
    assert talk("outside", A1, SERVED_PORT, "udp").outcome is DROPPED
    assert answer("a2", A1, SERVED_PORT, "udp") == f"a1 {A2}"  # a1's UDP server answers


def test_containers_reach_the_outside_masqueraded(fw: NftFirewall) -> None:
    assert answer("a1", OUT4, 9000) == f"outside {HOST4}"
    assert answer("b1", OUT4, 9000) == f"outside {HOST4}"
    assert answer("a1", OUT6, 9000) == f"outside {HOST6}"


def test_internal_network_is_cut_off(fw: NftFirewall, br_nf: bool) -> None:
    assert talk("outside", I1, SERVED_PORT).outcome is DROPPED
    assert talk("a1", I1, SERVED_PORT).outcome is DROPPED
    assert answer("host", I1, SERVED_PORT) == "i1 10.3.0.1"  # i1 serves (control)
    assert talk("i1", A1, SERVED_PORT).outcome is DROPPED
    assert answer("a2", A1, SERVED_PORT) == f"a1 {A2}"  # a1 serves (control)
    assert talk("i1", OUT4, 9000).outcome is DROPPED
    assert answer("a1", OUT4, 9000) == f"outside {HOST4}"  # the outside serves (control)
    assert talk("i1", "10.3.0.1", 2222).outcome is DROPPED  # the host, other than DNS
    assert answer("host", "10.3.0.1", 2222) == "host 10.3.0.1"  # it serves (control)
    assert answer("i1", "10.3.0.1", 53) == f"host {I1}"  # and i1 reaches it for DNS


def test_internal_network_may_ask_the_host_for_dns(fw: NftFirewall) -> None:
    assert answer("i1", "10.3.0.1", 53, "udp") == f"host {I1}"
    assert answer("i1", "10.3.0.1", 53) == f"host {I1}"


def test_host_reaches_published_ports_on_localhost(fw: NftFirewall) -> None:
    assert answer("host", "127.0.0.1", 8080) == "a1 10.1.0.1"
    assert answer("host", "127.0.0.1", 8081) == "a2 10.1.0.1"
    assert answer("host", HOST4, 8080) == f"a1 {HOST4}"  # its own address: no masquerade needed


def test_a_localhost_publication_is_not_published_elsewhere(fw: NftFirewall) -> None:
    # Not published on HOST4, so the host's own stack refuses (no DNAT to a2, which serves).
    assert talk("outside", HOST4, 8081).outcome is REFUSED
    assert answer("host", "127.0.0.1", 8081) == "a2 10.1.0.1"


def test_hairpin_to_itself_and_to_a_neighbour(fw: NftFirewall, br_nf: bool) -> None:
    assert answer("a1", "10.1.0.1", 8080) == "a1 10.1.0.1"
    assert answer("a2", HOST4, 8080) == "a1 10.1.0.1"
    assert answer("a2", "fd01::1", 8080) == "a1 fd01::1"
    assert answer("b1", HOST4, 8080) == f"a1 {B1}"  # another network, through a published port


def test_a_localhost_publication_is_not_reachable_by_routing_127_to_the_host(
    fw: NftFirewall,
) -> None:
    # The attacker side must be talked into sending to 127.0.0.1: no local 127/8 of its own,
    # a route via the host, and route_localnet on its link so it accepts the answer. The host
    # has route_localnet only on its bridges; the DNAT in prerouting is what exposes the port.
    ip("outside", "addr", "del", "127.0.0.1/8", "dev", "lo")
    sh("sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1", ns="outside")
    ip("outside", "route", "add", "127.0.0.0/8", "via", HOST4, "dev", "eth0")
    try:
        assert talk("outside", "127.0.0.1", 8081).outcome is DROPPED
        # Proof the probe is real: without the raw-priority guard the CVE is there.
        handle = _rule_handle("prerouting_filter")
        sh("nft", "delete", "rule", "inet", "plexus", "prerouting_filter", "handle", str(handle),
           ns="host")
        assert answer("outside", "127.0.0.1", 8081) == f"a2 {OUT4}"
    finally:
        ip("outside", "route", "del", "127.0.0.0/8")
        ip("outside", "addr", "add", "127.0.0.1/8", "dev", "lo")


def _rule_handle(chain: str) -> int:
    return next(int(o["rule"]["handle"]) for o in listing()
                if "rule" in o and o["rule"]["chain"] == chain)


# -- changes -------------------------------------------------------------------------------------


async def test_an_element_delta_changes_traffic_without_rebuilding_the_table(
    fw: NftFirewall,
) -> None:
    before = handles()
    new = FirewallState(NETS, PUBS | {pub(8090, A2)})
    assert talk("outside", HOST4, 8090).outcome is REFUSED  # not published: the host's RST
    await fw.update(STATE, new)
    assert answer("outside", HOST4, 8090) == f"a2 {OUT4}"
    await fw.update(new, STATE)
    assert talk("outside", HOST4, 8090).outcome is REFUSED
    assert handles() == before


async def test_a_publication_can_move_to_another_container_in_one_delta(fw: NftFirewall) -> None:
    moved = FirewallState(NETS, (PUBS - {pub(8082, B1)}) | {pub(8082, A2)})
    before = handles()
    await fw.update(STATE, moved)
    assert handles() == before
    assert answer("outside", HOST4, 8082) == f"a2 {OUT4}"
    assert await fw.current() == moved.canonical()


async def test_a_network_delta_applies_as_elements(fw: NftFirewall) -> None:
    isolated = FirewallState(
        (NETS[0], NetRule("pxbr-b", NETS[1].subnets, internal=True), NETS[2]), PUBS
    )
    before = handles()
    await fw.update(STATE, isolated)
    assert handles() == before
    assert sorted(elements("internal")) == ["pxbr-b", "pxbr-i"]  # type: ignore[type-var]
    assert talk("b1", OUT4, 9000).outcome is DROPPED
    assert answer("a1", OUT4, 9000) == f"outside {HOST4}"  # the outside serves (control)
    await fw.update(isolated, STATE)
    assert answer("b1", OUT4, 9000) == f"outside {HOST4}"


def test_a_failing_batch_applies_nothing(fw: NftFirewall, nft: LibNft) -> None:
    good = render_pub_delta([pub(8091, A2)], [])
    bad = [{"add": {"element": {"family": "inet", "table": "plexus", "name": "no_such_set",
                                "elem": ["x"]}}}]
    with pytest.raises(DataplaneError):
        nft.run_sync([*good, *bad])
    assert not any(e[0] == {"concat": ["tcp", 8091]} for e in elements("pub4_any_addr"))  # type: ignore[index]
    assert talk("outside", HOST4, 8091).outcome is REFUSED  # by the host: no DNAT to a2 ...
    assert answer("a1", A2, SERVED_PORT) == f"a2 {A1}"  # ... which serves (control)


async def test_update_rebuilds_a_table_someone_deleted(fw: NftFirewall) -> None:
    sh("nft", "delete", "table", "inet", "plexus", ns="host")
    assert await fw.current() is None
    new = FirewallState(NETS, PUBS | {pub(8092, A1)})
    await fw.update(STATE, new)
    assert await fw.current() == new.canonical()
    assert answer("outside", HOST4, 8092) == f"a1 {OUT4}"


async def test_current_rejects_a_table_of_another_shape(fw: NftFirewall) -> None:
    sh("nft", "flush", "chain", "inet", "plexus", "forward", ns="host")
    assert await fw.current() is None


async def test_teardown_removes_the_table_and_tolerates_its_absence(fw: NftFirewall) -> None:
    await fw.teardown()
    assert listing() == []
    await fw.teardown()
    assert talk("outside", HOST4, 8080).outcome is REFUSED  # no DNAT left: the host's RST
    assert answer("a2", A1, SERVED_PORT) == f"a1 {A2}"  # though a1 serves (control)
    assert answer("a1", B1, SERVED_PORT) == f"b1 {A1}"  # and no filtering either


async def test_sync_replaces_everything(fw: NftFirewall) -> None:
    sh("nft", "add", "element", "inet", "plexus", "bridges", "{ pxbr-zz }", ns="host")
    await fw.sync(STATE)
    assert "pxbr-zz" not in elements("bridges")
    assert await fw.current() == STATE.canonical()


def test_the_nft_command_fallback_drives_the_same_table(nft: LibNft) -> None:
    cli = NftCli("host")
    cli.run_sync(render_table(STATE))
    assert parse_table(cli.list_table_sync()) == STATE.canonical()
    cli.run_sync(render_teardown())
    assert cli.list_table_sync() == {"nftables": []}


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.2f} ms"


async def _timed_updates(
    fw: NftFirewall, state: FirewallState, grown: list[FirewallState]
) -> list[float]:
    """Firewall.update from ``state`` to each of ``grown`` and back: the reconciler's path."""
    times = []
    for new in grown:
        t0 = time.perf_counter()
        await fw.update(state, new)
        times.append(time.perf_counter() - t0)
        await fw.update(new, state)
    return times


def test_render_and_apply_timings(nft: LibNft, capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion of speed: prints the figures the design is judged by."""
    fw = NftFirewall(nft)
    for n in (1_000, 10_000):
        state = FirewallState(NETS, frozenset(pub(10_000 + i, A1) for i in range(n))).canonical()
        renders, applies = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            cmds = render_table(state)
            t1 = time.perf_counter()
            nft.run_sync(cmds)
            renders.append(t1 - t0)
            applies.append(time.perf_counter() - t1)
        assert len(elements("pub4_any_addr")) == n
        deltas = []
        for i in range(20):
            t3 = time.perf_counter()
            nft.run_sync(render_pub_delta([pub(9000 + i, A2)], []))
            deltas.append(time.perf_counter() - t3)
        # As the reconciler gets them from firewall_state(): canonical, checked once.
        grown = [FirewallState(NETS, state.pubs | {pub(8000 + i, A2)}).canonical()
                 for i in range(20)]
        updates = asyncio.run(_timed_updates(fw, state, grown))
        assert len(elements("pub4_any_addr")) == n + 20
        with capsys.disabled():
            print(f"\n{n} publications: render_table {_ms(statistics.median(renders))}, "
                  f"apply {_ms(statistics.median(applies))}; "
                  f"one-element delta (render+apply) median {_ms(statistics.median(deltas))}; "
                  f"Firewall.update(old, new) on full states median "
                  f"{_ms(statistics.median(updates))}")

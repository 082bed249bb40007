"""Two hosts on a three-member etcd, one overlay network, and etcd failing under them.

What a user must see, read independently of plexus (etcd with etcdctl, the kernel with ``ip -j``,
real traffic and glibc's resolver in the containers):

- one member of three down (the leader): the cluster works as before, and its return changes
  nothing;
- every member down: a new container or CNI ADD fails within seconds with one clear line (CLI),
  HTTP 503 (API) or CNI code 11, while established connections and names across hosts keep
  working; when etcd returns the agents resync without a restart and attach again;
- etcd restarted while a hundred CNI ADDs run on both hosts: each ADD either succeeds or fails
  with code 11, no address is given twice, every claim belongs to a live endpoint, the failed
  ones leave nothing in the kernel, and retrying them succeeds.

The tests share one cluster and run in file order; each leaves every member running.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plexus.cni.install import install
from plexus.model import keys
from tests.harness.cluster import cluster
from tests.harness.cni import CniResult, exec_plugin
from tests.harness.etcd import EtcdCluster, Member
from tests.harness.probes import ANSWERED, answered, connect, tcp_probe
from tests.harness.world import ECHO, Agent, World, nsexec, sh

from .helpers import global_addresses, wait_until

SUBNET = "10.81.0.0/22"
ATTACHMENTS = 100  # CNI ADDs during the etcd restart, half on each host
PARALLEL = 6  # ADDs at once per host


@dataclass
class Pair:
    world: World
    etcd: EtcdCluster
    agents: list[Agent]
    cni_dir: Path

    def at(self, host: str) -> Agent:
        return next(a for a in self.agents if a.host == host)

    def all_members_up(self) -> None:
        for m in self.etcd.members:
            m.start()
        self.etcd.wait_healthy(members=self.etcd.members)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with tempfile.TemporaryDirectory(prefix="plexus-outage-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2"], members=3) as (etcd, agents):
                cni_dir = Path(tmp) / "cni-bin"
                install([str(cni_dir)], compiled=True)
                agents[0].cli("network", "create", "ov", "--driver", "overlay", "--subnet",
                              SUBNET, "--block-size", "26")
                assert wait_until(lambda: all(_has_network(a, "ov") for a in agents), 20)
                agents[0].run_echo("c1", "ov")
                agents[1].run_echo("c2", "ov")
                yield Pair(w, etcd, agents, cni_dir)
        finally:
            w.close()


def _has_network(agent: Agent, name: str) -> bool:
    return name in {n["name"] for n in agent.json("network", "ls")}


# -- what a user observes -----------------------------------------------------------------------


def _resolve(agent: Agent, container: str, name: str) -> str:
    """glibc's resolver in the container (its resolv.conf names its own host's DNS server)."""
    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False).stdout
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def _leader(etcd: EtcdCluster) -> Member:
    status = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json"))
    leader = status[0]["Status"]["leader"]
    [index] = [i for i, s in enumerate(status) if s["Status"]["header"]["member_id"] == leader]
    return etcd.members[index]


def _etcd_prefix(etcd: EtcdCluster, prefix: str,
                 members: list[Member] | None = None) -> dict[str, str]:
    """Keys and values under ``prefix``, read with etcdctl; from ``members`` alone (their own
    copy: a serializable read) if given."""
    local = ["--consistency=s"] if members else []
    out = etcd.etcdctl("get", "--prefix", *local, prefix, members=members).splitlines()
    return dict(zip(out[::2], out[1::2], strict=True))


def _claims(etcd: EtcdCluster) -> dict[str, str]:
    """address -> the endpoint key holding it, as etcd has the overlay's claims."""
    return {k.rsplit("/", 1)[1]: v
            for k, v in _etcd_prefix(etcd, keys.ipam_prefix(SUBNET)).items()}


def _endpoints(etcd: EtcdCluster) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in _etcd_prefix(etcd, keys.ENDPOINTS).items()}


def _host_veths(host: str) -> set[str]:
    """plexus's host ends of container veths in a host's namespace (``ip -j link``)."""
    found = json.loads(nsexec(host, "ip", "-j", "-d", "link", "show", "type", "veth").stdout)
    return {link["ifname"] for link in found if link["ifname"].startswith("px")}


def _hosts_alive(agent: Agent) -> dict[str, bool]:
    return {h["name"]: h["alive"] for h in agent.json("host", "ls")}


# -- one member of three down ------------------------------------------------------------------


def test_a_cluster_with_its_leader_down_works_and_its_return_changes_nothing(
    pair: Pair,
) -> None:
    a1, a2 = pair.agents
    down = _leader(pair.etcd)
    down.stop()
    try:
        a1.cli("network", "create", "ov2", "--driver", "overlay", "--subnet", "10.82.0.0/24",
               "--block-size", "28")
        assert wait_until(lambda: _has_network(a2, "ov2"), 20)
        a1.run_echo("m1", "ov2")
        a2.run_echo("m2", "ov2")
        m1, m2 = a1.address("m1", "ov2"), a2.address("m2", "ov2")
        got = answered(lambda: tcp_probe(a1.netns("m1"), m2, 80))
        assert (got.outcome, got.answer) == (ANSWERED, f"m2 {m1}"), got
        got = answered(lambda: tcp_probe(a2.netns("m2"), m1, 80))
        assert (got.outcome, got.answer) == (ANSWERED, f"m1 {m2}"), got
        assert _resolve(a1, "m1", "m2") == m2 and _resolve(a2, "m2", "m1") == m1
        assert _hosts_alive(a1) == _hosts_alive(a2) == {"host1": True, "host2": True}
        before = (_etcd_prefix(pair.etcd, keys.ENDPOINTS),
                  _etcd_prefix(pair.etcd, keys.IPAM), _host_veths("host1"),
                  _host_veths("host2"))
    finally:
        pair.etcd.restart(down)
    # The member that returns caught up: it alone answers what the others held.
    assert wait_until(lambda: _etcd_prefix(pair.etcd, keys.IPAM, [down]) == before[1], 10)
    after = (_etcd_prefix(pair.etcd, keys.ENDPOINTS), _etcd_prefix(pair.etcd, keys.IPAM),
             _host_veths("host1"), _host_veths("host2"))
    assert after == before
    assert tcp_probe(a2.netns("m2"), m1, 80).answer == f"m1 {m2}"
    assert _hosts_alive(a2) == {"host1": True, "host2": True}
    for agent, name in ((a1, "m1"), (a2, "m2")):
        agent.cli("rm", "-f", name)
    a1.cli("network", "rm", "ov2")


# -- every member down -------------------------------------------------------------------------


def _cni(pair: Pair, host: str, command: str, container_id: str, netns: str) -> CniResult:
    """The compiled shim, executed as a runtime on ``host`` would."""
    conf = {"cniVersion": "1.1.0", "name": "ov", "type": "plexus",
            "socket": str(pair.at(host).socket)}
    return exec_plugin(pair.cni_dir / "plexus", command, conf, container_id=container_id,
                       netns=netns, path=f"{pair.cni_dir}:/usr/lib/cni",
                       in_netns=f"/run/netns/{host}", timeout=60)


def _api_run(agent: Agent, name: str) -> tuple[int, dict[str, Any]]:
    """POST /v1/containers over the agent's socket with curl: (HTTP status, body)."""
    body = json.dumps({"name": name, "networks": ["ov"], "command": [sys.executable, ECHO]})
    out = sh("curl", "-s", "-m", "20", "--unix-socket", str(agent.socket), "-X", "POST",
             "-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}",
             "http://plexus/v1/containers", timeout=30).stdout
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text)


def _plexus_namespaces() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines()
            if line.startswith("plexus-")}


def _cut(pair: Pair, how: str) -> None:
    """etcd unreachable: every member stopped (connections refused), or the path to it cut
    (its port of the hosts' switch down: packets vanish, connections hang)."""
    if how == "stopped":
        for m in pair.etcd.members:
            m.stop()
    else:
        nsexec("outside", "ip", "link", "set", "to-etcd", "down")


def _mend(pair: Pair) -> None:
    nsexec("outside", "ip", "link", "set", "to-etcd", "up")
    pair.all_members_up()


@pytest.mark.parametrize("how", ["stopped", "cut"])
def test_with_etcd_unreachable_new_work_fails_fast_and_running_containers_keep_working(
    pair: Pair, how: str,
) -> None:
    a1, a2 = pair.agents
    c1, c2 = a1.address("c1"), a2.address("c2")
    conn = connect(a1.netns("c1"), c2)
    pids = [a.proc.pid for a in pair.agents if a.proc is not None]
    veths, spaces = (_host_veths("host1"), _host_veths("host2")), _plexus_namespaces()
    sh("ip", "netns", "add", "pod-down")
    _cut(pair, how)
    try:
        started = time.monotonic()
        r = a1.cli("run", "-d", "--name", "x1", "--network", "ov", "--", sys.executable, ECHO,
                   "x1", "80", check=False, timeout=15)
        took = time.monotonic() - started
        assert r.returncode != 0 and r.stdout == ""
        [line] = r.stderr.strip().splitlines()
        assert line.startswith("plexus: ") and "etcd" in line, line
        print(f"plexus run with etcd {how} failed in {took:.1f}s: {line}")
        status, body = _api_run(a2, "x2")
        assert (status, body["kind"]) == (503, "store-unavailable"), body
        added = _cni(pair, "host2", "ADD", "pod-down", "/run/netns/pod-down")
        assert added.error_code == 11 and "etcd" in added.out["msg"], added.out
        # What runs keeps running: an established connection, names of the other host.
        conn.sendall(b"still there?\n")
        assert conn.recv(100).decode().startswith(f"c2 {c1}")
        assert _resolve(a1, "c1", "c2") == c2 and _resolve(a2, "c2", "c1") == c1
        # Nothing half-made by the failed requests.
        assert (_host_veths("host1"), _host_veths("host2")) == veths
        assert _plexus_namespaces() == spaces
        assert [a["ifname"] for a in json.loads(
            nsexec("pod-down", "ip", "-j", "link").stdout)] == ["lo"]
    finally:
        _mend(pair)
    # The same agents (no restart) resync and work again.
    assert [a.proc.pid for a in pair.agents if a.proc is not None] == pids
    a1.run_echo("x1", "ov")
    x1 = a1.address("x1")
    got = answered(lambda: tcp_probe(a2.netns("c2"), x1, 80))
    assert (got.outcome, got.answer) == (ANSWERED, f"x1 {c2}"), got
    assert wait_until(lambda: _resolve(a2, "c2", "x1") == x1, 10)
    added = _cni(pair, "host2", "ADD", "pod-down", "/run/netns/pod-down")
    assert added.ok, added.out
    assert global_addresses("pod-down") == [added.out["ips"][0]["address"]]
    assert wait_until(lambda: _hosts_alive(a1) == _hosts_alive(a2)
                      == {"host1": True, "host2": True}, 15)
    conn.sendall(b"and now?\n")
    assert conn.recv(100).decode().startswith(f"c2 {c1}")
    conn.close()
    assert _cni(pair, "host2", "DEL", "pod-down", "/run/netns/pod-down").ok
    a1.cli("rm", "-f", "x1")
    sh("ip", "netns", "del", "pod-down")
    # Nothing is left of the runs that failed: no row, no endpoint, no claim.
    assert wait_until(lambda: not _etcd_prefix(pair.etcd, keys.containers("host2")).keys()
                      - {keys.container("host2", "c2")}, 10)
    assert {ep["name"] for ep in _endpoints(pair.etcd).values()} == {"c1", "c2"}
    assert set(_claims(pair.etcd)) == {c1, c2}


# -- etcd restarted under a hundred attachments ------------------------------------------------


@dataclass
class Attempt:
    host: str
    container_id: str
    netns: str
    result: CniResult | None = None
    seconds: float = 0.0

    @property
    def address(self) -> str:
        assert self.result is not None and self.result.ok
        return str(self.result.out["ips"][0]["address"])


def _add(pair: Pair, attempt: Attempt) -> Attempt:
    started = time.monotonic()
    attempt.result = _cni(pair, attempt.host, "ADD", attempt.container_id, attempt.netns)
    attempt.seconds = time.monotonic() - started
    return attempt


def _add_all(pair: Pair, attempts: list[Attempt], during: Callable[[], None]) -> None:
    """Every ADD, PARALLEL at once on each host; ``during`` runs meanwhile."""
    with ThreadPoolExecutor(2 * PARALLEL) as pool:
        futures = [pool.submit(_add, pair, a) for a in attempts]
        during()
        for f in futures:
            f.result(timeout=90)


Restart = Callable[[], None]


def _restart_etcd_once_busy(pair: Pair, attempts: list[Attempt], busy: int) -> Restart:
    """Every member stopped once ``busy`` ADDs have answered, and started 3 s later."""

    def during() -> None:
        assert wait_until(lambda: sum(a.result is not None for a in attempts) >= busy, 60)
        for m in pair.etcd.members:
            m.stop()
        time.sleep(3.0)  # ADDs that arrive now find etcd down
        pair.all_members_up()

    return during


def _check_cluster_state(pair: Pair, attempts: list[Attempt]) -> None:
    """etcd's claims, the endpoints and the kernel agree; no address twice."""
    ok = [a for a in attempts if a.result is not None and a.result.ok]
    endpoints = _endpoints(pair.etcd)
    claims = _claims(pair.etcd)
    # Every claim belongs to a live endpoint that holds that address, and the other way round.
    held = {str(ipaddress.ip_interface(addr).ip): key
            for key, ep in endpoints.items() for addr in ep["addresses"]
            if ipaddress.ip_interface(addr).ip in ipaddress.ip_network(SUBNET)}
    assert claims == held
    assert all(ep["state"] == "ready" for ep in endpoints.values()), endpoints
    mine = {keys.endpoint(a.host, a.container_id, "eth0") for a in ok}
    cni_eps = {k for k, ep in endpoints.items() if ep["owner"] == "cni"}
    assert cni_eps == mine
    # The kernel: each namespace holds the address its ADD answered, none twice.
    with ThreadPoolExecutor(8) as pool:
        kernel = list(pool.map(global_addresses, [a.netns for a in attempts]))
    for a, found in zip(attempts, kernel, strict=True):
        assert found == ([a.address] if a in ok else []), (a.container_id, found)
    everyone = [a.address for a in ok] + [pair.at("host1").address("c1") + "/22",
                                          pair.at("host2").address("c2") + "/22"]
    assert len(set(everyone)) == len(everyone)
    # Nothing left on the hosts by the failed ones: one host veth per local endpoint.
    for agent in pair.agents:
        local = [k for k, ep in endpoints.items() if ep["node"] == agent.host]
        assert len(_host_veths(agent.host)) == len(local), agent.host


def test_etcd_restarted_under_a_hundred_attachments_gives_no_address_twice(
    pair: Pair,
) -> None:
    attempts = []
    for i in range(ATTACHMENTS):
        host = f"host{i % 2 + 1}"
        attempts.append(Attempt(host, f"load{i}", f"/run/netns/{pair.world.add_ns(f'load{i}')}"))
    _add_all(pair, attempts, _restart_etcd_once_busy(pair, attempts, ATTACHMENTS // 5))
    failed = [a for a in attempts if a.result is not None and not a.result.ok]
    print(f"{len(failed)} of {ATTACHMENTS} ADDs failed during the restart; the slowest took "
          f"{max(a.seconds for a in attempts):.1f}s")
    assert all(a.result is not None for a in attempts)
    for a in failed:
        assert a.result is not None and a.result.error_code == 11, (a.container_id, a.result.out)
    assert failed, "the restart did not catch any ADD: the test proved nothing"
    assert wait_until(lambda: all(ep["state"] == "ready"
                                  for ep in _endpoints(pair.etcd).values()), 20)
    _check_cluster_state(pair, attempts)
    # Retried once etcd is back, as a runtime does: every one succeeds.
    with ThreadPoolExecutor(2 * PARALLEL) as pool:
        list(pool.map(lambda a: _add(pair, a), failed))
    assert [a.container_id for a in failed if not (a.result and a.result.ok)] == []
    _check_cluster_state(pair, attempts)
    with ThreadPoolExecutor(2 * PARALLEL) as pool:
        dels = list(pool.map(lambda a: _cni(pair, a.host, "DEL", a.container_id, a.netns),
                             attempts))
    assert all(r.ok for r in dels)
    assert _claims(pair.etcd).keys() == {pair.at("host1").address("c1"),
                                         pair.at("host2").address("c2")}

"""Network policy enforced in the kernel, probed with real traffic: the shared truth tables
(tests/policy_cases.py) on one host, 9 containers in namespaces x, y, z serving 80 and 81 on TCP
and UDP, every pair probed in parallel after each `plexus policy apply`; plus label changes,
audit counters and explain held against what the traffic did."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.probes import ANSWERED, DROPPED, Probe, connect, tcp_probe, udp_probe
from tests.harness.world import Agent, World, sh
from tests.policy_cases import ALL, CASES, NAMESPACES, Expect

SUBNET = "10.77.0.0/24"
TIMEOUT = 0.8


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, dict[str, str]]]:
    world = World(tmp_path_factory.mktemp("policy") / "world")
    try:
        agent = world.add_host("host1")
        agent.cli("network", "create", "net", "--subnet", SUBNET)
        for ns in NAMESPACES:
            agent.cli("namespace", "create", ns, "--label", f"ns={ns}")
        exposes = [f"--expose=serve-{p}-{proto}={p}/{proto}" for p in (80, 81)
                   for proto in ("tcp", "udp")]
        for name in ALL:
            ns, pod = name.split("/")
            agent.run_echo(f"{ns}-{pod}", "net", "--namespace", ns, "--label", f"pod={pod}",
                           *exposes, ports=(80, 81))
        for name in ALL:
            agent.wait_listening(name.replace("/", "-"), 81)
        addresses = {n: agent.address(n.replace("/", "-")) for n in ALL}
        yield agent, addresses
    finally:
        world.close()


def _probe(agent: Agent, addresses: dict[str, str], src: str, dst: str, port: int,
           proto: str) -> Probe:
    ns = agent.netns(src.replace("/", "-")) if "/" in src else src
    probe = tcp_probe if proto == "tcp" else udp_probe
    return probe(ns, addresses[dst], port, TIMEOUT)


def matrix(agent: Agent, addresses: dict[str, str], expect: Expect) -> list[str]:
    """Every pair, port and protocol, probed in parallel: what differs from ``expect``."""
    netns = {n: agent.netns(n.replace("/", "-")) for n in ALL}
    jobs = [(s, d, p, pr) for s in ALL for d in ALL if s != d for p in (80, 81)
            for pr in ("tcp", "udp")]

    def one(job: tuple[str, str, int, str]) -> str:
        s, d, p, pr = job
        probe = (tcp_probe if pr == "tcp" else udp_probe)(netns[s], addresses[d], p, TIMEOUT)
        if probe.outcome not in (ANSWERED, DROPPED):
            return f"{s} -> {d} {p}/{pr}: {probe}"  # refused, unreachable: a broken test world
        want = expect(s, d, p, pr)
        if (probe.outcome is ANSWERED) != want:
            return f"{s} -> {d} {p}/{pr}: {probe}, expected {'allowed' if want else 'dropped'}"
        return ""

    with ThreadPoolExecutor(max_workers=48) as pool:
        return [w for w in pool.map(one, jobs) if w]


def _apply(agent: Agent, text: str, tmp: Path) -> None:
    path = tmp / "policy.yaml"
    path.write_text(text)
    agent.cli("policy", "apply", "-f", str(path))


def _placeholders(addresses: dict[str, str]) -> dict[str, str]:
    pods = {n.replace("/", ""): a for n, a in addresses.items()}
    return {**pods, "subnet": SUBNET, "outside": "203.0.113.0/24"}


@pytest.mark.timeout(600)
def test_the_shared_truth_tables_hold_for_real_traffic(
        lab: tuple[Agent, dict[str, str]], tmp_path: Path) -> None:
    agent, addresses = lab
    assert matrix(agent, addresses, lambda *_: True) == []  # the world works, nothing dropped
    wrong: dict[str, list[str]] = {}
    for case in CASES:
        _apply(agent, case.text(_placeholders(addresses)), tmp_path)
        found = matrix(agent, addresses, case.expect)
        if found:
            wrong[case.name] = found[:5]
        agent.cli("policy", "delete", "--all")
    assert not wrong, wrong
    # No policy left: no table left either (containers pay nothing without policies).
    assert "plexus_policy" not in sh("ip", "netns", "exec", "host1", "nft", "list",
                                     "tables").stdout


def test_a_label_change_moves_a_container_in_and_out_of_a_policy_at_once(
        lab: tuple[Agent, dict[str, str]], tmp_path: Path) -> None:
    agent, addresses = lab
    case = next(c for c in CASES if c.name == "pod_selector")  # x/a only from pod=b
    _apply(agent, case.text(_placeholders(addresses)), tmp_path)
    try:
        ns_c = agent.netns("x-c")
        assert tcp_probe(ns_c, addresses["x/a"], 80, TIMEOUT).outcome is DROPPED
        agent.cli("label", "x-c", "pod=b")
        assert tcp_probe(ns_c, addresses["x/a"], 80, TIMEOUT).outcome is ANSWERED
        agent.cli("label", "x-a", "pod-")  # x/a leaves the policy's subject
        assert tcp_probe(agent.netns("y-c"), addresses["x/a"], 80, TIMEOUT).outcome is ANSWERED
    finally:
        agent.cli("label", "x-c", "pod=c")
        agent.cli("label", "x-a", "pod=a")
        agent.cli("policy", "delete", "--all")


def test_counters_audit_and_explain_agree_with_the_traffic(
        lab: tuple[Agent, dict[str, str]], tmp_path: Path) -> None:
    agent, addresses = lab
    _apply(agent, textwrap.dedent("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: only-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: watch-y
          namespace: y
          annotations: {plexus.io/audit: "true"}
        spec: {podSelector: {}}
        """), tmp_path)
    try:
        for src, dst, port in (("x/b", "x/a", 80), ("x/c", "x/a", 80), ("x/b", "x/a", 81),
                               ("x/a", "y/b", 80), ("z/a", "y/c", 81)):
            probe = _probe(agent, addresses, src, dst, port, "tcp")
            explained = agent.json("policy", "explain", "--from", src.replace("/", "-"),
                                   "--to", dst.replace("/", "-"), "--port", f"{port}/tcp")
            assert (probe.outcome is ANSWERED) == (explained["verdict"] == "allowed"), \
                (src, dst, port, probe, explained)
        counts = {p["ref"]: p["packets"] for p in agent.json("policy", "ls")}
        assert counts["x/only-b"]["allow"] >= 1 and counts["x/only-b"]["deny"] >= 2
        assert counts["y/watch-y"]["audit"] >= 2 and counts["y/watch-y"]["deny"] == 0
    finally:
        agent.cli("policy", "delete", "--all")


def _still_talks(conn: socket.socket) -> bool:
    try:
        conn.sendall(b"still there?\n")
        return bool(conn.recv(100))
    except OSError:
        return False


def test_a_new_policy_cuts_the_connections_it_no_longer_allows_and_keeps_the_others(
        lab: tuple[Agent, dict[str, str]], tmp_path: Path) -> None:
    agent, addresses = lab
    case = next(c for c in CASES if c.name == "pod_selector")  # x/a only from pod=b
    kept = connect(agent.netns("x-b"), addresses["x/a"])
    cut = connect(agent.netns("x-c"), addresses["x/a"])
    try:
        assert _still_talks(kept) and _still_talks(cut)  # both established
        _apply(agent, case.text(_placeholders(addresses)), tmp_path)
        assert _still_talks(kept), "an allowed established connection was cut"
        assert not _still_talks(cut), "a connection the policy no longer allows goes on"
    finally:
        kept.close()
        cut.close()
        agent.cli("policy", "delete", "--all")


def test_a_namespace_label_change_moves_its_pods_in_and_out_of_selectors_at_once(
        lab: tuple[Agent, dict[str, str]], tmp_path: Path) -> None:
    """x/a admits every namespace but those labelled ns=y: relabelling y lets its pods in,
    relabelling z to ns=y keeps z's out; the matrix is probed again after each step."""
    agent, addresses = lab
    case = next(c for c in CASES if c.name == "namespace_not_in")
    _apply(agent, case.text(_placeholders(addresses)), tmp_path)
    try:
        assert matrix(agent, addresses, case.expect) == []
        agent.cli("namespace", "label", "y", "ns=moved")
        agent.cli("namespace", "label", "z", "ns=y")
        assert matrix(agent, addresses,
                      lambda s, d, p, pr: d != "x/a" or not s.startswith("z/")) == []
    finally:
        agent.cli("namespace", "label", "y", "ns=y")
        agent.cli("namespace", "label", "z", "ns=z")
        agent.cli("policy", "delete", "--all")


def test_policy_judges_a_published_port_after_dnat_and_lets_the_host_in(
        lab: tuple[Agent, dict[str, str]], tmp_path: Path) -> None:
    """A published port is DNATed before the policy looks: the outside's connection to the
    host's port is judged as one to the container's port 80, from the client's own address;
    the host's own connections to its containers stay allowed (health checks)."""
    agent, _ = lab
    agent.run_echo("x-pub", "net", "--namespace", "x", "--label", "pod=pub", "-p", "8080:80")
    agent.wait_listening("x-pub", 80)
    pub = agent.address("x-pub")
    host = "203.0.113.1"  # host1 on the outside's segment
    only_b = """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: pub, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: pub}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}%s], ports: [{port: 80}]}]
        """
    try:
        assert tcp_probe("outside", host, 8080, TIMEOUT).outcome is ANSWERED  # no policy yet
        _apply(agent, textwrap.dedent(only_b % ""), tmp_path)
        assert tcp_probe("outside", host, 8080, TIMEOUT).outcome is DROPPED
        assert tcp_probe(agent.netns("x-b"), pub, 80, TIMEOUT).outcome is ANSWERED
        assert tcp_probe(agent.netns("x-c"), pub, 80, TIMEOUT).outcome is DROPPED
        assert tcp_probe("host1", pub, 80, TIMEOUT).outcome is ANSWERED  # the host itself
        _apply(agent, textwrap.dedent(only_b % ", {ipBlock: {cidr: 203.0.113.100/32}}"),
               tmp_path)
        assert tcp_probe("outside", host, 8080, TIMEOUT).outcome is ANSWERED
        assert tcp_probe(agent.netns("x-c"), pub, 80, TIMEOUT).outcome is DROPPED
    finally:
        agent.cli("policy", "delete", "--all")
        agent.cli("rm", "-f", "x-pub")

"""The flow log against real traffic: a connection between containers becomes a start record
and, when conntrack forgets it, an end record with its bytes; a packet a policy drops (or would
drop, audit) becomes a record naming the policy; filters and the JSON-lines export agree; and
the kernel counts the events a socket too slow to read loses (what the lost-records metric
reads)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.dataplane.netns import run_in_netns
from plexus.observe import nfwire as w
from plexus.observe.flowmetrics import netlink_drops
from tests.harness.probes import ANSWERED, DROPPED, netns_path, tcp_probe
from tests.harness.world import Agent, World, nsexec

pytestmark = pytest.mark.privileged
POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: watch-d
  namespace: default
  annotations: {plexus.io/audit: "true"}
spec: {podSelector: {matchLabels: {app: d}}, policyTypes: [Ingress]}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Path]]:
    root = tmp_path_factory.mktemp("flows")
    world = World(root / "world")
    export = root / "flows.jsonl"
    try:
        agent = world.add_host("host1", start_agent=False)
        agent.start(extra=["--flow-export", str(export)])
        agent.cli("network", "create", "net", "--subnet", "10.78.0.0/24")
        for name in ("a", "b", "c", "d"):
            agent.run_echo(name, "net", "--label", f"app={name}")
        agent.cli("network", "create", "other", "--subnet", "10.78.1.0/24")
        agent.run_echo("e", "other", "--label", "app=e")
        for name in ("a", "b", "c", "d", "e"):
            agent.wait_listening(name)
        policy = root / "policy.yaml"
        policy.write_text(POLICY)
        agent.cli("policy", "apply", "-f", str(policy))
        yield agent, export
    finally:
        world.close()


def flows(agent: Agent, *args: str) -> list[dict[str, Any]]:
    return list(agent.json("flows", *args))


def wait_for(agent: Agent, args: tuple[str, ...], want: Any, timeout: float = 5.0) -> list[
        dict[str, Any]]:
    """The records ``args`` select once one satisfies ``want`` (records come asynchronously)."""
    found: list[dict[str, Any]] = []
    for _ in range(int(timeout / 0.1)):
        found = flows(agent, *args)
        if any(want(f) for f in found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"no record for {args} in {timeout} s: {found}")


def test_a_connection_starts_and_ends_with_names_and_bytes(lab: tuple[Agent, Path]) -> None:
    agent, export = lab
    b = agent.address("b")
    assert tcp_probe(agent.netns("a"), b, 80, payload=b"x" * 3000).outcome is ANSWERED
    found = wait_for(agent, ("--from", "a", "--to", "b"), lambda f: f["event"] == "start")
    start = next(f for f in found if f["event"] == "start")
    assert start["src"]["name"] == "a" and start["dst"]["name"] == "b"
    assert start["dst"]["port"] == 80 and start["proto"] == "tcp"
    assert start["verdict"] == "forwarded" and start["direction"] == "both"
    assert start["src"]["labels"] == {"app": "a"} and start["dst"]["namespace"] == "default"
    # A closed TCP connection is forgotten after TIME_WAIT (2 min): end it now.
    nsexec("host1", "conntrack", "-D", "-s", agent.address("a"), "-d", b, check=False)
    found = wait_for(agent, ("--from", "a", "--to", "b"), lambda f: f["event"] == "end")
    end = next(f for f in found if f["event"] == "end")
    assert end["bytes"] > 3000 and end["packets"] >= 4 and end["duration"] is not None
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert any(f["event"] == "end" and f["src"]["name"] == "a" for f in exported)


def test_a_policy_drop_names_the_policy(lab: tuple[Agent, Path]) -> None:
    agent, _ = lab
    assert tcp_probe(agent.netns("c"), agent.address("b"), 80, 0.5).outcome is DROPPED
    found = wait_for(agent, ("--from", "c", "--verdict", "dropped"),
                     lambda f: f["dst"]["name"] == "b")
    drop = next(f for f in found if f["dst"]["name"] == "b")
    assert drop["event"] == "drop" and drop["reason"] == "policy NetworkPolicy default/only-a"
    assert drop["dst"]["port"] == 80 and drop["direction"] == "both"
    allowed = flows(agent, "--from", "a", "--verdict", "dropped")
    assert allowed == []


def test_an_isolation_drop_says_so(lab: tuple[Agent, Path]) -> None:
    agent, _ = lab
    # a: no policy selects it, so the policy table lets the packet on to the isolation check
    assert tcp_probe(agent.netns("e"), agent.address("a"), 80, 0.5).outcome is DROPPED
    found = wait_for(agent, ("--from", "e", "--verdict", "dropped"), lambda f: True)
    assert found[-1]["reason"] == "isolation" and found[-1]["dst"]["name"] == "a"
    assert found[-1]["src"]["network"] == "other" and found[-1]["dst"]["network"] == "net"


def test_an_audit_policy_lets_the_packet_through_and_says_so(lab: tuple[Agent, Path]) -> None:
    agent, _ = lab
    assert tcp_probe(agent.netns("c"), agent.address("d"), 80).outcome is ANSWERED
    found = wait_for(agent, ("--to", "d", "--verdict", "audit"), lambda f: True)
    assert found[-1]["reason"] == "policy NetworkPolicy default/watch-d"
    assert found[-1]["src"]["name"] == "c"


def test_bad_filters_say_which_and_the_table_shows_records(lab: tuple[Agent, Path]) -> None:
    agent, _ = lab
    for args, word in ((("--since", "yesterday"), "since"), (("--verdict", "maybe"), "verdict"),
                       (("--port", "99999"), "port")):
        out = agent.cli("flows", *args, check=False)
        assert out.returncode != 0 and word in out.stderr and len(out.stderr.splitlines()) == 1
    text = agent.cli("flows", "--from", "a", "--since", "10m").stdout
    assert "default/a (" in text and "forwarded" in text


def _overrun_conntrack_socket(connections: int) -> int:
    """In this thread's namespace: a socket subscribed to conntrack's new-connection events
    with the smallest buffer the kernel allows, ``connections`` loopback connections, and what
    /proc/net/netlink says the socket lost (read as the agent reads its own)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, w.NETLINK_NETFILTER) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        sock.bind((0, 1 << (w.NFNLGRP_CONNTRACK_NEW - 1)))
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(connections)
            for _ in range(connections):
                with socket.create_connection(server.getsockname(), timeout=2):
                    pass
        text = Path("/proc/thread-self/net/netlink").read_text()
        return netlink_drops(text, {"mine": os.fstat(sock.fileno()).st_ino}).get("mine", -1)


def test_the_kernel_counts_the_events_a_full_socket_loses(lab: tuple[Agent, Path]) -> None:
    """The premise of plexus_flow_records_lost_total: conntrack's events to a socket that is
    not read are dropped, each counted in the socket's Drops (the first fills the buffer)."""
    lost = run_in_netns(netns_path("host1"), lambda: _overrun_conntrack_socket(200))
    assert 150 <= lost <= 200, lost

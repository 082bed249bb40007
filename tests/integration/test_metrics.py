"""Prometheus metrics (``plexus agent --metrics-address``) read back the way users read them: a
real Prometheus scrapes the agent, real traffic flows between containers, and the values come
back through Prometheus's HTTP API; plus the listener's bad input, and the Grafana dashboard
against the agent's real output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from plexus.api.client import Client
from plexus.dataplane.netns import run_in_netns
from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, DROPPED, netns_path, tcp_probe
from tests.harness.prometheus import Prometheus, http_get
from tests.harness.world import VENV_BIN, Agent, World, nsexec

METRICS_PORT = 9100
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "plexus.json"
LOCK = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lock, namespace: default}
spec:
  podSelector: {matchLabels: {role: locked}}
  policyTypes: [Ingress]
"""


@pytest.fixture
def lab(world: World, tmp_path: Path) -> Iterator[Agent]:
    """host1's agent with metrics on its loopback; front: web, client, locked; back: stranger."""
    agent = world.add_host("host1", start_agent=False)
    agent.start(extra=["--metrics-address", f":{METRICS_PORT}"])
    agent.cli("network", "create", "front")
    agent.cli("network", "create", "back")
    for name in ("web", "client"):
        agent.run_echo(name, "front")
    agent.run_echo("locked", "front", "--label", "role=locked")
    agent.run_echo("stranger", "back")
    for name in ("web", "locked", "stranger"):
        agent.wait_listening(name)
    policy = tmp_path / "lock.yaml"
    policy.write_text(LOCK)
    agent.cli("policy", "apply", "-f", str(policy))
    yield agent


def _ask(ns: str, server: str, name: str) -> str:
    """An A query from namespace ``ns`` to ``server``: the answer's rcode."""
    query = dns.message.make_query(name, "A")
    answer = run_in_netns(netns_path(ns), lambda: dns.query.udp(query, server, timeout=2))
    return dns.rcode.to_text(answer.rcode())


def _metrics(agent: Agent, path: str = "/metrics") -> tuple[int, str]:
    return http_get(agent.host, "127.0.0.1", METRICS_PORT, path)


@pytest.mark.timeout(180)
def test_prometheus_scrapes_the_agent_and_sees_real_traffic(lab: Agent, tmp_path: Path) -> None:
    agent = lab
    web = agent.address("web")
    with Prometheus(tmp_path / "prom", agent.host, [f"127.0.0.1:{METRICS_PORT}"]) as prom:
        received = 'plexus_container_network_receive_bytes_total{container="web"}'
        before = prom.wait_for(received, lambda v: v >= 0)
        # 200 kB from client to web, through the bridge (the echo server answers its name).
        payload = b"x" * 200_000
        answer = tcp_probe(agent.netns("client"), web, 80, 5.0, payload)
        assert answer.answer.startswith("web"), answer
        prom.wait_for(received, lambda v: v >= before + len(payload))
        # Isolation between networks, and a policy, both drop; the kernel counts, we read.
        assert tcp_probe(agent.netns("stranger"), web, 80, 0.5).outcome is DROPPED
        assert tcp_probe(agent.netns("client"), agent.address("locked"), 80,
                         0.5).outcome is DROPPED
        prom.wait_for('plexus_dropped_packets_total{reason="isolation"}', lambda v: v >= 1)
        # The host has no IPv6 route out: a datagram it sends there is a "no route" drop.
        unrouted = prom.wait_for('plexus_dropped_packets_total{reason="no_route"}',
                                 lambda v: v >= 0)
        send = ("import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                "try: s.sendto(b'x', ('2001:db8::1', 9))\nexcept OSError as e: print(e.errno)")
        assert nsexec(agent.host, sys.executable, "-c", send).stdout.strip() == "101"
        prom.wait_for('plexus_dropped_packets_total{reason="no_route"}',
                      lambda v: v >= unrouted + 1)
        prom.wait_for('sum(plexus_dropped_packets_total{reason="policy",policy=~".*lock.*"})',
                      lambda v: v >= 1)
        # The flow log made records of both (and of the connection), none lost in the kernel.
        prom.wait_for('plexus_flow_records_total{verdict="dropped"}', lambda v: v >= 2)
        assert (prom.value('plexus_flow_records_total{verdict="forwarded"}') or 0) >= 1
        assert prom.value("plexus_flow_records_suppressed_total") == 0
        assert prom.value('plexus_flow_records_lost_total{source="conntrack"}') == 0
        assert prom.value('plexus_flow_records_lost_total{source="nflog"}') == 0
        assert (prom.value("plexus_flow_ring_records") or 0) >= 3
        # DNS from a container to its gateway, and a CNI call: by type and result, by command.
        gateway = agent.container("client")["endpoints"][0]["gateways"][0]
        assert _ask(agent.netns("client"), gateway, "web") == "NOERROR"
        assert _ask(agent.netns("client"), gateway, "nosuch.plexus.internal") == "NXDOMAIN"
        config = {"cniVersion": "1.1.0", "name": "front", "type": "plexus"}
        Client(str(agent.socket)).post("/v1/cni", {"env": {"CNI_COMMAND": "STATUS"},
                                                   "stdin": json.dumps(config)})
        Client(str(agent.socket)).post("/v1/cni", {"env": {"CNI_COMMAND": "ADD"}, "stdin": ""})
        prom.wait_for('plexus_dns_responses_total{type="A",rcode="NXDOMAIN"}', lambda v: v >= 1)
        assert (prom.value('plexus_dns_responses_total{type="A",rcode="NOERROR"}') or 0) >= 1
        assert (prom.value('plexus_dns_query_duration_seconds_count'
                           '{type="A",rcode="NXDOMAIN"}') or 0) >= 1
        prom.wait_for('plexus_cni_request_duration_seconds_count{command="ADD",result="error"}',
                      lambda v: v == 1)
        assert prom.value('plexus_cni_request_duration_seconds_count'
                          '{command="STATUS",result="ok"}') == 1
        assert prom.value("up") == 1
        assert prom.value("sum(plexus_endpoints)") == 4
        assert prom.value('plexus_endpoints{network="front",front_door="plexus"}') == 3
        assert prom.value('plexus_ipam_addresses_used{network="back"}') == 1
        assert prom.value('plexus_networks{driver="bridge"}') == 2
        sent = prom.value('plexus_container_network_transmit_bytes_total{container="client"}')
        assert sent is not None and sent >= len(payload)
        packets = prom.value('plexus_container_network_receive_packets_total{container="web"}')
        assert packets is not None and packets > len(payload) / 65536
        assert (prom.value('sum(plexus_api_request_duration_seconds_count'
                           '{route="/v1/containers"})') or 0) >= 4
        assert (prom.value('sum(plexus_datastore_request_duration_seconds_count'
                           '{engine="sqlite",operation="txn"})') or 0) >= 4
        assert (prom.value('sum(plexus_reconcile_duration_seconds_count{reconciler="links"})')
                or 0) >= 4


def test_flow_records_over_the_rate_limit_are_counted_as_suppressed(world: World) -> None:
    """An agent that makes at most 2 flow records a second, 20 connections at once: the rest
    are counted, not kept, and the records made are counted by verdict (each connection's start
    record at least; its end comes when conntrack forgets it)."""
    agent = world.add_host("host1", start_agent=False)
    agent.start(extra=["--metrics-address", f":{METRICS_PORT}", "--flow-rate", "2"])
    agent.cli("network", "create", "front")
    for name in ("web", "client"):
        agent.run_echo(name, "front")
    agent.wait_listening("web")
    ns, web = agent.netns("client"), agent.address("web")
    with ThreadPoolExecutor(max_workers=20) as pool:  # at once: within a second or two
        answered = list(pool.map(lambda _: tcp_probe(ns, web, 80, 2.0).outcome, range(20)))
    assert answered.count(ANSWERED) == 20
    for _ in range(50):  # the events reach the agent's loop in a moment (bounded)
        output = _metrics(agent)[1]
        made = _sample(output, "plexus_flow_records_total", verdict="forwarded")
        suppressed = _sample(output, "plexus_flow_records_suppressed_total")
        if made + suppressed >= 20:
            break
        time.sleep(0.2)
    assert made >= 2 and suppressed >= 1
    assert made + suppressed >= 20  # a start record each at least, made or suppressed
    assert _sample(output, "plexus_flow_ring_records") == made  # what was made, no more


def test_services_report_their_endpoints_and_the_ready_ones(lab: Agent) -> None:
    lab.cli("service", "create", "locked", "--network", "front", "--selector", "role=locked",
            "--port", "80")
    lab.cli("service", "create", "nobody", "--network", "front", "--selector", "role=none",
            "--port", "80")
    output = _metrics(lab)[1]
    for name, ready in (("locked", 1), ("nobody", 0)):
        at = {"namespace": "default", "service": name, "network": "front"}
        assert _sample(output, "plexus_service_endpoints", **at) == ready
        assert _sample(output, "plexus_service_endpoints_ready", **at) == ready
    assert _sample(output, "plexus_services", network="front") == 2
    lab.cli("rm", "--force", "locked")  # its endpoint goes: the service has none left
    output = _metrics(lab)[1]
    assert _sample(output, "plexus_service_endpoints_ready", service="locked") == 0
    assert _sample(output, "plexus_reconcile_duration_seconds_count", reconciler="lb") >= 1


def _queried_metrics(dashboard: dict[str, object]) -> set[str]:
    text = json.dumps(dashboard)
    exprs = re.findall(r'"expr": "((?:[^"\\]|\\.)*)"', text)
    exprs += re.findall(r'"definition": "((?:[^"\\]|\\.)*)"', text)
    return {m for e in exprs for m in re.findall(r"\bplexus_[a-z0-9_]+", e)}


def _declared(output: str) -> set[str]:
    """Every name a query may use: the families (# TYPE, a histogram's with its series'
    suffixes and a counter's with _total, which they have even before their first sample)
    and their samples' names."""
    names = set(re.findall(r"^(plexus_[a-z0-9_]+)[{ ]", output, re.M))
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", output, re.M):
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{s}" for s in ("bucket", "count", "sum"))
        if kind == "counter":  # declared without the suffix its samples have
            names.add(f"{name}_total")
    return names


def test_every_metric_the_grafana_dashboard_queries_is_in_the_agents_output(
        lab: Agent) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    status, output = _metrics(lab)
    assert status == 200
    queried = _queried_metrics(dashboard)
    assert len(queried) >= 25  # the parser found the queries at all
    assert {"plexus_flow_records_total", "plexus_flow_records_lost_total",
            "plexus_service_endpoints_ready", "plexus_dns_query_duration_seconds_bucket"} <= queried
    assert queried - _declared(output) == set()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] and p["datasource"]["type"] == "prometheus" for p in panels)


def test_an_unknown_path_is_404_and_the_agent_keeps_serving(lab: Agent) -> None:
    status, body = _metrics(lab, "/nothing/here")
    assert status == 404 and "/metrics" in body
    assert _metrics(lab)[0] == 200
    assert lab.json("status")["ready"]


def _agent_exits(world: World, name: str, address: str) -> subprocess.CompletedProcess[str]:
    agent = world.agents[name]
    argv = ["nsenter", f"--net=/run/netns/{name}", "--", str(VENV_BIN / "plexus"), "--socket",
            str(agent.socket), "agent", "--state-dir", str(agent.state_dir), "--node", name,
            "--docker-plugin-socket", "", "--docker-api", "", "--metrics-address", address]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("address", "says"), [
    ("nine", "invalid metrics-address 'nine': expected HOST:PORT or PORT"),
    (":70000", "the port must be 1 to 65535"),
    ("192.0.2.9:9100", "192.0.2.9:9100 is not an address of this host"),
])
def test_a_bad_metrics_address_stops_the_agent_with_one_line(
        world: World, address: str, says: str) -> None:
    world.add_host("host1", start_agent=False)
    r = _agent_exits(world, "host1", address)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("plexus:")]
    assert len(lines) == 1 and says in lines[0], r.stderr


def test_a_taken_metrics_port_stops_the_agent_before_it_starts(world: World) -> None:
    world.add_host("host1", start_agent=False)
    squatter = subprocess.Popen(
        ["ip", "netns", "exec", "host1", "python3", "-c",
         "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 9100)); s.listen();"
         " print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "up"
        started = time.monotonic()
        r = _agent_exits(world, "host1", ":9100")
        assert r.returncode == 2, r.stderr
        assert "127.0.0.1:9100 is already in use" in r.stderr
        assert time.monotonic() - started < 20
        # Nothing was started: no API socket answers.
        assert not world.agents["host1"].socket.exists()
        assert nsexec("host1", "ip", "-j", "link", "show", "type", "bridge").stdout.strip() in (
            "", "[]")
    finally:
        squatter.kill()
        squatter.wait(timeout=5)


def _sample(output: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels`` (0 when there is none)."""
    total = 0.0
    for found, value in re.findall(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", output, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@pytest.mark.timeout(120)
def test_etcd_round_trips_and_failures_are_counted(world: World, tmp_path: Path) -> None:
    with cluster(world, tmp_path, ["host1"], start=[]) as (etcd, (agent,)):
        agent.start(extra=["--store", etcd.url, "--metrics-address", f":{METRICS_PORT}"])
        agent.cli("network", "create", "front")
        output = _metrics(agent)[1]
        assert _sample(output, "plexus_datastore_request_duration_seconds_count",
                       engine="etcd", operation="txn") >= 1
        assert _sample(output, "plexus_datastore_request_duration_seconds_count",
                       engine="sqlite") == 0
        assert _sample(output, "plexus_datastore_errors_total", engine="etcd") == 0
        etcd.members[0].stop()
        failed = agent.cli("network", "create", "back", check=False, timeout=60)
        assert failed.returncode != 0
        output = _metrics(agent)[1]
        assert _sample(output, "plexus_datastore_errors_total", engine="etcd") >= 1


def test_drift_the_agent_corrects_is_counted_per_reconciler(lab: Agent) -> None:
    """A container's host-side veth deleted behind the agent's back (a kernel event), and the
    whole nftables table deleted (found by `plexus reconcile`): both come back, and the
    metrics count them under the reconciler that put them back."""
    def drift(reconciler: str) -> float:
        return _sample(_metrics(lab)[1], "plexus_reconcile_drift_corrected_total",
                       reconciler=reconciler)

    before = {r: drift(r) for r in ("links", "firewall")}
    veths = [link["ifname"] for link in json.loads(nsexec(lab.host, "ip", "-j", "link").stdout)
             if link["ifname"].startswith("pxv")]
    assert len(veths) == 4
    nsexec(lab.host, "ip", "link", "del", veths[0])
    deadline = time.monotonic() + 20
    while drift("links") <= before["links"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert drift("links") >= before["links"] + 1
    # The veth just put back may still have the firewall reconciler rewriting its table (which
    # restores a table deleted meanwhile, and rightly counts nothing): try again, bounded.
    for _ in range(3):
        nsexec(lab.host, "nft", "delete", "table", "inet", "plexus")
        lab.cli("reconcile")
        if drift("firewall") >= before["firewall"] + 1:
            break
    assert drift("firewall") >= before["firewall"] + 1
    assert "drop_isolation" in nsexec(lab.host, "nft", "list", "counters").stdout
    assert veths[0] in nsexec(lab.host, "ip", "-j", "link").stdout  # put back

"""What policies in force cost real traffic (bench/policy.py): a real agent in host1, three
containers started with ``plexus run`` in namespace ``bench`` (srv: ``iperf3 -s``, echo: a TCP
echo server on port 80, both labelled app=srv; cli: the client), and policies applied with
``plexus policy apply``: the generated cluster's first N-1 policies (they select other
endpoints: three more containers in ns-000 labelled as the generator's apps, and endpoints the
agent does not have) plus ``allow-pair`` (srv from cli on 5201 and 80, written last).

Settings, one after the other: no policy; plexus with 100 and 1,000 policies; then no plexus
policy and the same policies as linear rules (bench/_policy_linear.py, expanded against the
generated cluster's endpoints and the containers) in ``table inet plexus_linear``. Per setting:
``--connects`` TCP connects from cli to echo:80, timed one by one in cli's namespace (each a
new conntrack entry, so judged by the policy), and iperf3 single stream cli -> srv, best of
``--rounds``.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import sys
import tempfile
from pathlib import Path

import _policy_gen as gen
import _policy_linear as linear
import yaml
from _common import header, percentile, print_table, sh
from throughput import iperf, wait_listening

from plexus.model.types import IPAddress
from plexus.policy import documents
from plexus.policy.evaluate import Workload
from plexus.policy.model import Policy
from tests.harness.probes import tcp_probe
from tests.harness.world import ECHO, Agent, World, nsexec

NET, SUBNET = "polnet", "10.200.0.0/24"  # outside the generator's 10.64.0.0/10
PORT = 5201
CONNECT = """
import socket, sys, time, json
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(n):
    s = socket.socket()
    t = time.perf_counter()
    s.connect((addr, port))
    out.append(time.perf_counter() - t)
    s.close()
print(json.dumps(out))
"""
PAIR = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-pair", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "srv"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                              "ports": [{"port": PORT}, {"port": 80}]}]}}


def connects(agent: Agent, n: int) -> list[float]:
    r = nsexec(agent.netns("cli"), sys.executable, "-c", CONNECT, agent.address("echo"), "80",
               str(n), timeout=120)
    return [float(x) for x in json.loads(r.stdout)]


def containers() -> dict[str, tuple[str, dict[str, str]]]:
    """Name -> (namespace, labels) of the agent's containers."""
    out = {"srv": ("bench", {"app": "srv"}), "echo": ("bench", {"app": "srv"}),
           "cli": ("bench", {"app": "cli"})}
    for j in range(3):
        out[f"other{j}"] = ("ns-000", {"app": f"app-{j:02}", "tier": gen.TIERS[j]})
    return out


def start(agent: Agent) -> None:
    agent.cli("network", "create", NET, "--subnet", SUBNET)
    agent.cli("namespace", "create", "bench", "--label", "team=bench")
    labels = gen.namespaces(gen.Shape(1, 1))["ns-000"]
    agent.cli("namespace", "create", "ns-000", *[f"--label={k}={v}" for k, v in labels.items()])
    commands = {"srv": ["iperf3", "-s", "-p", str(PORT)],
                "echo": [sys.executable, ECHO, "echo", "80"]}
    for name, (ns, tags) in containers().items():
        agent.cli("run", "-d", "--name", name, "--network", NET, "--namespace", ns,
                  *[f"--label={k}={v}" for k, v in tags.items()], "--expose", "http=8080/tcp",
                  "--", *commands.get(name, ["sleep", "3600"]))
    wait_listening(agent.netns("srv"), PORT)
    agent.wait_listening("echo", 80)


def workloads(agent: Agent, shape: gen.Shape) -> dict[IPAddress, Workload]:
    """Every endpoint's address: the generated cluster's and the agent's containers'."""
    out: dict[IPAddress, Workload] = {}
    for e in gen.endpoints(shape):
        named = {(p.name, p.protocol): p.port for p in e.exposes}
        out[e.addresses[0].ip] = Workload(e.container_id, e.namespace, e.labels, named)
    for name, (ns, labels) in containers().items():
        address = ipaddress.ip_address(agent.address(name))
        out[address] = Workload(name, ns, labels, {("http", "tcp"): 8080})
    return out


def run(shape: gen.Shape, sizes: list[int], n: int, seconds: int, rounds: int) -> None:
    header("Policies in force and real traffic: plexus's table vs the same policies as linear"
           " rules", [f"{n} TCP connects cli -> echo:80 per setting (each a new connection);"
                      f" iperf3 -t {seconds} cli -> srv, best of {rounds}",
                      f"policies: the first N-1 of the generated cluster's ({shape.endpoints:,}"
                      " endpoints) + allow-pair, last"])
    docs = gen.documents_of(shape)[: max(sizes) - 1]
    policies: list[Policy] = [*(documents.parse(d) for d in docs), documents.parse(PAIR)]
    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp, \
            World(Path(tmp) / "world") as world:
        agent = world.add_host("host1")
        start(agent)
        every = workloads(agent, shape)
        nf = nsexec("host1", "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
                    check=False).stdout.strip() or "absent"
        print(f"  host1 net.bridge.bridge-nf-call-iptables = {nf}")

        def measure(name: str) -> None:
            enforced = tcp_probe(agent.netns("other0"), agent.address("echo"), 80, 0.5)
            lat = connects(agent, n)
            tput = [iperf(name, agent.netns("cli"), agent.address("srv"), seconds).gbits
                    for _ in range(rounds)]
            results[name] = (lat, tput)
            print(f"  {name:<34} connect p50 {1e6 * percentile(lat, 50):7.0f} us"
                  f"   iperf3 best {max(tput):6.2f} Gbit/s   other0 -> echo:80 {enforced}")

        measure("no policy")
        for size in sizes:
            text = yaml.safe_dump_all([*docs[: size - 1], PAIR])
            path = Path(tmp) / f"policies-{size}.yaml"
            path.write_text(text)
            agent.cli("policy", "apply", "-f", str(path), timeout=600)
            wait_in_force(agent)
            measure(f"plexus, {size} policies")
        agent.cli("policy", "delete", "--all", timeout=600)
        for size in sizes:
            chosen = [*policies[: size - 1], policies[-1]]
            script, count = linear.render(chosen, gen.namespaces(shape) | {
                "bench": {"team": "bench"}}, every)
            _load(script, Path(tmp))
            measure(f"linear, {size} policies ({count:,} rules)")
            nsexec("host1", "nft", "delete", "table", "inet", linear.TABLE)
    report(results, sizes)


def _load(script: str, tmp: Path) -> None:
    path = tmp / "linear.nft"
    path.write_text(script)
    nsexec("host1", "nft", "-f", str(path), timeout=300)


def wait_in_force(agent: Agent) -> None:
    """``policy apply`` returns once the reconciler applied it; the table must be there."""
    out = sh("ip", "netns", "exec", "host1", "nft", "list", "tables").stdout
    if "plexus_policy" not in out:
        raise RuntimeError("policies applied but no table inet plexus_policy in host1")


def report(results: dict[str, tuple[list[float], list[float]]], sizes: list[int]) -> None:
    base_lat, base_tput = results["no policy"]
    b50, bt = percentile(base_lat, 50), max(base_tput)
    rows: list[list[object]] = []
    for name, (lat, tput) in results.items():
        p50 = percentile(lat, 50)
        rows.append([name, f"{1e6 * p50:.0f}", f"{1e6 * percentile(lat, 90):.0f}",
                     f"{1e6 * percentile(lat, 99):.0f}", f"{p50 / b50:.2f}x",
                     f"{max(tput):.2f}", f"{statistics.median(tput):.2f}",
                     f"{max(tput) / bt:.3f}x"])
    print_table(["setting", "connect p50 us", "p90 us", "p99 us", "p50 vs none",
                 "best Gbit/s", "median Gbit/s", "best vs none"], rows,
                "connect latency (lower is better) and throughput (higher is better)")
    top = results[f"plexus, {max(sizes)} policies"]
    print(f"\n  targets: throughput with {max(sizes)} policies >= 0.97x none: "
          f"{max(top[1]) / bt:.3f}x; connect p50 with 0/{'/'.join(map(str, sizes))} policies "
          "within 10% of each other: " + ", ".join(
              f"{percentile(results[f'plexus, {s} policies'][0], 50) / b50:.2f}x"
              for s in sizes))


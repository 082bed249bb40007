"""TCP single-stream throughput between two containers on a plexus network, against a bare veth
pair between two fresh namespaces (the physical limit of this machine).

    tests/sandbox .venv/bin/python bench/throughput.py [--seconds 4] [--rounds 5]

plexus: ``plexus run`` starts ``iperf3 -s`` in container "srv" and a sleeper in container "cli" on
one network; the client runs in cli's namespace (``nsenter --net=...``). Bare: two namespaces
joined by one veth pair, no bridge, no firewall. A third, diagnostic side ("bare bridge": a plain
Linux bridge with two veth-attached namespaces and no firewall) separates what the bridge costs
from what plexus adds. Runs rotate (each round starts with the next side; iperf3 is not pinned,
so the scheduler can avoid a core that other work is using) and the best of each side is
compared. Only figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import header, netns_batch, print_table, require_sandbox, sh

from tests.harness.world import World, nsexec

PORT = 5201
NET, SUBNET = "tput", "10.88.0.0/24"
BARE_A, BARE_B = "bare-a", "bare-b"
BARE_A_IP, BARE_B_IP = "10.99.0.1", "10.99.0.2"
BR_HOST, BR_A, BR_B = "brd-host", "brd-a", "brd-b"
BR_A_IP, BR_B_IP = "10.98.0.2", "10.98.0.3"


@dataclass
class Run:
    side: str
    gbits: float
    retransmits: int
    cpu_sender: float
    cpu_receiver: float

    @property
    def per_cpu(self) -> float:
        """Gbit moved per CPU-second of both iperf3 processes (incl. the kernel work done in
        their context): a figure that other load on the machine disturbs less than Gbit/s."""
        cpu = (self.cpu_sender + self.cpu_receiver) / 100
        return self.gbits / cpu if cpu else 0.0


def _pair(v: dict[str, float]) -> list[object]:
    """plexus, bare veth, ratio, bare bridge, ratio."""
    px, veth, br = v["plexus"], v["bare veth"], v["bare bridge"]
    return [f"{px:.2f}", f"{veth:.2f}", f"{px / veth:.3f}" if veth else "-", f"{br:.2f}",
            f"{px / br:.3f}" if br else "-"]


def wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = nsexec(ns, "ss", "-Hltn", f"sport = :{port}", check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} in {ns}")


def iperf(side: str, client_ns: str, server_ip: str, seconds: int) -> Run:
    r = nsexec(client_ns, "iperf3", "-c", server_ip, "-p", str(PORT), "-t", str(seconds),
               "-O", "1", "-J", check=False, timeout=seconds + 30)
    data: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    if r.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 ({side}) failed: {data.get('error', r.stderr)}")
    end = data["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return Run(side, end["sum_received"]["bits_per_second"] / 1e9,
               int(end["sum_sent"].get("retransmits", 0)),
               float(cpu.get("host_total", 0.0)), float(cpu.get("remote_total", 0.0)))


def bare_pair() -> subprocess.Popen[bytes]:
    """Two namespaces and one veth pair between them; iperf3 -s on the B side."""
    netns_batch("add", [BARE_A, BARE_B])
    sh("ip", "link", "add", "va", "netns", BARE_A, "type", "veth", "peer", "name", "vb", "netns",
       BARE_B)
    for ns, dev, ip in ((BARE_A, "va", BARE_A_IP), (BARE_B, "vb", BARE_B_IP)):
        nsexec(ns, "ip", "link", "set", "lo", "up")
        nsexec(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev)
        nsexec(ns, "ip", "link", "set", dev, "up")
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{BARE_B}", "--", "iperf3", "-s",
                             "-p", str(PORT)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_listening(BARE_B, PORT)
    return proc


def bare_bridge() -> subprocess.Popen[bytes]:
    """Diagnostic: a plain Linux bridge in its own "host" namespace with two veth-attached
    namespaces, as plexus builds it but without any firewall; iperf3 -s on the B side."""
    netns_batch("add", [BR_HOST, BR_A, BR_B])
    nsexec(BR_HOST, "ip", "link", "add", "br0", "type", "bridge")
    nsexec(BR_HOST, "ip", "link", "set", "br0", "up")
    for ns, ip in ((BR_A, BR_A_IP), (BR_B, BR_B_IP)):
        host_end = f"h-{ns}"
        sh("ip", "link", "add", host_end, "netns", BR_HOST, "type", "veth", "peer", "name",
           "eth0", "netns", ns)
        nsexec(BR_HOST, "ip", "link", "set", host_end, "master", "br0", "up")
        nsexec(ns, "ip", "link", "set", "lo", "up")
        nsexec(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        nsexec(ns, "ip", "link", "set", "eth0", "up")
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{BR_B}", "--", "iperf3", "-s",
                             "-p", str(PORT)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_listening(BR_B, PORT)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 -t (plus 1 s omitted)")
    ap.add_argument("--rounds", type=int, default=5, help="runs per side, rotating")
    args = ap.parse_args(argv)
    if not require_sandbox("throughput.py"):
        return 2
    seconds, rounds = max(1, args.seconds), max(1, min(args.rounds, 10))
    header("TCP single-stream throughput: plexus bridge network vs bare veth pair", [
        f"iperf3 -t {seconds} -O 1 -J, {rounds} round(s) per side, rotating order; best of each",
        f"plexus: containers srv (iperf3 -s) and cli on network {NET} {SUBNET}, agent in host1",
        "bare veth: namespaces bare-a <-> bare-b joined by one veth pair (no bridge, no firewall)",
        "bare bridge (diagnostic): a plain bridge + 2 veth pairs in fresh namespaces, no firewall",
    ])
    runs: list[Run] = []
    servers: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp, \
            World(Path(tmp) / "world") as world:
        agent = world.add_host("host1")
        try:
            agent.cli("network", "create", NET, "--subnet", SUBNET)
            agent.cli("run", "-d", "--name", "srv", "--network", NET, "--",
                      "iperf3", "-s", "-p", str(PORT))
            agent.cli("run", "-d", "--name", "cli", "--network", NET, "--", "sleep", "600")
            srv_ip, srv_ns, cli_ns = agent.address("srv"), agent.netns("srv"), agent.netns("cli")
            wait_listening(srv_ns, PORT)
            nf = nsexec("host1", "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables",
                        check=False).stdout.strip() or "absent (br_netfilter not loaded)"
            print(f"  host1 net.bridge.bridge-nf-call-iptables = {nf} (1: bridged container"
                  " traffic also traverses plexus's inet hooks and conntrack)")
            servers.append(bare_pair())
            servers.append(bare_bridge())
            sides = {
                "plexus": lambda: iperf("plexus", cli_ns, srv_ip, seconds),
                "bare veth": lambda: iperf("bare veth", BARE_A, BARE_B_IP, seconds),
                "bare bridge": lambda: iperf("bare bridge", BR_A, BR_B_IP, seconds),
            }
            names = list(sides)
            for r in range(rounds):
                for side in names[r % 3:] + names[: r % 3]:
                    runs.append(sides[side]())
                    last = runs[-1]
                    print(f"  round {r + 1}: {side:<11} {last.gbits:7.2f} Gbit/s"
                          f"  retransmits {last.retransmits}")
        finally:
            for proc in servers:
                stop(proc)
            agent.cli("rm", "-f", "srv", "cli", check=False)
            agent.cli("network", "rm", NET, check=False)
            netns_batch("del", [BARE_A, BARE_B, BR_HOST, BR_A, BR_B])
    best = {n: max((r for r in runs if r.side == n), key=lambda r: r.gbits) for n in sides}
    median = {n: statistics.median(r.gbits for r in runs if r.side == n) for n in sides}
    px, bare, br = best["plexus"], best["bare veth"], best["bare bridge"]
    rows: list[list[object]] = [
        ["best Gbit/s", *_pair({n: r.gbits for n, r in best.items()})],
        ["median Gbit/s", *_pair(median)],
        ["Gbit per CPU-second (median)",
         *_pair({n: statistics.median(r.per_cpu for r in runs if r.side == n) for n in sides})],
        ["retransmits (best run)", px.retransmits, bare.retransmits, "-", br.retransmits, "-"],
        ["sender CPU % (best run)", f"{px.cpu_sender:.0f}", f"{bare.cpu_sender:.0f}", "-",
         f"{br.cpu_sender:.0f}", "-"],
        ["receiver CPU % (best run)", f"{px.cpu_receiver:.0f}", f"{bare.cpu_receiver:.0f}", "-",
         f"{br.cpu_receiver:.0f}", "-"],
    ]
    print_table(["TCP single stream", "plexus", "bare veth", "plexus/veth", "bare bridge",
                 "plexus/bridge"], rows, "throughput (higher is better)")
    print(f"\n  target: plexus/bare veth >= 0.95 (best of runs); this run: "
          f"{px.gbits / bare.gbits:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

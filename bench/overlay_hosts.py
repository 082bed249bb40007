"""How soon another host reaches a new container of an overlay network: from ``plexus run`` on
host1 returning to (a) host2's kernel holding the route to the container's block and (b) the
first TCP connection from a container on host2 reaching it (a RST from the container's kernel:
nothing listens, so no process start-up is timed).

    tests/sandbox .venv/bin/python bench/overlay_hosts.py [--runs 100]

Two simulated hosts whose agents share one real etcd (tests/harness/cluster.py). Blocks are /30
(``--block-size 30``: three container addresses each), so every few containers claim a new
block, the case in which host2 must learn a route; in the others host2 has nothing to do. The
client tries every 20 ms with a 200 ms connect timeout; a try made before the route existed
leaves the client's ARP entry for that address unresolved, retried by the kernel after 1 s
(``retrans_time``), which is why (b) can exceed (a) by up to a second. Only figures are
printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import header, print_table, require_sandbox

from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, REFUSED, tcp_probe
from tests.harness.world import Agent, World, nsexec

SUBNET = "10.78.0.0/24"
DEADLINE = 10.0


def _routes(host: str) -> set[str]:
    out = nsexec(host, "ip", "-j", "route", "show", "proto", "112").stdout
    return {r["dst"] for r in json.loads(out or "[]")}


def _run(agent: Agent, name: str) -> str:
    c = json.loads(agent.cli("run", "-d", "--json", "--name", name, "--network", "ov", "--",
                             "sleep", "600").stdout)
    return str(c["endpoints"][0]["addresses"][0])


def _sample(a1: Agent, client_ns: str, name: str) -> tuple[str, float, float, bool]:
    """(address, seconds to host2's route, seconds to the first connection, new block?)."""
    before = _routes("host2")
    iface = ipaddress.ip_interface(_run(a1, name))
    t0 = time.perf_counter()
    block = str(ipaddress.ip_network(f"{iface.ip}/30", strict=False))
    new = block not in before
    routed = connected = float("nan")
    while time.perf_counter() - t0 < DEADLINE and routed != routed:  # NaN: not yet
        if block in _routes("host2"):
            routed = time.perf_counter() - t0
    while time.perf_counter() - t0 < DEADLINE:
        if tcp_probe(client_ns, str(iface.ip), 9, timeout=0.2).outcome in (REFUSED, ANSWERED):
            connected = time.perf_counter() - t0
            break
        time.sleep(0.02)
    return str(iface.ip), routed, connected, new


def main() -> None:
    if not require_sandbox("overlay_hosts.py"):
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    header("overlay: plexus run on host1 -> reachable from host2",
           ["two hosts, one etcd; /30 blocks; times from `plexus run` returning"])
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2"]) as (_, (a1, a2)):
                a1.cli("network", "create", "ov", "--driver", "overlay", "--subnet", SUBNET,
                       "--block-size", "30")
                while "ov" not in {n["name"] for n in a2.json("network", "ls")}:
                    time.sleep(0.05)
                a2.cli("run", "-d", "--name", "client", "--network", "ov", "--", "sleep", "600")
                client_ns = a2.netns("client")
                rows = [_sample(a1, client_ns, f"c{i}") for i in range(args.runs)]
        finally:
            w.close()
    print_table(["address", "new block", "route on host2 ms", "first connect ms"],
                [(ip, "yes" if new else "no", f"{1000 * r:.0f}" if new else "-",
                  f"{1000 * c:.0f}") for ip, r, c, new in rows])
    for label, new in (("new block", True), ("same block", False)):
        got = [c for _, _, c, n in rows if n == new]
        if got:
            print(f"{label}: first connect median {1000 * statistics.median(got):.0f} ms "
                  f"(n={len(got)}, max {1000 * max(got):.0f} ms)")
    every = sorted(c for _, _, c, _ in rows)
    p99 = every[min(len(every) - 1, int(0.99 * len(every)))]
    print(f"all {len(every)}: first connect p50 {1000 * statistics.median(every):.0f} ms, "
          f"p99 {1000 * p99:.0f} ms (target p99 <= 500 ms: {p99 / 0.5:.2f}x)")
    routed = [r for _, r, _, n in rows if n]
    if routed:
        print(f"new block: route on host2 median {1000 * statistics.median(routed):.0f} ms")


if __name__ == "__main__":
    main()

"""Docker on a plexus network against Docker's own bridge network, same dockerd, same run.

    tests/sandbox .venv/bin/python bench/docker.py [--runs 12] [--seconds 4]

1. `docker run --rm busybox true` wall time on a plexus network, on a user-defined Docker bridge
   network and with `--network none`; the network's cost is (with network) - (none).
2. TCP single-stream throughput (iperf3) between two containers on plexus and on Docker's bridge.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import header, print_table, require_sandbox

from tests.harness.docker import IPERF_IMAGE, Dockerd
from tests.harness.world import World


def run_rm_times(d: Dockerd, runs: int) -> dict[str, list[float]]:
    sides = {"plexus": "pxnet", "docker bridge": "dknet", "none": "none"}
    for net in sides.values():
        d.run_rm(net)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sides}
    order = list(sides)
    for i in range(runs):
        for name in order[i % 3:] + order[: i % 3]:
            times[name].append(d.run_rm(sides[name]) * 1000)
    return times


def iperf(d: Dockerd, net: str, seconds: int) -> float:
    srv, cli = f"ipsrv-{net}", f"ipcli-{net}"
    d.run(srv, net, "iperf3", "-s", image=IPERF_IMAGE)
    d.run(cli, net, "sleep", "3600", image=IPERF_IMAGE)
    try:
        ip = d.ip(srv, net)
        best = 0.0
        for _ in range(2):
            out = d.exec(cli, "iperf3", "-c", ip, "-t", str(seconds), "-O", "1", "-J",
                         timeout=seconds + 30).stdout
            bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
            best = max(best, bps / 1e9)
        return best
    finally:
        d.rm(srv, cli)


def main() -> int:
    if not require_sandbox("docker.py"):
        return 2
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    header("Docker on plexus vs Docker's own bridge (one dockerd, one run)", [
        f"docker run --rm: {args.runs} runs per side after a warm-up, interleaved",
        f"iperf3: {args.seconds} s single stream, best of 2, plexus and bridge alternating",
        "dockerd 20.10 (Debian) and the plexus agent in the same simulated host",
    ])
    with tempfile.TemporaryDirectory(prefix="plexus-bench-docker-") as tmp:
        world = World(Path(tmp) / "world")
        d = None
        try:
            agent = world.add_host("host1", start_agent=False)
            d = Dockerd(Path(tmp) / "docker", netns="host1",
                        plugins={"plexus": agent.docker_socket})
            agent.start(extra=["--docker-api", str(d.socket)])
            d.start()
            d.import_busybox()
            d.import_iperf3()
            d.network_create("pxnet", driver="plexus", ipam_driver="plexus",
                             subnet="10.110.0.0/24")
            d.network_create("dknet", subnet="10.111.0.0/24")
            times = run_rm_times(d, args.runs)
            gbps = {"plexus": iperf(d, "pxnet", args.seconds),
                    "docker bridge": iperf(d, "dknet", args.seconds)}
        finally:
            if d is not None:
                d.stop(check=False)
            world.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print_table(("network", "p50 ms", "min ms", "max ms", "cost vs none (p50) ms"), [
        (k, f"{med[k]:.0f}", f"{min(v):.0f}", f"{max(v):.0f}",
         f"{med[k] - med['none']:.0f}" if k != "none" else "-") for k, v in times.items()
    ], title="docker run --rm busybox true")
    cost_px, cost_dk = med["plexus"] - med["none"], med["docker bridge"] - med["none"]
    if cost_dk > 0:
        print(f"\n  network cost: plexus {cost_px:.0f} ms, docker bridge {cost_dk:.0f} ms, "
              f"ratio {cost_px / cost_dk:.2f}x (target <= 1.0x)")
    print()
    print_table(("TCP single stream", "Gbit/s"), [(k, f"{v:.2f}") for k, v in gbps.items()],
                title="iperf3 between two containers")
    print(f"\n  plexus / docker bridge: {gbps['plexus'] / gbps['docker bridge']:.2f}x "
          "(target >= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

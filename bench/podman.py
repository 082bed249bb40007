"""`podman run --rm IMAGE true` wall time: a plexus CNI network against Podman's default netavark
network and against `--network none`. The network's cost is (with network) - (none).

    tests/sandbox .venv/bin/python bench/podman.py [--runs 15]

Both Podman installations run in the simulated host's namespace (next to the plexus agent), with
the same locally imported busybox image; runs are interleaved so load affects all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import header, percentile, print_table, require_sandbox

from plexus.cni.install import install
from tests.harness.podman import Podman, bridge_plugins
from tests.harness.world import World

NET = "pxbench"


def measure(runs: int, tmp: Path) -> dict[str, list[float]]:
    world = World(tmp / "world")
    try:
        agent = world.add_host("host1")
        install([str(tmp / "cni-bin")])
        with Podman(tmp / "pm-cni", netns="host1") as cni, \
                Podman(tmp / "pm-nv", netns="host1", backend="netavark") as nv:
            cni.add_plugin(tmp / "cni-bin" / "plexus")
            cni.write_conflist(NET, [{"type": "plexus", "socket": str(agent.socket),
                                      "subnets": ["10.71.0.0/24"],
                                      "capabilities": {"portMappings": True}}])
            # For context: the reference plugins through the same CNI backend.
            cni.write_conflist("refnet", bridge_plugins("refnet", "cni-ref0", "10.72.0.0/24",
                                                        ipam_dir=cni.ipam_dir))
            sides = {
                "plexus (CNI)": lambda: cni.run_rm(NET),
                "netavark": lambda: nv.run_rm(None),
                "reference CNI": lambda: cni.run_rm("refnet"),
                "none": lambda: cni.run_rm("none"),
            }
            for fn in sides.values():  # warm caches (image layers, plugin start-up)
                fn()
                fn()
            times: dict[str, list[float]] = {k: [] for k in sides}
            order = list(sides)
            for i in range(runs):
                k = i % len(order)
                for name in order[k:] + order[:k]:
                    times[name].append(sides[name]() * 1000)
        return times
    finally:
        world.close()


def main() -> int:
    if not require_sandbox("podman.py"):
        return 2
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    header("podman run --rm busybox true: plexus CNI network vs netavark vs --network none", [
        f"{args.runs} runs per side after 2 warm-ups, interleaved with rotating order",
        "reference CNI = bridge + host-local + portmap through the same CNI backend (context)",
        "Podman 4.3 (Debian), runc, both in the simulated host's netns next to the agent",
    ])
    with tempfile.TemporaryDirectory(prefix="plexus-bench-podman-") as tmp:
        times = measure(args.runs, Path(tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [(k, f"{med[k]:.0f}", f"{percentile(v, 90):.0f}", f"{min(v):.0f}",
             f"{med[k] - med['none']:.0f}" if k != "none" else "-") for k, v in times.items()]
    print_table(("network", "p50 ms", "p90 ms", "min ms", "cost vs none (p50) ms"), rows)
    cost_px = med["plexus (CNI)"] - med["none"]
    cost_nv = med["netavark"] - med["none"]
    print(f"\n  network cost: plexus {cost_px:.0f} ms, netavark {cost_nv:.0f} ms, "
          f"ratio {cost_px / cost_nv:.2f}x (target <= 0.25x)" if cost_nv > 0 else
          "\n  netavark cost not measurable in this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Agent memory: RSS of the plexus agent idle, then with 1,000 containers attached.

    tests/sandbox .venv/bin/python bench/memory.py [--count 1000]

The agent runs in host netns "host1" (world harness). Container namespaces are pre-created with
``ip -batch`` (untimed) and attached one by one through the API (POST /v1/endpoints), which also
gives the sustained attach rate. RSS is VmRSS from /proc/PID/status of the agent process itself
(``nsenter`` execs it, so the harness's pid is the agent's; checked against GET /v1/status).
Everything is detached again at the end. Only figures are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    header,
    host_links,
    logged_orphans,
    missing_veths,
    netns_batch,
    print_table,
    require_sandbox,
    vm_status,
)

from plexus.api.client import ApiError, Client
from tests.harness.world import World

NET, SUBNET = "mem", "10.88.0.0/20"  # 4,094 addresses
HOST = "host1"
SETTLE = 1.0  # seconds of quiet before each RSS reading


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def _veths(links: list[dict[str, Any]], prefix: str = "pxv") -> int:
    return sum(1 for ln in links if ln["ifname"].startswith(prefix))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="containers to attach (max 4000)")
    args = ap.parse_args(argv)
    if not require_sandbox("memory.py"):
        return 2
    count = max(1, min(args.count, 4000))
    checkpoints = sorted({count // 4, count // 2, 3 * count // 4, count} - {0})
    header("plexus agent memory (VmRSS) idle and with containers attached", [
        f"{count} containers attached one by one via POST /v1/endpoints to network {NET}"
        f" {SUBNET}; agent in netns {HOST}",
        f"RSS read from /proc/PID/status after {SETTLE:.0f}s of quiet; no peer is measured",
    ])
    rows: list[list[object]] = []
    names = [f"memc{i}" for i in range(count)]
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp, \
            World(Path(tmp) / "world") as world:
        agent = world.add_host(HOST)
        assert agent.proc is not None
        pid = agent.proc.pid
        client = Client(str(agent.socket))
        status = client.get("/v1/status")
        print(f"agent pid {pid} (GET /v1/status says {status.get('pid')}): {_cmdline(pid)}")
        if status.get("pid") not in (None, pid):
            print("  WARNING: the harness's pid is not the agent's; RSS below is of pid "
                  f"{status['pid']}")
            pid = int(status["pid"])

        def sample(label: str, containers: int, step_ms: str = "-") -> int:
            time.sleep(SETTLE)
            vm = vm_status(pid)
            rows.append([label, containers, vm["VmRSS"], f"{vm['VmRSS'] / 1024:.1f}",
                         vm["VmHWM"], step_ms])
            return vm["VmRSS"]

        sample("idle, just started", 0)
        client.post("/v1/networks", {"name": NET, "subnets": [SUBNET]})
        base = sample("idle, network created", 0)
        t0 = time.perf_counter()
        netns_batch("add", names)
        print(f"pre-created {count} namespaces in {time.perf_counter() - t0:.2f}s (untimed)")
        attached: list[int] = []
        attach_s = 0.0  # only the API calls, not the RSS samples
        step_start, step_s = 0, 0.0
        peak = base
        try:
            for i in range(count):
                body = {"container_id": f"memc{i}", "network": NET,
                        "netns": f"/run/netns/memc{i}", "ifname": "eth0"}
                t = time.perf_counter()
                try:
                    client.post("/v1/endpoints", body)
                    attached.append(i)
                except ApiError as exc:
                    errors.append(f"attach memc{i}: {exc.status} {exc.kind}: {exc.message}")
                attach_s += time.perf_counter() - t
                step_s += time.perf_counter() - t
                if i + 1 in checkpoints:
                    step_ms = f"{1000 * step_s / (i + 1 - step_start):.1f}"
                    peak = sample(f"{i + 1} attached", len(attached), step_ms)
                    step_start, step_s = i + 1, 0.0
            links = host_links(HOST)
            eps = client.get("/v1/endpoints")
            veths_at_peak, eps_at_peak = _veths(links), len(eps)
            missing = missing_veths(eps, links)
            t = time.perf_counter()
            for i in attached:
                try:
                    client.post("/v1/endpoints/detach", {"container_id": f"memc{i}",
                                                         "network": NET})
                except ApiError as exc:
                    errors.append(f"detach memc{i}: {exc.status} {exc.kind}: {exc.message}")
            detach_s = time.perf_counter() - t
            sample("all detached again", 0)
            veths_after = _veths(host_links(HOST))
            orphans = logged_orphans(agent.log)
        finally:
            netns_batch("del", names)
    print_table(["agent", "containers", "VmRSS KiB", "VmRSS MiB", "VmHWM KiB",
                 "ms/attach in step"], rows, "agent memory")
    n = max(1, len(attached))
    per = (peak - base) / n
    summary = [
        ["RSS at 0 containers (network created)", f"{base} KiB"],
        [f"RSS at {len(attached)} containers", f"{peak} KiB"],
        ["RSS per container", f"{per:.1f} KiB"],
        [f"attach {len(attached)} (sequential API calls)",
         f"{attach_s:.1f} s = {len(attached) / attach_s:.0f} containers/s"
         f" ({1000 * attach_s / n:.1f} ms each)"],
        [f"detach {len(attached)}",
         f"{detach_s:.1f} s = {len(attached) / detach_s:.0f} containers/s"
         f" ({1000 * detach_s / n:.1f} ms each)"],
        ["endpoints / pxv* veths at peak", f"{eps_at_peak} / {veths_at_peak}"],
        ["endpoints missing their veth at peak", str(len(missing))],
        ["links deleted as 'orphans' by reconcile (log)", str(len(orphans))],
        ["pxv* veths left after detaching all", str(veths_after)],
        ["API errors", str(len(errors))],
    ]
    print_table(["figure", "value"], summary, "summary", "ll")
    for e in errors[:5]:
        print(f"  error: {e}")
    for m in missing[:5]:
        print(f"  endpoint without its veth at peak: {m}")
    if orphans:
        print("  reconcile deleted as orphans: "
              + ", ".join(f"{n} at {w:%H:%M:%S}" for w, n in orphans[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

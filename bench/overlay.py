"""TCP single-stream throughput and ping RTT between containers on two hosts over plexus's VXLAN
overlay, against a bare VXLAN pair and the underlay alone, on the same underlay segment.

    tests/sandbox .venv/bin/python bench/overlay.py [--seconds 3] [--rounds 3]

Two simulated hosts (namespaces) on one underlay segment (tests/harness/overlay.py: a bridge
"switch", a veth per host, MTU 1500). Sides, all over that segment:

- overlay: a container on each host (veth into the host's network bridge, the bridge routes
  into the VXLAN device that plexus's overlay applier programmed), tx checksum offload off on
  the VXLAN devices (plexus's default);
- overlay, offload on: the same with ``offload=True`` (what the default costs);
- bare vxlan: a VXLAN device with a static remote in each host namespace, iperf3 between the
  hosts themselves (no bridge, no veth, no routing between them), kernel defaults;
- underlay: iperf3 between the hosts' underlay addresses.

Rounds rotate the order of the sides; best and median of each are compared.

Then the control plane's cost at scale: one host programmed with ``--hosts`` remote hosts of two
blocks each (their underlay addresses lead nowhere: only the kernel's tables matter here), timed
for the first sync, a sync that changes nothing, and a remote host added and removed with
``render.host_delta`` and ``update``; with the requests each sent. Only figures are printed;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from _common import header, print_table, require_sandbox

from plexus.dataplane.overlay import render
from plexus.dataplane.overlay.apply import OverlayApplier
from plexus.dataplane.overlay.model import HostVtep, OverlaySpec, RemoteHost
from plexus.dataplane.overlay.render import OverlayDelta, desired
from tests.harness.overlay import Lab, member
from tests.harness.world import nsexec, ping_rtt_ms

PORT = 5201
SPEC = OverlaySpec("bench", "be0c0a1a2b3c4d5e", vni=100)
BLOCKS = {1: ipaddress.ip_network("10.100.1.0/26"), 2: ipaddress.ip_network("10.100.2.0/26")}
BARE = {1: "10.77.0.1", 2: "10.77.0.2"}
MTU = 1450


def iperf(client_ns: str, server_ip: str, seconds: int) -> tuple[float, int]:
    """(Gbit/s received, retransmits) of one iperf3 run."""
    r = nsexec(client_ns, "iperf3", "-c", server_ip, "-p", str(PORT), "-t", str(seconds),
               "-O", "1", "-J", check=False, timeout=seconds + 30)
    data: dict[str, Any] = json.loads(r.stdout) if r.stdout.strip() else {}
    if r.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 to {server_ip} failed: {data.get('error', r.stderr)}")
    end = data["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0))


async def program(hosts: dict[int, str], offload: bool) -> None:
    """The overlay on both hosts, each with the other as its remote."""
    spec = replace(SPEC, offload=offload)
    for n, other in ((1, 2), (2, 1)):
        applier = OverlayApplier(f"/run/netns/{hosts[n]}")
        try:
            local = HostVtep(f"node{n}", ipaddress.ip_address(f"192.0.2.{n}"), 1500,
                             (BLOCKS[n],))
            remote = RemoteHost(f"node{other}", ipaddress.ip_address(f"192.0.2.{other}"),
                                (BLOCKS[other],))
            await applier.sync(desired(spec, local, [remote]))
        finally:
            applier.close()


def build(lab: Lab) -> tuple[dict[int, str], dict[int, str]]:
    """Two hosts with a bare VXLAN pair, a network bridge and a container each; iperf3 -s in
    host 2 and in its container."""
    hosts = {n: lab.host(n) for n in (1, 2)}
    containers = {}
    for n, host in hosts.items():
        lab.bridge(host, "pxbr-bench", [BLOCKS[n]], MTU)
        containers[n] = lab.container(host, "pxbr-bench", f"c{n}", [member(BLOCKS[n], 0)], MTU)
        other = 3 - n
        nsexec(host, "ip", "link", "add", "vxbare", "type", "vxlan", "id", "99", "local",
               f"192.0.2.{n}", "remote", f"192.0.2.{other}", "dstport", "4790")
        nsexec(host, "ip", "addr", "add", f"{BARE[n]}/24", "dev", "vxbare")
        nsexec(host, "ip", "link", "set", "vxbare", "up")
    for ns in (hosts[2], containers[2]):
        lab.servers.append(subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", "--", "iperf3", "-s", "-p", str(PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    return hosts, containers


def measure(sides: dict[str, tuple[str, str]], seconds: int, rounds: int,
            switch: dict[str, bool], hosts: dict[int, str]) -> dict[str, list[float]]:
    """Gbit/s of each side, rounds rotating their order (the offload sides reprogram first)."""
    gbits: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name in switch:
                asyncio.run(program(hosts, switch[name]))
            client, server = sides[name]
            got, retransmits = iperf(client, server, seconds)
            gbits[name].append(got)
            print(f"  round {r + 1}: {name:<20} {got:6.2f} Gbit/s  retransmits {retransmits}")
    return gbits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=3, help="iperf3 -t (plus 1 s omitted)")
    ap.add_argument("--rounds", type=int, default=3, help="runs per side, rotating")
    ap.add_argument("--hosts", type=int, default=1000, help="remote hosts for the scale part")
    args = ap.parse_args(argv)
    if not require_sandbox("overlay.py"):
        return 2
    seconds, rounds = max(1, args.seconds), max(1, min(args.rounds, 10))
    header("VXLAN overlay: containers on two hosts vs bare VXLAN vs the underlay", [
        f"iperf3 -t {seconds} -O 1 -J, {rounds} round(s) per side, rotating order",
        "overlay: container -> bridge -> routed into pxvx (offload off / on) -> underlay",
        "bare vxlan: host -> vxlan device with a static remote -> underlay",
        "underlay: host -> host over the segment (MTU 1500)",
    ])
    lab = Lab(prefix="bo")
    try:
        hosts, containers = build(lab)
        asyncio.run(program(hosts, offload=False))
        overlay = (containers[1], str(member(BLOCKS[2], 0).ip))
        sides = {"overlay": overlay, "overlay, offload on": overlay,
                 "bare vxlan": (hosts[1], BARE[2]), "underlay": (hosts[1], "192.0.2.2")}
        switch = {"overlay": False, "overlay, offload on": True}
        gbits = measure(sides, seconds, rounds, switch, hosts)
        asyncio.run(program(hosts, offload=False))
        rtt = {name: ping_rtt_ms(client, server, count=20) for name, (client, server)
               in sides.items() if name != "overlay, offload on"}
    finally:
        lab.close()
    report(gbits, rtt)
    scale(max(2, min(args.hosts, 16000)))
    return 0


def remotes(count: int) -> list[RemoteHost]:
    """``count`` remote hosts with two /26 blocks each, carved from 10.128.0.0/9."""
    base, under = int(ipaddress.ip_address("10.128.0.0")), int(ipaddress.ip_address("198.18.0.1"))
    return [RemoteHost(f"far{i}", ipaddress.ip_address(under + i), tuple(
        ipaddress.ip_network(f"{ipaddress.ip_address(base + 128 * i + 64 * j)}/26")
        for j in (0, 1))) for i in range(count)]


async def timed_syncs(applier: OverlayApplier, count: int) -> list[list[object]]:
    local = HostVtep("node1", ipaddress.ip_address("192.0.2.1"), 1500, (BLOCKS[1],))
    everyone = remotes(count + 1)
    extra = everyone[-1]

    async def full() -> OverlayDelta:
        return await applier.sync(desired(SPEC, local, everyone[:count]))

    async def one(old: RemoteHost | None, new: RemoteHost | None) -> OverlayDelta:
        dev = render.device(SPEC, local)
        delta = render.host_delta(SPEC.vni, dev, old, new)
        if not await applier.update(delta):
            raise RuntimeError("update refused")
        return delta

    steps = [("first sync (render + sync)", full), ("sync, nothing to change", full),
             ("update: one host more", lambda: one(None, extra)),
             ("update: one host less", lambda: one(extra, None)),
             ("sync after both", full)]
    rows: list[list[object]] = []
    for label, step in steps:
        sent = applier.counters()
        start = time.perf_counter()
        delta = await step()
        ms = (time.perf_counter() - start) * 1000
        now = applier.counters()
        rows.append([label, f"{ms:.1f}", len(delta), now[0] - sent[0], now[1] - sent[1]])
    return rows


def scale(count: int) -> None:
    lab = Lab(prefix="bs")
    try:
        host = lab.host(1)
        applier = OverlayApplier(f"/run/netns/{host}")
        try:
            rows = asyncio.run(timed_syncs(applier, count))
        finally:
            applier.close()
        kernel = [len(nsexec(host, *argv).stdout.splitlines()) for argv in (
            ("bridge", "fdb", "show", "dev", "pxvx-be0c0a1a2b"),
            ("ip", "neigh", "show", "dev", "pxvx-be0c0a1a2b"),
            ("ip", "route", "show", "proto", "112"))]
    finally:
        lab.close()
    print_table(["step", "ms", "changes", "requests sent", "of them changes"], rows,
                f"one host, {count} remote hosts of 2 blocks each (kernel: {kernel[0]} fdb, "
                f"{kernel[1]} neigh, {kernel[2]} routes)")


def report(gbits: dict[str, list[float]], rtt: dict[str, float | None]) -> None:
    best = {name: max(v) for name, v in gbits.items()}
    median = {name: statistics.median(v) for name, v in gbits.items()}

    def row(label: str, v: dict[str, float]) -> list[object]:
        return [label, *(f"{v[n]:.2f}" for n in gbits),
                f"{v['overlay'] / v['bare vxlan']:.3f}", f"{v['overlay'] / v['underlay']:.3f}"]

    print_table(["TCP single stream, Gbit/s", *gbits, "overlay/bare vxlan", "overlay/underlay"],
                [row("best", best), row("median", median)], "throughput (higher is better)")
    rows = [[name, "-" if ms is None else f"{ms:.3f}"] for name, ms in rtt.items()]
    print_table(["ping RTT (20 pings, 50 ms apart)", "avg ms"], rows, "latency (lower is better)")


if __name__ == "__main__":
    sys.exit(main())

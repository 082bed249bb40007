"""DNS: plexus's resolver against aardvark-dns, same 1,000-container record set, dnsperf from a
container namespace.

    tests/sandbox .venv/bin/python bench/dns.py [--containers 1000] [--seconds 6] [--rounds 5]
                                                [--workers 1] [--no-pin]

Topology (inside the sandbox): a bridge in the sandbox's own namespace (the "host") carrying two
gateway addresses, 10.90.0.1 for plexus and 10.90.0.2 for aardvark-dns, and a client namespace
("the container") attached to it by a veth, 10.90.255.254, registered in both record sets as a
container so that both servers take their normal path for a known client. Both servers run at
the same time; they are measured in turn, the order rotating each round.

Record set: N containers c0..cN-1, each with an alias cI-alias and one IPv4 address. plexus gets
it as networks + endpoints (``DnsService``, which runs its server in ``--workers`` processes, or
with ``--workers 0`` in this process's own uvloop event loop, as the agent would);
aardvark-dns gets it in its own config directory format (one file per network: a first line with
the bind address, then "ID IPV4 IPV6 NAME,ALIAS" per container, as netavark writes it).

Measurements, each with the same dnsperf arguments for both sides (dnsperf pinned to CPU 0 and
the servers to CPU 1 unless --no-pin: "dnsperf taking one core"):
  throughput   dnsperf -c 8 -q 100 for --seconds: queries/s, average latency;
  p99          the same load with -v (per-query latencies; dnsperf is slower then, same for both);
  latency      a fixed 10,000 queries/s with -v: p50, average and p99 where neither side
               saturates.
Before measuring, a few names are asked of both servers and must give the same, expected
address (the two record sets really are the same).
Queries/s is reported as the best and the median round; latencies and CPU as medians over the
rounds (other jobs on a shared machine only ever slow a round down). The CPU time each server
used per query (user/system, from /proc) shows where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop
from _common import header, percentile, print_table, ratio, require_sandbox, sh

from plexus.dataplane.netns import run_in_netns
from plexus.dns import DnsService, DnsSettings, ListenAddress
from plexus.dns.wire import QType, build_query, parse_records
from plexus.model.types import Endpoint, Network, Subnet

AARDVARK = "/usr/lib/podman/aardvark-dns"
BRIDGE = "pxdnsbench0"
CLIENT_NS = "dnsbench-client"
SUBNET = ipaddress.ip_network("10.90.0.0/16")
PLEXUS_IP, AARDVARK_IP, CLIENT_IP = "10.90.0.1", "10.90.0.2", "10.90.255.254"
NETWORK = "bench"
CLIENTS, OUTSTANDING, FIXED_QPS = 8, 100, 10000
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    side: str
    qps: float
    avg_ms: float
    lost: int
    cpu_user: float = 0.0
    cpu_sys: float = 0.0
    p99_ms: float = float("nan")
    fixed_p50_ms: float = float("nan")
    fixed_avg_ms: float = float("nan")
    fixed_p99_ms: float = float("nan")


def address(i: int) -> str:
    return str(SUBNET[4 * 256 + i + 1])  # 10.90.4.1 upwards


def records(n: int) -> tuple[Network, list[Endpoint]]:
    net = Network(NETWORK, "dnsbench", subnets=(Subnet(SUBNET, ipaddress.ip_address(PLEXUS_IP)),))
    eps = [Endpoint(f"{i:012x}{'c' * 52}", "eth0", NETWORK, "bench", "",
                    addresses=(ipaddress.ip_interface(f"{address(i)}/16"),), name=f"c{i}",
                    aliases=(f"c{i}-alias",), state="ready") for i in range(n)]
    eps.append(Endpoint("f" * 64, "eth0", NETWORK, "bench", f"/run/netns/{CLIENT_NS}",
                        addresses=(ipaddress.ip_interface(f"{CLIENT_IP}/16"),), name="dnsperf",
                        state="ready"))
    return net, eps


def aardvark_config(directory: Path, eps: list[Endpoint]) -> None:
    lines = [AARDVARK_IP]
    for ep in eps:
        names = ",".join([ep.name, *ep.aliases])
        lines.append(f"{ep.container_id} {ep.addresses[0].ip}  {names}")
    (directory / NETWORK).write_text("\n".join(lines) + "\n")


def query_file(path: Path, n: int) -> None:
    lines = [f"c{i} A\nc{i}-alias A\n" for i in range(n)]
    path.write_text("".join(lines))


def topology() -> None:
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    for ip in (PLEXUS_IP, AARDVARK_IP):
        sh("ip", "addr", "add", f"{ip}/16", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    sh("ip", "netns", "add", CLIENT_NS)
    sh("ip", "link", "add", "dnsb-h", "type", "veth", "peer", "name", "eth0", "netns", CLIENT_NS)
    sh("ip", "link", "set", "dnsb-h", "master", BRIDGE, "up")
    ns = ("ip", "netns", "exec", CLIENT_NS)
    sh(*ns, "ip", "addr", "add", f"{CLIENT_IP}/16", "dev", "eth0")
    sh(*ns, "ip", "link", "set", "eth0", "up")
    sh(*ns, "ip", "link", "set", "lo", "up")


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    user = system = 0.0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            user += int(fields[11]) / TICKS
            system += int(fields[12]) / TICKS
    return user, system


def dnsperf(server: str, qfile: Path, seconds: float, pin: bool, verbose: bool = False,
            rate: int = 0) -> tuple[dict[str, float], list[float]]:
    argv = ["ip", "netns", "exec", CLIENT_NS]
    argv += ["taskset", "-c", "0"] if pin else []
    argv += ["dnsperf", "-s", server, "-d", str(qfile), "-l", str(seconds), "-c", str(CLIENTS),
             "-q", str(OUTSTANDING), "-T", "1"]
    argv += ["-v"] if verbose else []
    argv += ["-Q", str(rate)] if rate else []
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    stats: dict[str, float] = {}
    for key, pattern in (("qps", r"Queries per second:\s+([\d.]+)"),
                         ("avg", r"Average Latency \(s\):\s+([\d.]+)"),
                         ("lost", r"Queries lost:\s+(\d+)")):
        m = re.search(pattern, out)
        stats[key] = float(m.group(1)) if m else float("nan")
    latencies = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                 if line.startswith("> ")] if verbose else []
    return stats, latencies


def check_answers(server: str, eps: list[Endpoint]) -> None:
    """Ask ``server`` from the client namespace for a few names; each must give its address."""
    for ep in (eps[0], eps[len(eps) // 2], eps[-2]):
        for name in (ep.name, *ep.aliases):
            query = build_query(name, QType.A, 4242)
            sock = run_in_netns(f"/run/netns/{CLIENT_NS}",
                                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            with sock:
                sock.settimeout(2)
                sock.sendto(query, (server, 53))
                _, records = parse_records(sock.recv(4096))
            got = [r.data for r in records if r.section == "answer"]
            if got != [str(ep.addresses[0].ip)]:
                raise RuntimeError(f"{server} answers {got} for {name}, expected "
                                   f"{ep.addresses[0].ip}")


def wait_answering(server: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    probe = Path(tempfile.mkstemp(prefix="dnsprobe")[1])
    probe.write_text("c0 A\n")
    try:
        while time.monotonic() < deadline:
            stats, _ = dnsperf(server, probe, 1, False)
            if stats["qps"] > 0 and stats["lost"] == 0:
                return
            time.sleep(0.2)
    finally:
        probe.unlink()
    raise TimeoutError(f"{server} does not answer")


def start_aardvark(config: Path, pin: bool) -> subprocess.Popen[bytes]:
    argv = (["taskset", "-c", "1"] if pin else []) + [AARDVARK, "--config", str(config), "-p",
                                                        "53", "run"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def aardvark_pids(proc: subprocess.Popen[bytes], config: Path) -> list[int]:
    pidfile = config / "aardvark.pid"
    pids = {proc.pid}
    if pidfile.exists() and pidfile.read_text().strip().isdigit():
        pids.add(int(pidfile.read_text().strip()))
    return [p for p in pids if Path(f"/proc/{p}").exists()]


async def measure(side: str, server: str, pids: list[int], qfile: Path, seconds: float,
                  pin: bool) -> Result:
    def run() -> Result:
        u0, s0 = cpu_seconds(pids)
        stats, _ = dnsperf(server, qfile, seconds, pin)
        u1, s1 = cpu_seconds(pids)
        result = Result(side, stats["qps"], stats["avg"] * 1000, int(stats["lost"]),
                        u1 - u0, s1 - s0)
        _, lat = dnsperf(server, qfile, max(2.0, seconds / 2), pin, verbose=True)
        result.p99_ms = percentile(lat, 99) * 1000
        _, fixed = dnsperf(server, qfile, max(2.0, seconds / 2), pin, verbose=True,
                           rate=FIXED_QPS)
        result.fixed_p50_ms = percentile(fixed, 50) * 1000
        result.fixed_avg_ms = statistics.fmean(fixed) * 1000 if fixed else float("nan")
        result.fixed_p99_ms = percentile(fixed, 99) * 1000
        return result

    return await asyncio.to_thread(run)


async def bench(args: argparse.Namespace, work: Path) -> dict[str, list[Result]]:
    net, eps = records(args.containers)
    qfile = work / "queries.txt"
    query_file(qfile, args.containers)
    config = work / "aardvark"
    config.mkdir()
    aardvark_config(config, eps)
    topology()
    if args.pin:
        os.sched_setaffinity(0, {1})  # plexus's worker processes inherit it
    service = DnsService(DnsSettings(upstreams=()), workers=args.workers)
    await service.start()
    t0 = time.perf_counter()
    service.update([net], eps)
    build_ms = (time.perf_counter() - t0) * 1000
    errors = await service.set_listeners([ListenAddress(NETWORK, PLEXUS_IP, 53)])
    if errors:
        raise RuntimeError(errors)
    if args.pin:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    aard = start_aardvark(config, args.pin)
    results: dict[str, list[Result]] = {"plexus": [], "aardvark-dns": []}
    try:
        await asyncio.to_thread(wait_answering, PLEXUS_IP)
        await asyncio.to_thread(wait_answering, AARDVARK_IP)
        for ip in (PLEXUS_IP, AARDVARK_IP):
            await asyncio.to_thread(check_answers, ip, eps)
        stats = await service.stats()
        plexus_pids = list(stats.get("workers", {}).get("pids", [])) or [os.getpid()]
        print(f"records: {args.containers} containers, {service.table.record_count()} plexus "
              f"names (table built in {build_ms:.0f} ms); plexus workers: {args.workers}")
        sides = [("plexus", PLEXUS_IP), ("aardvark-dns", AARDVARK_IP)]
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side, ip in order:
                pids = plexus_pids if side == "plexus" else aardvark_pids(aard, config)
                res = await measure(side, ip, pids, qfile, args.seconds, args.pin)
                results[side].append(res)
                print(f"  round {r + 1} {side:13} {res.qps:9.0f} q/s  avg {res.avg_ms:.3f} ms  "
                      f"p99 {res.p99_ms:.3f} ms  lost {res.lost}", flush=True)
        final = await service.stats()
        q = final.get("queries", {})
        print(f"plexus counters: {q.get('total', 0)} queries, {q.get('fast_path', 0)} on the "
              f"fast path; responses {final.get('responses', {})}")
    finally:
        aard.send_signal(signal.SIGTERM)
        for pid in aardvark_pids(aard, config):
            os.kill(pid, signal.SIGTERM)
        try:
            aard.wait(5)
        except subprocess.TimeoutExpired:
            aard.kill()
        await service.close()
    return results


def report(results: dict[str, list[Result]], seconds: float) -> None:
    """qps: best and median round; latencies and CPU: the median over rounds (one bad round on a
    shared machine moves neither)."""
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for side, rs in results.items():
        if not rs:
            continue

        def med(values: list[float]) -> float:
            return statistics.median(values) if values else float("nan")

        s = summary[side] = {
            "best": max(r.qps for r in rs), "median": med([r.qps for r in rs]),
            "avg": med([r.avg_ms for r in rs]), "p99": med([r.p99_ms for r in rs]),
            "favg": med([r.fixed_avg_ms for r in rs]), "fp99": med([r.fixed_p99_ms for r in rs]),
            "fp50": med([r.fixed_p50_ms for r in rs]),
            "usr": med([r.cpu_user / max(r.qps * seconds, 1) * 1e6 for r in rs]),
            "sys": med([r.cpu_sys / max(r.qps * seconds, 1) * 1e6 for r in rs]),
            "lost": sum(r.lost for r in rs),
        }
        rows.append([side, f"{s['best']:.0f}", f"{s['median']:.0f}", f"{s['avg']:.3f}",
                     f"{s['p99']:.3f}", f"{s['fp50']:.3f}", f"{s['favg']:.3f}", f"{s['fp99']:.3f}",
                     int(s["lost"]),
                     f"{s['usr']:.1f} + {s['sys']:.1f}"])
    print_table(["server", "q/s best", "q/s median", "avg ms", "p99 ms",
                 f"p50 ms @{FIXED_QPS // 1000}k", f"avg ms @{FIXED_QPS // 1000}k",
                 f"p99 ms @{FIXED_QPS // 1000}k", "lost",
                 "cpu µs/query usr + sys"], rows,
                title=f"{len(next(iter(results.values())))} rounds (saturated: dnsperf -c "
                      f"{CLIENTS} -q {OUTSTANDING} -T 1; latencies and CPU: medians)")
    p, a = summary.get("plexus"), summary.get("aardvark-dns")
    if p and a:
        print(f"\nplexus / aardvark-dns: queries/s {ratio(p['best'], a['best'])} (best), "
              f"{ratio(p['median'], a['median'])} (median); latency (lower is better): avg "
              f"{ratio(p['avg'], a['avg'])}, p99 {ratio(p['p99'], a['p99'])}; at "
              f"{FIXED_QPS} q/s p50 {ratio(p['fp50'], a['fp50'])}, "
              f"avg {ratio(p['favg'], a['favg'])}, "
              f"p99 {ratio(p['fp99'], a['fp99'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args()
    if not require_sandbox("dns.py"):
        return 1
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    header("DNS: plexus vs aardvark-dns (dnsperf from a container namespace)", [
        f"{args.containers} containers, {args.rounds} rounds x {args.seconds:g} s, "
        f"dnsperf {'on CPU 0, servers on CPU 1' if args.pin else 'unpinned'}",
        f"aardvark-dns {sh(AARDVARK, '--version', check=False).stdout.strip().split()[-1]}, "
        f"dnsperf {_dnsperf_version()}, Python {sys.version.split()[0]} + uvloop"])
    with tempfile.TemporaryDirectory(prefix="plexus-dnsbench-") as tmp:
        results = uvloop.run(bench(args, Path(tmp)))
    report(results, args.seconds)
    return 0


def _dnsperf_version() -> str:
    r = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True)
    m = re.search(r"Version ([\d.]+)", r.stdout + r.stderr)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    sys.exit(main())

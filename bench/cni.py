"""CNI plugin latency and parallel churn: plexus's installed shim against the reference CNI
``bridge`` plugin with ``host-local`` IPAM (isGateway, ipMasq), both executed as a runtime
executes them: fork+exec+wait of the plugin binary in the host netns "host1" (where the agent
runs), CNI_* in the environment, the config on stdin, the result on stdout.

    tests/sandbox .venv/bin/python bench/cni.py [--count 200] [--warmup 5] [--churn 500]
                                                [--parallel 8] [--startup 30] [--api-every 4]
                                                [--no-api]

Phases, all in one run, so that both sides are measured on the same machine at the same time:
  start-up   VERSION (the shim alone: interpreter start + its imports), STATUS with a 1.1.0
             config (+ one round trip to the agent), a bare ``python -IS -c pass`` and the
             reference's own VERSION, interleaved;
  latency    ADD then DEL of --count containers per side (+ --warmup unmeasured first, which
             also creates the networks and the bridges), interleaved one container at a time
             with the first mover rotating, like bench/attach.py. A third, breakdown-only side
             (not a target) sends the shim's exact request, ``POST /v1/cni``, from this
             process, on every --api-every'th container: the agent's share of a plexus ADD/DEL
             without any process start;
  churn      --churn ADDs from --parallel workers (threads that entered host1, each forking
             the plugin), then as many DELs; containers/s. Each side churns alone (plexus,
             then the reference) so neither pays for the other's links.
CPU: plexus = the shim process + the agent and its children (DNS workers); reference = the
bridge plugin and the children it waits for (host-local, iptables).
Correctness is checked and reported (a failed check makes the exit status 1): every result a
valid 1.0.0 result in its subnet with a default route, no duplicate address, a veth per
container after the churn's ADDs, and nothing left after DEL (no pxv* veths, GET /v1/endpoints
empty, no IPAM rows in the agent's store, an empty host-local dataDir, no reference veths or
CNI-* masquerade chains).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    CNI_PATH,
    CniResult,
    bridge_config,
    header,
    host_links,
    in_netns,
    netns_batch,
    percentile,
    print_table,
    ratio,
    require_sandbox,
    sh,
)

from plexus.api.client import Client
from plexus.cni import shim
from plexus.cni.install import install, interpreter
from tests.harness.world import World

HOST = "host1"
HOST_NS = f"/run/netns/{HOST}"
PX_NET, PX_SUBNET = "bench", "10.88.0.0/16"
API_NET, API_SUBNET = "benchapi", "10.87.0.0/16"  # breakdown side: its own network and bridge
REF_NET, REF_BRIDGE, REF_SUBNET = "refnet", "cni-ref0", "10.77.0.0/16"
VERSION = "1.0.0"  # the newest version the reference plugins speak
TIMEOUT = 60.0
TARGET_ADD, TARGET_DEL = 0.50, 0.30  # plexus p50 / reference p50


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants (the agent's DNS worker processes, and any
    child it has waited for): utime + stime + cutime + cstime of each, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total / os.sysconf("SC_CLK_TCK")


def run_plugin(binary: str | Path, command: str, config: dict[str, Any], container_id: str = "",
               netns: str = "", cni_path: str = CNI_PATH, ifname: str = "eth0") -> CniResult:
    """fork+exec+wait of a CNI plugin as a runtime does it, timed from before the fork to after
    the wait. It runs in the calling *thread's* netns (see ``in_netns``)."""
    env = {"CNI_COMMAND": command, "CNI_PATH": cni_path,
           "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    if command in ("ADD", "DEL", "CHECK"):
        env.update({"CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname})
    data = json.dumps(config)
    t0 = time.perf_counter()
    r = subprocess.run([str(binary)], input=data, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    return CniResult(time.perf_counter() - t0, r.returncode, r.stdout, r.stderr)


def run_argv(argv: list[str]) -> CniResult:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                       stdin=subprocess.DEVNULL)
    return CniResult(time.perf_counter() - t0, r.returncode, r.stdout, r.stderr)


# --- the sides -------------------------------------------------------------------------------


@dataclass
class Side:
    """One way of attaching containers: how to run a verb, where its containers live, and what
    was measured."""

    name: str
    tag: str  # container id and netns prefix
    subnet: str
    call: Callable[[str, str, str], CniResult]  # (verb, container id, netns path)
    cpu_clock: Callable[[], float]  # CPU seconds this side's work shows up in
    agent_clock: Callable[[], float] | None = None  # the agent's share of cpu_clock
    every: int = 1  # takes part in every n-th container of the latency phase only
    add: list[float] = field(default_factory=list)
    delete: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def netns(self, i: int) -> str:
        return f"/run/netns/{self.tag}{i}"

    def run(self, verb: str, cid: str, i: int) -> CniResult | None:
        """One verb; on success the ADD result is validated and its address kept."""
        try:
            r = self.call(verb, cid, self.netns(i))
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            self.errors.append(f"{verb} {cid}: {exc!r}")
            return None
        if r.returncode != 0:
            self.errors.append(f"{verb} {cid}: rc={r.returncode} {r.stdout.strip()} "
                               f"{r.stderr.strip()}"[:300])
            return None
        if verb == "ADD":
            problem, address = validate(r.stdout, self.subnet, self.netns(i))
            if problem:
                self.invalid.append(f"{cid}: {problem}")
            self.addresses.append(address)
        elif r.stdout.strip():
            self.invalid.append(f"{verb} {cid}: unexpected output {r.stdout[:100]!r}")
        return r


def validate(stdout: str, subnet: str, netns: str) -> tuple[str, str]:
    """("" or what is wrong, the container's address) for a CNI 1.0.0 ADD result."""
    try:
        res = json.loads(stdout)
    except ValueError:
        return f"not JSON: {stdout[:80]!r}", ""
    if not isinstance(res, dict):
        return "not an object", ""
    if res.get("cniVersion") != VERSION:
        return f"cniVersion {res.get('cniVersion')!r}", ""
    ips, ifaces = res.get("ips") or [], res.get("interfaces") or []
    if len(ips) != 1:
        return f"{len(ips)} ips", ""
    ip = ips[0]
    address = str(ip.get("address", ""))
    net = ipaddress.ip_network(subnet)
    try:
        iface = ipaddress.ip_interface(address)
    except ValueError:
        return f"bad address {address!r}", ""
    if iface.ip not in net or iface.network.prefixlen != net.prefixlen:
        return f"{address} not in {subnet}", address
    if ip.get("gateway") != str(net.network_address + 1):
        return f"gateway {ip.get('gateway')!r}", address
    idx = ip.get("interface")
    if not isinstance(idx, int) or not 0 <= idx < len(ifaces):
        return f"interface index {idx!r} of {len(ifaces)}", address
    if ifaces[idx].get("sandbox") != netns or ifaces[idx].get("name") != "eth0":
        return f"interface {ifaces[idx]!r}", address
    if not any(r.get("dst") == "0.0.0.0/0" for r in res.get("routes") or []):
        return "no default route", address
    return "", address


def shim_side(name: str, tag: str, plugin: Path, plugin_dir: Path, config: dict[str, Any],
              subnet: str, agent_pid: int) -> Side:
    path = f"{plugin_dir}:{CNI_PATH}"

    def call(verb: str, cid: str, netns: str) -> CniResult:
        return run_plugin(plugin, verb, config, cid, netns, path)

    return Side(name, tag, subnet, call, lambda: _children_cpu() + _proc_cpu(agent_pid),
                lambda: _proc_cpu(agent_pid))


def reference_side(data_dir: Path) -> Side:
    config = bridge_config(REF_NET, REF_BRIDGE, REF_SUBNET, str(data_dir), ip_masq=True)

    def call(verb: str, cid: str, netns: str) -> CniResult:
        return run_plugin(os.path.join(CNI_PATH, "bridge"), verb, config, cid, netns)

    return Side("reference", "refc", REF_SUBNET, call, _children_cpu)


def api_side(socket_path: str, config: dict[str, Any], agent_pid: int, every: int) -> Side:
    """The shim's own request, sent by this process with the shim's own code: no fork, no
    interpreter start, no validation in the shim."""

    def call(verb: str, cid: str, netns: str) -> CniResult:
        env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
        body: dict[str, object] = {"argv0": "plexus", "env": env, "stdin": json.dumps(config)}
        t0 = time.perf_counter()
        code, out = shim.call_agent(socket_path, body)
        return CniResult(time.perf_counter() - t0, code, out, "")

    return Side("agent only", "apic", API_SUBNET, call, lambda: _proc_cpu(agent_pid),
                every=every)


# --- phases ----------------------------------------------------------------------------------


def startup(n: int, plugin: Path, ref_bridge: str, socket_path: str,
            ) -> dict[str, list[float]]:
    """Start-up cost: ``n`` interleaved samples of each probe, in host1."""
    status_conf = {"cniVersion": "1.1.0", "name": PX_NET, "type": "plexus", "socket": socket_path}
    probes: list[tuple[str, Callable[[], CniResult]]] = [
        ("python -IS -c pass (bare interpreter)", lambda: run_argv([interpreter(), "-IS", "-c",
                                                                    "pass"])),
        ("plexus VERSION (shim, no agent call)",
         lambda: run_plugin(plugin, "VERSION", {"cniVersion": VERSION})),
        ("plexus STATUS (shim + agent round trip)",
         lambda: run_plugin(plugin, "STATUS", status_conf)),
        ("bridge VERSION (reference, Go)",
         lambda: run_plugin(ref_bridge, "VERSION", {"cniVersion": VERSION})),
    ]
    out: dict[str, list[float]] = {name: [] for name, _ in probes}
    for i in range(n + 2):  # two unmeasured rounds: page cache, pyc
        for k in range(len(probes)):
            name, probe = probes[(i + k) % len(probes)]
            r = probe()
            if r.returncode != 0:
                raise RuntimeError(f"{name} failed: {r.stdout} {r.stderr}")
            if i >= 2:
                out[name].append(r.seconds)
    return out


def interleave(sides: list[Side], verb: str, total: int, warmup: int) -> None:
    """Each container in turn on every side, the first mover rotating; CPU per side."""
    phase = "add" if verb == "ADD" else "del"
    for i in range(total):
        these = [s for s in sides if i < warmup or (i - warmup) % s.every == 0]
        for k in range(len(these)):
            side = these[(i + k) % len(these)]
            measured = i >= warmup
            before = side.cpu_clock()
            agent_before = side.agent_clock() if side.agent_clock else 0.0
            r = side.run(verb, f"{side.tag}{i}", i)
            if measured:
                side.cpu[phase] = side.cpu.get(phase, 0.0) + side.cpu_clock() - before
                if side.agent_clock:
                    side.cpu[f"agent {phase}"] = (side.cpu.get(f"agent {phase}", 0.0)
                                                  + side.agent_clock() - agent_before)
                if r is not None:
                    (side.add if verb == "ADD" else side.delete).append(r.seconds)


@dataclass
class Churn:
    side: Side
    seconds: dict[str, float] = field(default_factory=dict)  # phase wall time
    latencies: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)  # 1-min load average before the phase
    veths_after_add: int = 0


def churn(side: Side, n: int, parallel: int, verb: str, out: Churn) -> None:
    """``n`` containers through ``verb`` by ``parallel`` threads that entered host1."""
    todo = iter(range(n))
    lock = threading.Lock()
    lat: list[float] = []
    ready = threading.Barrier(parallel + 1, timeout=30)

    def worker() -> None:
        with in_netns(HOST_NS):
            ready.wait()
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = side.run(verb, f"churn-{side.tag}{i}", i)
                if r is not None:
                    with lock:
                        lat.append(r.seconds)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for t in threads:
        t.start()
    phase = "add" if verb == "ADD" else "del"
    out.load[phase] = os.getloadavg()[0]
    cpu0 = side.cpu_clock()
    agent0 = side.agent_clock() if side.agent_clock else 0.0
    ready.wait()
    t0 = time.perf_counter()
    deadline = time.monotonic() + TIMEOUT * n / parallel + TIMEOUT
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    out.seconds[phase] = time.perf_counter() - t0
    out.cpu[phase] = side.cpu_clock() - cpu0
    if side.agent_clock:
        out.cpu[f"agent {phase}"] = side.agent_clock() - agent0
    out.latencies[phase] = lat
    if any(t.is_alive() for t in threads):
        side.errors.append(f"churn {verb}: workers still running after the time limit")


# --- state checks ----------------------------------------------------------------------------


def veths(prefix: str | None) -> list[str]:
    """veths in host1 named ``prefix``*, or (None) every veth that is not plexus's nor up0."""
    out = []
    for ln in host_links(HOST):
        if ln.get("linkinfo", {}).get("info_kind") != "veth" or ln["ifname"] == "up0":
            continue
        px = ln["ifname"].startswith("px")
        if (prefix is None and not px) or (prefix is not None and ln["ifname"].startswith(prefix)):
            out.append(ln["ifname"])
    return out


def ipam_rows(state_dir: Path) -> int:
    """IPAM reservations in the agent's store (its SQLite file, opened read-only)."""
    db = sqlite3.connect(f"file:{state_dir / 'plexus.db'}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("select count(*) from kv where key >= ? and key < ?",
                         ("/plexus/ipam/", "/plexus/ipam/\xff")).fetchone()
    finally:
        db.close()
    return int(row[0])


def leases(data_dir: Path) -> list[str]:
    return [p.name for p in (data_dir / REF_NET).glob("*")
            if p.name != "lock" and not p.name.startswith("last_reserved_ip")]


def cni_chains() -> int:
    nat = sh("nsenter", f"--net={HOST_NS}", "--", "iptables", "-t", "nat", "-S",
             check=False).stdout
    return sum(ln.startswith("-N CNI-") for ln in nat.splitlines())


def addresses_check(side: Side, expected: int) -> tuple[str, bool]:
    ips = [ipaddress.ip_interface(a).ip for a in side.addresses if a]
    dup = len(ips) - len(set(ips))
    ok = len(ips) == expected and dup == 0
    return f"{len(ips)}/{expected} addresses, {dup} duplicates", ok


# --- report ----------------------------------------------------------------------------------


def _ms(values: Iterable[float], p: float) -> float:
    return 1000 * percentile(list(values), p)


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def _measured(side: Side, count: int) -> int:
    return len(range(0, count, side.every))


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def report_startup(samples: dict[str, list[float]]) -> None:
    rows = [[name, _fmt(_ms(v, 50)), _fmt(_ms(v, 99)), len(v)] for name, v in samples.items()]
    print_table(["start-up, ms (fork+exec+wait, in host1)", "p50", "p99", "n"], rows,
                "start-up cost")


def _series(side: Side, phase: str) -> list[float]:
    return side.add if phase == "add" else side.delete


def _stat(side: Side, key: str, count: int) -> float:
    """"add p50", "del mean", "cpu add", "agent del", ... in ms (CPU: per measured container)."""
    what, phase = key.split()
    if what in ("cpu", "agent"):
        if what == "agent" and side.agent_clock is None:
            return float("nan")
        cpu_key = phase if what == "cpu" else f"agent {phase}"
        return 1000 * side.cpu.get(cpu_key, float("nan")) / _measured(side, count)
    values = _series(side, what)
    if phase == "mean":
        return 1000 * sum(values) / len(values) if values else float("nan")
    return _ms(values, float(phase[1:]))


def report_latency(px: Side, ref: Side, api: Side | None, count: int) -> tuple[float, float]:
    heads = ["ms (lower is better)", "plexus", "reference", "plexus/ref"]
    if api:
        heads.append("agent only")
    rows: list[list[object]] = []
    keys = [("ADD p50", "add p50"), ("ADD p99", "add p99"), ("ADD mean", "add mean"),
            ("DEL p50", "del p50"), ("DEL p99", "del p99"), ("DEL mean", "del mean"),
            ("CPU per ADD", "cpu add"), ("  of which the agent", "agent add"),
            ("CPU per DEL", "cpu del"), ("  of which the agent", "agent del")]
    for label, key in keys:
        a, b = _stat(px, key, count), _stat(ref, key, count)
        cells: list[object] = [label, _fmt(a), _fmt(b), ratio(a, b)]
        if key.startswith("agent"):
            cells[2:4] = ["-", ""]
        if api:  # the agent-only side's CPU is all the agent's
            cells.append(_fmt(_stat(api, key.replace("agent", "cpu"), count)))
        rows.append(cells)
    print_table(heads, rows, f"latency over {count} containers per side (sequential)")
    print("  plexus: the installed shim `plexus`, executed in host1; reference: `bridge` +"
          " host-local,")
    print("  isGateway + ipMasq. CPU: plexus = the shim process + the agent and its DNS"
          " workers;")
    print("  reference = the bridge plugin and its children (host-local, iptables).")
    if api:
        print(f"  agent only ({_measured(api, count)} containers): the shim's exact request,"
              " POST /v1/cni, sent by")
        print("  this process (no process start) to a network of its own; its CPU is the"
              " agent's. It is")
        print("  the agent's share of a plexus ADD/DEL, not a target.")
    return (_stat(px, "add p50", count) / _stat(ref, "add p50", count),
            _stat(px, "del p50", count) / _stat(ref, "del p50", count))


def report_breakdown(px: Side, ref: Side, api: Side, start: dict[str, list[float]]) -> None:
    bare = _ms(start["python -IS -c pass (bare interpreter)"], 50)
    version = _ms(start["plexus VERSION (shim, no agent call)"], 50)
    go = _ms(start["bridge VERSION (reference, Go)"], 50)
    rows: list[list[object]] = []
    for phase in ("add", "del"):
        total, agent = _ms(_series(px, phase), 50), _ms(_series(api, phase), 50)
        rows.append([f"{phase.upper()} p50", _fmt(total), _fmt(agent), _fmt(total - agent),
                     f"{100 * (total - agent) / total:.0f}%", _fmt(_ms(_series(ref, phase), 50))])
    print_table(["ms", "plexus (shim)", "agent only", "difference", "share", "reference"], rows,
                "where a plexus ADD/DEL goes (p50; separate samples, so the split is an estimate)")
    print("  difference = the shim process: exec, interpreter start, imports, the request,"
          " exit.")
    print(f"  For scale: a bare `python -IS` {bare:.2f} ms, the shim's VERSION {version:.2f} ms"
          f" (~{version - bare:.2f} ms")
    print(f"  of the shim's own imports and work), a Go plugin's VERSION {go:.2f} ms.")


def report_churn(px: Churn, ref: Churn, n: int, parallel: int) -> None:
    rows: list[list[object]] = []
    for phase in ("add", "del"):
        a = n / px.seconds[phase] if px.seconds.get(phase) else float("nan")
        b = n / ref.seconds[phase] if ref.seconds.get(phase) else float("nan")
        rows.append([f"{phase.upper()} containers/s (higher is better)", f"{a:.1f}", f"{b:.1f}",
                     ratio(a, b)])
    a = n / (px.seconds.get("add", 0) + px.seconds.get("del", 0) or float("nan"))
    b = n / (ref.seconds.get("add", 0) + ref.seconds.get("del", 0) or float("nan"))
    rows.append(["ADD+DEL containers/s", f"{a:.1f}", f"{b:.1f}", ratio(a, b)])
    for phase in ("add", "del"):
        for p in (50, 99):
            a, b = _ms(px.latencies.get(phase, []), p), _ms(ref.latencies.get(phase, []), p)
            rows.append([f"{phase.upper()} latency p{p}, ms", _fmt(a), _fmt(b), ratio(a, b)])
    for phase in ("add", "del"):
        a, b = 1000 * px.cpu.get(phase, 0) / n, 1000 * ref.cpu.get(phase, 0) / n
        rows.append([f"CPU per {phase.upper()}, ms", _fmt(a), _fmt(b), ratio(a, b)])
        rows.append(["  of which the agent", _fmt(1000 * px.cpu.get(f"agent {phase}", 0) / n),
                     "-", ""])
    for phase in ("add", "del"):
        rows.append([f"{phase.upper()} phase wall time, s", f"{px.seconds.get(phase, 0):.2f}",
                     f"{ref.seconds.get(phase, 0):.2f}", ""])
        rows.append(["  1-min load average before it", f"{px.load.get(phase, 0):.1f}",
                     f"{ref.load.get(phase, 0):.1f}", ""])
    print_table(["churn", "plexus", "reference", "plexus/ref"], rows,
                f"parallel churn: {n} ADDs then {n} DELs, {parallel} workers, each side alone"
                f" ({os.cpu_count()} CPUs)")


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--count", type=int, default=200, help="measured containers per side")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured containers first")
    ap.add_argument("--churn", type=int, default=500, help="containers in the parallel churn")
    ap.add_argument("--parallel", type=int, default=8, help="churn workers")
    ap.add_argument("--startup", type=int, default=30, help="start-up samples per probe")
    ap.add_argument("--api-every", type=int, default=4,
                    help="the agent-only breakdown side takes every n-th container")
    ap.add_argument("--no-api", action="store_true", help="no agent-only breakdown side")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="extra `plexus agent` argument (repeatable), e.g. --agent-arg=--no-dns")
    args = ap.parse_args(argv)
    if not require_sandbox("cni.py"):
        return 2
    count, warmup = max(1, args.count), max(0, args.warmup)
    total, n_churn, parallel = count + warmup, max(1, args.churn), max(1, args.parallel)
    pool = max(total, n_churn)  # container namespaces per side, reused by the churn
    header("plexus CNI plugin vs reference CNI bridge + host-local (isGateway, ipMasq)", [
        f"plugins executed as a runtime does (fork+exec+wait, config on stdin) in netns {HOST},"
        f" cniVersion {VERSION}",
        f"plexus: installed shim `plexus` -> agent in {HOST}, network {PX_NET} {PX_SUBNET}",
        f"reference: {CNI_PATH}/bridge {REF_BRIDGE}, host-local {REF_SUBNET}",
        f"latency: {count} containers per side (+{warmup} warm-up), interleaved;"
        f" churn: {n_churn} containers, {parallel} workers",
        f"{os.cpu_count()} CPUs, load average {_load()} at start"
        + (f"; agent args: {' '.join(args.agent_arg)}" if args.agent_arg else ""),
    ])
    failed: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plexus-bench-cni-") as tmp, \
            World(Path(tmp) / "world") as world:
        agent = world.add_host(HOST, start_agent=False)
        # No dockerd to learn names from: the sandbox's /run/docker.sock is the host's.
        agent.start(extra=["--docker-api", "", *args.agent_arg])
        assert agent.proc is not None
        pid = agent.proc.pid
        client = Client(str(agent.socket))
        plugin_dir = Path(tmp) / "cni-bin"
        install([str(plugin_dir)])
        plugin = plugin_dir / "plexus"
        data_dir = Path(tmp) / "host-local"
        data_dir.mkdir()
        px_conf = {"cniVersion": VERSION, "name": PX_NET, "type": "plexus",
                   "socket": str(agent.socket), "subnets": [PX_SUBNET], "ipMasq": True}
        api_conf = {**px_conf, "name": API_NET, "subnets": [API_SUBNET]}
        px = shim_side("plexus", "pxc", plugin, plugin_dir, px_conf, PX_SUBNET, pid)
        ref = reference_side(data_dir)
        api = None if args.no_api else api_side(str(agent.socket), api_conf, pid,
                                                max(1, args.api_every))
        sides = [s for s in (px, ref, api) if s is not None]
        names = [f"{s.tag}{i}" for s in (px, ref) for i in range(pool)]
        names += [f"{api.tag}{i}" for i in range(total)] if api else []
        t0 = time.perf_counter()
        netns_batch("add", names)
        print(f"pre-created {len(names)} container namespaces in {time.perf_counter() - t0:.1f}s"
              " (untimed)")
        try:
            with in_netns(HOST_NS):
                t0 = time.perf_counter()
                start = startup(max(1, args.startup), plugin, os.path.join(CNI_PATH, "bridge"),
                                str(agent.socket))
                t1 = time.perf_counter()
                interleave(sides, "ADD", total, warmup)
                t2 = time.perf_counter()
                interleave(sides, "DEL", total, warmup)
                t3 = time.perf_counter()
            print(f"start-up {t1 - t0:.1f}s, ADD phase {t2 - t1:.1f}s, DEL phase {t3 - t2:.1f}s"
                  f"; load average now {_load()}")
            report_startup(start)
            add_r, del_r = report_latency(px, ref, api, count)
            if api:
                report_breakdown(px, ref, api, start)
            rows: list[tuple[str, str, str, bool | None]] = []
            for s in sides:
                used = warmup + _measured(s, count)
                text, ok = addresses_check(s, used)
                rows.append((s.name, "ADD/DEL errors", str(len(s.errors)), s.errors == []))
                rows.append((s.name, "invalid results", str(len(s.invalid)), s.invalid == []))
                rows.append((s.name, "addresses (incl. warm-up)", text, ok))
            latency_problems = [f"{s.name}: {e}" for s in sides for e in s.errors + s.invalid]

            # churn: each side alone (its bookkeeping starts afresh)
            churns = []
            for side in (px, ref):
                side.addresses, side.errors, side.invalid = [], [], []
                c = Churn(side)
                churn(side, n_churn, parallel, "ADD", c)
                c.veths_after_add = len(veths("pxv" if side is px else None))
                churn(side, n_churn, parallel, "DEL", c)
                churns.append(c)
            t4 = time.perf_counter()
            print(f"\nchurn phases {t4 - t3:.1f}s; load average now {_load()}")
            report_churn(churns[0], churns[1], n_churn, parallel)

            for c in churns:
                s = c.side
                text, ok = addresses_check(s, n_churn)
                rows.append((s.name, "churn ADD/DEL errors", str(len(s.errors)), s.errors == []))
                rows.append((s.name, "churn invalid results", str(len(s.invalid)),
                             s.invalid == []))
                rows.append((s.name, "churn addresses", text, ok))
                rows.append((s.name, "churn veths after the ADDs", str(c.veths_after_add),
                             c.veths_after_add == n_churn))
            endpoints = client.get("/v1/endpoints")
            rows += [
                ("plexus", "pxv* veths left in host1", str(len(veths("pxv"))), None),
                ("plexus", "endpoints left (GET /v1/endpoints)", str(len(endpoints)), None),
                ("plexus", "IPAM rows left in the store", str(ipam_rows(agent.state_dir)), None),
                ("reference", "veths left in host1", str(len(veths(None))), None),
                ("reference", "host-local leases left", str(len(leases(data_dir))), None),
                ("reference", "iptables CNI-* nat chains left", str(cni_chains()), None),
            ]
            table = []
            for side_name, check, value, expect in rows:
                good = value == "0" if expect is None else expect
                if not good:
                    failed.append(f"{side_name}: {check}: {value}")
                table.append((side_name, check, value, "ok" if good else "FAIL"))
            print_table(["side", "check", "value", ""], table, "correctness", "llrl")
            problems = latency_problems + [f"{s.name} churn: {e}" for s in (px, ref)
                                           for e in s.errors + s.invalid]
            for e in problems[:6]:
                print(f"  {e}")

            print("\ntargets (this run):")
            for label, got, want in (("ADD p50", add_r, TARGET_ADD),
                                     ("DEL p50", del_r, TARGET_DEL)):
                verdict = "met" if got <= want else "MISSED"
                print(f"  plexus {label} <= {want:.2f}x reference: {got:.2f}x  {verdict}")
            if api:
                a = _ms(api.add, 50) / _ms(ref.add, 50)
                d = _ms(api.delete, 50) / _ms(ref.delete, 50)
                print(f"  (the agent alone, without the shim process: ADD {a:.2f}x,"
                      f" DEL {d:.2f}x)")
        finally:
            netns_batch("del", names)
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s;"
          f" correctness: {'all checks ok' if not failed else f'{len(failed)} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

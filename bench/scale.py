"""The control plane at scale: attach and CNI ADD latency, agent memory, API latency during a full
reconcile pass, and an agent restart, with 100, 1,000 and 5,000 containers attached.

    tests/sandbox .venv/bin/python bench/scale.py [--sizes 100,1000,5000] [--samples 100]
                                                  [--concurrency 8] [--ref-containers 100]
    quick:  ... bench/scale.py --sizes 50,200 --samples 30

Only public interfaces are used, so the figures stay comparable while the agent's internals
change: the agent's HTTP API on its unix socket, the CNI plugin installed with
``python -m plexus.cni.install DIR`` (executed as a runtime executes it), /proc, and the kernel's
own tools (ip, nft) for what the agent did.

Levels. The agent runs in netns "host1" (tests/harness World). For each size the containers are
filled up through the API (``POST /v1/endpoints``, --concurrency requests at a time, namespaces
made with one ``ip -batch``), spread over several /21 networks (a Linux bridge takes at most
1,024 ports). Then, with exactly that many attached, --samples rounds of: an API attach, a CNI ADD
by the installed plugin (exec in host1), and a reference ``bridge`` + ``host-local`` ADD in a
namespace set of its own ("refhost", --ref-containers containers on its bridge), the first mover
rotating; only the ADD is timed, each sample is removed again (untimed) before the next one.
VmRSS of the agent is read after each fill.

At the largest size:
  restart   SIGTERM the agent and start it again, twice. First with nothing else going on:
            ``ip monitor`` and ``nft monitor`` in host1 across the restart (every line counts),
            and ``ip -j -d link`` / ``ip -j addr`` / ``nft -j list table inet plexus`` before
            and after. Then timed: until GET /v1/status says ready, until the network's DNS
            server answers for an existing container (asked from that container's namespace),
            until a CNI ADD succeeds.
  reconcile GET /v1/networks back to back from a client while full reconcile passes run:
            ``POST /v1/reconcile`` where the agent has it; otherwise the agent is restarted with
            ``--reconcile-interval 2`` and a 6 s window is sampled (the output says which).
Figures are printed next to the reference's and as ratios; nothing is asserted. Each level
prints its figures as soon as it is measured; a first Ctrl-C ends the levels (the queued attaches
are dropped) and the restart and reconcile phases run with what is attached then.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from _common import (
    CNI_PATH,
    CniResult,
    bridge_config,
    cni_exec,
    header,
    in_netns,
    netns_batch,
    percentile,
    plugin_exec,
    print_table,
    proc_cpu,
    ratio,
    require_sandbox,
    sh,
    vm_status,
)

from plexus.api.client import ApiError, Client
from tests.harness.world import Agent, World

HOST, REF_HOST = "host1", "refhost"
HOST_NS, REF_NS = f"/run/netns/{HOST}", f"/run/netns/{REF_HOST}"
SUBNETS = ipaddress.ip_network("10.96.0.0/12")  # cut into /21s, one per network
PER_NETWORK = 900  # containers per network: a Linux bridge takes at most 1,024 ports
REF_NET, REF_BRIDGE, REF_SUBNET = "refnet", "cni-ref0", "10.77.0.0/16"
DOMAIN = "plexus.internal"  # the agent's default --dns-domain
SETTLE = 1.0  # seconds of quiet before reading RSS
QUIET = 3.0  # seconds the monitors keep listening after the restarted agent is ready
RESTART_LIMIT = 600.0  # seconds a restart may take before we give up on it
PERIODIC_WINDOW, PERIODIC_INTERVAL = 6.0, "2"
TARGETS = {"attach": 1.2, "cni": 0.5, "rss": 20.0, "api p99": 50.0}


def _ms(values: list[float], p: float) -> float:
    return 1000 * percentile(values, p)


def _verdict(got: float, want: float) -> str:
    return "n/a" if math.isnan(got) else ("met" if got <= want else "MISSED")


# --- the two systems -------------------------------------------------------------------------


class Plexus:
    """The agent under test, reached only through its API and its installed CNI plugin."""

    def __init__(self, agent: Agent, plugin: Path, networks: list[str]) -> None:
        self.agent = agent
        self.client = Client(str(agent.socket), timeout=300)
        self.plugin = plugin
        self.cni_path = f"{plugin.parent}:{CNI_PATH}"
        self.networks = networks
        self.attached = 0
        self.probe: dict[str, Any] = {}  # the first container's endpoint: the DNS probe

    def network(self, i: int) -> str:
        return self.networks[i % len(self.networks)]

    def pid(self) -> int:
        """The agent's own pid (GET /v1/status has it; the harness's is nsenter's exec)."""
        pid = self.client.get("/v1/status").get("pid")
        assert self.agent.proc is not None
        return int(pid) if pid else self.agent.proc.pid

    def attach(self, cid: str, ns: str, network: str) -> dict[str, Any]:
        body = {"container_id": cid, "network": network, "netns": f"/run/netns/{ns}",
                "ifname": "eth0", "name": cid}
        return dict(self.client.post("/v1/endpoints", body))

    def detach(self, cid: str, network: str) -> None:
        self.client.post("/v1/endpoints/detach", {"container_id": cid, "network": network})

    def cni(self, verb: str, cid: str, ns: str, network: str) -> CniResult:
        config = {"cniVersion": "1.0.0", "name": network, "type": "plexus",
                  "socket": str(self.agent.socket)}
        with in_netns(HOST_NS):
            return plugin_exec(self.plugin, verb, config, cid, f"/run/netns/{ns}",
                               cni_path=self.cni_path)


class Reference:
    """``bridge`` + ``host-local`` (isGateway, ipMasq) in a namespace set of its own."""

    def __init__(self, data_dir: Path) -> None:
        self.config = bridge_config(REF_NET, REF_BRIDGE, REF_SUBNET, str(data_dir))

    def run(self, verb: str, cid: str, ns: str) -> CniResult:
        with in_netns(REF_NS):
            return cni_exec(verb, self.config, cid, f"/run/netns/{ns}")


def install_plugin(directory: Path) -> tuple[Path, str]:
    """The plugin as a user installs it; (its path, "compiled" or "Python stub")."""
    sh(sys.executable, "-m", "plexus.cni.install", str(directory), timeout=180)
    plugin = directory / "plexus"
    kind = "compiled" if plugin.read_bytes()[:4] == b"\x7fELF" else "Python stub"
    return plugin, kind


# --- levels ----------------------------------------------------------------------------------


@dataclass
class Level:
    size: int
    attached: int = 0
    fill_s: float = 0.0
    filled: int = 0
    rss_kib: int = 0
    attach: list[float] = field(default_factory=list)  # seconds
    cni: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)  # GET /v1/networks, idle
    errors: list[str] = field(default_factory=list)


def fill(px: Plexus, stop: int, concurrency: int, level: Level) -> None:
    """Attach containers sc<N>.. through the API until ``stop`` exist, ``concurrency`` at a
    time; their namespaces are made first, with one ``ip -batch``."""
    todo = range(px.attached, stop)
    netns_batch("add", [f"sc{i}" for i in todo])
    px.attached = stop  # what to clean up

    def one(i: int) -> dict[str, Any] | str:
        try:
            return px.attach(f"sc{i}", f"sc{i}", px.network(i))
        except (ApiError, OSError) as exc:
            return f"attach sc{i}: {exc}"

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(concurrency)
    try:
        for i, ep in zip(todo, pool.map(one, todo), strict=True):
            if isinstance(ep, str):
                level.errors.append(ep)
                continue
            level.filled += 1
            if i == 0:
                px.probe = ep
    finally:
        pool.shutdown(cancel_futures=True)  # interrupted: the queued attaches are not made
    level.fill_s = time.perf_counter() - t0


def _api_sample(px: Plexus, level: Level, k: int) -> None:
    cid, net = f"m{level.size}a{k}", px.network(k)
    t0 = time.perf_counter()
    try:
        px.attach(cid, cid, net)
    except (ApiError, OSError) as exc:
        level.errors.append(f"attach {cid}: {exc}")
        return
    level.attach.append(time.perf_counter() - t0)
    try:
        px.detach(cid, net)
    except (ApiError, OSError) as exc:
        level.errors.append(f"detach {cid}: {exc}")


def _plugin_sample(level: Level, into: list[float], run: Callable[[str, str], CniResult],
                   cid: str) -> None:
    """One timed ADD of a CNI plugin, then its untimed DEL."""
    for verb in ("ADD", "DEL"):
        r = run(verb, cid)
        if r.returncode != 0:
            level.errors.append(f"{verb} {cid}: {r.stdout.strip()} {r.stderr.strip()}"[:300])
            return
        if verb == "ADD":
            into.append(r.seconds)


def measure(px: Plexus, ref: Reference, level: Level, samples: int) -> None:
    """``samples`` rounds of the three ADDs at this level, the first mover rotating; then as
    many back-to-back GET /v1/networks (idle)."""
    names = [f"m{level.size}{t}{k}" for t in "acr" for k in range(samples)]
    netns_batch("add", names)
    ops: list[Callable[[int], None]] = [
        lambda k: _api_sample(px, level, k),
        lambda k: _plugin_sample(level, level.cni, lambda verb, cid: px.cni(
            verb, cid, cid, px.network(k)), f"m{level.size}c{k}"),
        lambda k: _plugin_sample(level, level.ref, lambda verb, cid: ref.run(verb, cid, cid),
                                 f"m{level.size}r{k}"),
    ]
    try:
        for k in range(samples):
            for j in range(len(ops)):
                ops[(k + j) % len(ops)](k)
        for _ in range(samples):
            t0 = time.perf_counter()
            px.client.get("/v1/networks")
            level.get.append(time.perf_counter() - t0)
    finally:
        netns_batch("del", names)


def run_level(px: Plexus, ref: Reference, size: int, args: argparse.Namespace) -> Level:
    level = Level(size)
    fill(px, size, args.concurrency, level)
    level.attached = int(px.client.get("/v1/status").get("endpoints", -1))
    rate = level.filled / level.fill_s if level.fill_s else 0.0
    print(f"  filled to {size}: {level.filled} attached in {level.fill_s:.1f}s ({rate:.0f}/s);"
          f" the agent reports {level.attached} endpoints", flush=True)
    time.sleep(SETTLE)
    level.rss_kib = vm_status(px.pid())["VmRSS"]
    t0 = time.perf_counter()
    measure(px, ref, level, args.samples)
    print(f"  measured {args.samples} rounds in {time.perf_counter() - t0:.1f}s"
          f" ({len(level.errors)} errors): p50 attach {_f(_ms(level.attach, 50))} ms,"
          f" CNI ADD {_f(_ms(level.cni, 50))} ms, reference ADD {_f(_ms(level.ref, 50))} ms;"
          f" agent RSS {level.rss_kib / 1024:.1f} MiB", flush=True)
    return level


# --- restart ---------------------------------------------------------------------------------


class Monitors:
    """``ip -o monitor link address route neigh`` and ``nft monitor`` in host1, each writing to
    a file (line-buffered: their stdio would otherwise hold lines back until exit)."""

    COMMANDS: ClassVar[dict[str, list[str]]] = {
        "ip": ["ip", "-o", "monitor", "link", "address", "route", "neigh"],
        "nft": ["nft", "monitor"],
    }

    def __init__(self, workdir: Path) -> None:
        self.files = {name: workdir / f"monitor-{name}.txt" for name in self.COMMANDS}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Monitors:
        for name, argv in self.COMMANDS.items():
            with open(self.files[name], "wb") as out:
                self.procs.append(subprocess.Popen(
                    ["nsenter", f"--net={HOST_NS}", "--", "stdbuf", "-oL", *argv],
                    stdout=out, stderr=subprocess.STDOUT))
        time.sleep(1.0)  # subscribed before anything happens
        return self

    def wait_quiet(self, quiet: float = 2.0, limit: float = 30.0) -> tuple[float, int]:
        """Wait until neither monitor printed for ``quiet`` seconds (the kernel's own timers on
        recently made links: IPv6 router solicitations, neighbour GC), at most ``limit``;
        (seconds waited, lines printed meanwhile)."""
        t0, start = time.perf_counter(), self.mark()
        last, seen = t0, start
        while time.perf_counter() - t0 < limit and time.perf_counter() - last < quiet:
            time.sleep(0.2)
            now = self.mark()
            if now != seen:
                last, seen = time.perf_counter(), now
        return time.perf_counter() - t0, sum(seen.values()) - sum(start.values())

    def mark(self) -> dict[str, int]:
        return {name: len(lines) for name, lines in self._read().items()}

    def since(self, mark: dict[str, int]) -> list[str]:
        """What each monitor printed after ``mark``, prefixed with its name."""
        return [f"{name}: {line}" for name, lines in self._read().items()
                for line in lines[mark.get(name, 0):]]

    def _read(self) -> dict[str, list[str]]:
        return {name: path.read_text(errors="replace").splitlines()
                for name, path in self.files.items()}

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def _canonical(obj: Any) -> Any:
    """Without handles, and a set's elements in a fixed order: its content is what counts (a
    rewrite with the same content shows in nft monitor, not here)."""
    if isinstance(obj, dict):
        return {k: sorted(map(_canonical, v), key=json.dumps) if k == "elem" else _canonical(v)
                for k, v in obj.items() if k != "handle"}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def _nft_objects() -> dict[str, Any]:
    """``nft -j list table inet plexus`` without handles, keyed by kind and name (rules by
    their chain and position)."""
    out = sh("nsenter", f"--net={HOST_NS}", "--", "nft", "-j", "list", "table", "inet", "plexus",
             check=False, timeout=120).stdout
    objects: dict[str, Any] = {}
    position: dict[str, int] = {}
    for item in json.loads(out or '{"nftables": []}')["nftables"]:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        name = f"{kind} {body.get('chain', '')} {body.get('name', '')}".strip()
        position[name] = position.get(name, -1) + 1
        objects[f"{name} #{position[name]}" if kind == "rule" else name] = _canonical(body)
    return objects


def kernel_state() -> dict[str, dict[str, Any]]:
    def ip(*argv: str) -> dict[str, Any]:
        out = sh("nsenter", f"--net={HOST_NS}", "--", "ip", "-j", *argv, timeout=120).stdout
        return {x["ifname"]: x for x in json.loads(out)}

    return {"link": ip("-d", "link"), "addr": ip("addr"), "nft": _nft_objects()}


def _flat(obj: Any, path: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{path}.{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{path}[{i}]").items()}
    return {path: obj}


# Running bridge timers (gc_timer, hello_timer, ...) count down by themselves: not a change.
def _ignored(path: str) -> bool:
    return path.rsplit(".", 1)[-1].endswith("_timer")


def diff_state(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
               ) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """Per kind (added, removed, changed) and a few examples."""
    counts: dict[str, tuple[int, int, int]] = {}
    examples: list[str] = []
    for kind in before:
        b, a = before[kind], after[kind]
        added, removed = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        changed = []
        for name in sorted(set(a) & set(b)):
            fb, fa = _flat(b[name]), _flat(a[name])
            paths = [p for p in sorted(set(fb) | set(fa))
                     if fb.get(p) != fa.get(p) and not _ignored(p)]
            if paths:
                changed.append(name)
                examples.append(f"{kind} {name} changed: " + ", ".join(
                    f"{p} {fb.get(p)!r} -> {fa.get(p)!r}" for p in paths[:3]))
        counts[kind] = (len(added), len(removed), len(changed))
        examples += [f"{kind} {n} added" for n in added[:3]]
        examples += [f"{kind} {n} removed" for n in removed[:3]]
    return counts, examples


def stop_agent(px: Plexus) -> tuple[float, int | None]:
    """SIGTERM; (seconds until it exited, its exit status)."""
    proc = px.agent.proc
    t0 = time.perf_counter()
    px.agent.kill(signal.SIGTERM)  # the harness waits 15 s, then SIGKILLs
    return time.perf_counter() - t0, proc.returncode if proc else None


def start_agent(px: Plexus, extra: list[str]) -> None:
    """Start the agent and return at once: the harness's own readiness wait execs the CLI every
    50 ms (~0.1 s of CPU each), which would compete with the agent being timed. With timeout=0
    it raises TimeoutError without polling; we poll the API ourselves."""
    with contextlib.suppress(TimeoutError):
        px.agent.start(timeout=0, extra=extra)


def wait_ready(px: Plexus, t0: float, limit: float = RESTART_LIMIT) -> float | None:
    """Seconds from ``t0`` until GET /v1/status says ready (None: not within ``limit``)."""
    client = Client(str(px.agent.socket), timeout=2)
    while time.perf_counter() - t0 < limit:
        proc = px.agent.proc
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent exited ({proc.returncode}):\n"
                               f"{px.agent.log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(ApiError, OSError):
            if client.get("/v1/status").get("ready"):
                return time.perf_counter() - t0
        time.sleep(0.01)
    return None


@dataclass
class Restart:
    stop_s: float = math.nan
    stop_status: int | None = None
    ready_s: float | None = None
    dns_s: float | None = None
    cni_s: float | None = None
    lines: list[str] = field(default_factory=list)  # monitors, across the restart
    control: list[str] = field(default_factory=list)  # monitors, as long without a restart
    control_s: float = 0.0
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def restart_objects(px: Plexus, workdir: Path) -> Restart:
    """The restart with nothing else going on: what it changed in the kernel."""
    out = Restart()
    before = kernel_state()
    with Monitors(workdir) as mon:
        waited, noise = mon.wait_quiet()
        out.notes.append(f"before the restart: waited {waited:.1f} s for the monitors to go"
                         f" quiet ({noise} lines meanwhile, not counted)")
        start = mon.mark()
        t0 = time.perf_counter()
        out.stop_s, out.stop_status = stop_agent(px)
        t1 = time.perf_counter()
        start_agent(px, [])
        out.ready_s = wait_ready(px, t1)
        time.sleep(QUIET)
        window = time.perf_counter() - t0
        out.lines = mon.since(start)
        out.counts, out.examples = diff_state(before, kernel_state())
        # A control window as long, with the agent left alone: what the kernel says anyway.
        mark = mon.mark()
        time.sleep(window)
        out.control = mon.since(mark)
        out.control_s = window
    return out


def a_query(name: str) -> bytes:
    """A DNS query for the A record of ``name`` (RFC 1035 4.1; recursion desired). Built by
    hand: bench/dns.py shadows dnspython's package ``dns`` for scripts run from bench/."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    header = struct.pack("!6H", 0x5CA1, 0x0100, 1, 0, 0, 0)  # id, RD, one question
    return header + labels + b"\0" + struct.pack("!2H", 1, 1)  # QTYPE A, QCLASS IN


def answers(reply: bytes, query: bytes, want: str) -> bool:
    """``reply`` answers ``query`` (same id, NOERROR, an answer) with address ``want``."""
    if len(reply) <= len(query) or reply[:2] != query[:2]:
        return False
    flags, _, ancount = struct.unpack("!3H", reply[2:8])
    return flags & 0x8000 != 0 and flags & 0xF == 0 and ancount > 0 \
        and socket.inet_aton(want) in reply[len(query):]


def _dns_answers(ns: str, name: str, server: str, want: str, t0: float, limit: float,
                 ) -> float | None:
    """Seconds from ``t0`` until ``server`` answers for ``name``, asked from netns ``ns``."""
    query = a_query(f"{name}.{DOMAIN}")
    with in_netns(f"/run/netns/{ns}"), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.perf_counter() - t0 < limit:
            try:
                s.sendto(query, (server, 53))
                reply = s.recv(4096)
            except OSError:
                time.sleep(0.01)  # timed out, or refused while nothing listens
                continue
            if answers(reply, query, want):
                return time.perf_counter() - t0
            time.sleep(0.01)
    return None


def _cni_succeeds(px: Plexus, ns: str, t0: float, limit: float, last: list[str]) -> float | None:
    while time.perf_counter() - t0 < limit:
        r = px.cni("ADD", ns, ns, px.network(0))
        if r.returncode == 0:
            return time.perf_counter() - t0
        last[:] = [f"{r.stdout.strip()} {r.stderr.strip()}"[:200]]
        time.sleep(0.01)
    return None


def dns_probe(px: Plexus) -> tuple[str, str, str, str]:
    """(netns, name, server, expected address) of the first container."""
    ep = px.probe
    return ("sc0", str(ep["container_id"]), str(ep["gateways"][0]),
            str(ep["addresses"][0]).split("/")[0])


def restart_timed(px: Plexus, limit: float = RESTART_LIMIT) -> Restart:
    """The restart timed from the new agent's exec: ready, DNS answering, a CNI ADD."""
    out = Restart()
    netns_batch("add", ["restart-cni"])
    ns, name, server, want = dns_probe(px)
    before = _dns_answers(ns, name, server, want, time.perf_counter(), 5.0)
    out.notes.append("DNS answered before the restart" if before is not None else
                     "DNS did NOT answer within 5 s even before the restart")
    results: dict[str, float | None] = {}
    last: list[str] = []
    out.stop_s, out.stop_status = stop_agent(px)
    t0 = time.perf_counter()
    start_agent(px, [])
    probes: dict[str, Callable[[], float | None]] = {
        "dns": lambda: _dns_answers(ns, name, server, want, t0, limit),
        "cni": lambda: _cni_succeeds(px, "restart-cni", t0, limit, last),
    }
    threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f()),
                                daemon=True) for k, f in probes.items()]
    for t in threads:
        t.start()
    out.ready_s = wait_ready(px, t0, limit)
    for t in threads:
        t.join(timeout=max(1.0, limit - (time.perf_counter() - t0)))
    out.dns_s, out.cni_s = results.get("dns"), results.get("cni")
    if out.cni_s is None and last:
        out.notes.append(f"last CNI ADD error: {last[0]}")
    r = px.cni("DEL", "restart-cni", "restart-cni", px.network(0))
    if r.returncode != 0:
        out.notes.append(f"CNI DEL after the restart failed: {r.stdout.strip()}"[:200])
    netns_batch("del", ["restart-cni"])
    return out


# --- API latency during a full reconcile pass ------------------------------------------------


@dataclass
class Reconcile:
    mode: str = ""
    latencies: list[float] = field(default_factory=list)  # GET /v1/networks, seconds
    errors: list[str] = field(default_factory=list)
    passes_ms: list[float] = field(default_factory=list)  # as the agent reports them
    window_s: float = 0.0
    agent_cpu_s: float = math.nan
    agent_stall: str = "n/a"
    notes: list[str] = field(default_factory=list)


class Sampler(threading.Thread):
    """GET /v1/networks back to back until stopped (bounded by ``limit`` seconds)."""

    def __init__(self, socket_path: str, out: Reconcile, limit: float) -> None:
        super().__init__(daemon=True)
        self.client = Client(socket_path, timeout=60)
        self.out, self.limit = out, limit
        self.done = threading.Event()

    def run(self) -> None:
        end = time.perf_counter() + self.limit
        while not self.done.is_set() and time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                self.client.get("/v1/networks")
            except (ApiError, OSError) as exc:
                self.out.errors.append(str(exc))
                time.sleep(0.01)  # an agent that refuses at once must not make this spin
                continue
            self.out.latencies.append(time.perf_counter() - t0)


def _on_demand(px: Plexus, out: Reconcile, min_samples: int, limit: float = 300.0) -> None:
    """Passes through POST /v1/reconcile until ``min_samples`` latencies were taken."""
    out.mode = "POST /v1/reconcile"
    out.notes.append("passes triggered by POST /v1/reconcile, back to back while sampling")
    sampler = Sampler(str(px.agent.socket), out, limit)
    cpu0, t0 = proc_cpu(px.pid()), time.perf_counter()
    sampler.start()
    try:
        while (not out.passes_ms or len(out.latencies) < min_samples) \
                and len(out.passes_ms) < 100 and time.perf_counter() - t0 < limit:
            answer = px.client.post("/v1/reconcile", {})
            out.passes_ms.append(float(answer.get("duration_ms", math.nan)))
    finally:
        sampler.done.set()
        sampler.join(timeout=70)
    out.window_s, out.agent_cpu_s = time.perf_counter() - t0, proc_cpu(px.pid()) - cpu0


def _periodic(px: Plexus, out: Reconcile) -> None:
    """No on-demand pass: restart the agent with a short --reconcile-interval and sample a
    window long enough for a periodic pass to fall into it."""
    out.mode = f"periodic, every {PERIODIC_INTERVAL} s (no POST /v1/reconcile: 404)"
    out.notes += [f"the agent has no POST /v1/reconcile: restarted with --reconcile-interval"
                  f" {PERIODIC_INTERVAL}, a {PERIODIC_WINDOW:.0f} s window sampled;",
                  "its periodic passes are not logged: the agent's CPU in the window shows them"]
    stop_agent(px)
    px.agent.start(timeout=RESTART_LIMIT, extra=["--reconcile-interval", PERIODIC_INTERVAL])
    pid = px.pid()
    sampler = Sampler(str(px.agent.socket), out, PERIODIC_WINDOW)
    cpu0, t0 = proc_cpu(pid), time.perf_counter()
    sampler.start()
    sampler.join(timeout=PERIODIC_WINDOW + 70)
    out.window_s, out.agent_cpu_s = time.perf_counter() - t0, proc_cpu(pid) - cpu0


def post_status(socket_path: str, path: str, timeout: float = 300) -> int:
    """The HTTP status of an empty-bodied POST. (plexus's Client cannot say: it parses every
    answer as JSON, and aiohttp's own 404 page is text.)"""
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(timeout)
    try:
        conn.sock.connect(socket_path)
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def reconcile(px: Plexus, min_samples: int) -> Reconcile:
    out = Reconcile()
    status = post_status(str(px.agent.socket), "/v1/reconcile")  # a warm-up pass if it exists
    if status in (404, 405):
        _periodic(px, out)
    elif status < 300:
        _on_demand(px, out, min_samples)
    else:
        raise RuntimeError(f"POST /v1/reconcile answered {status}")
    stall = px.client.get("/v1/status").get("loop_stall_max_ms")
    out.agent_stall = "n/a" if stall is None else f"{float(stall):.1f}"
    return out


# --- report ----------------------------------------------------------------------------------


def _f(v: float, digits: int = 2) -> str:
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


def _s(v: float | None) -> str:
    return "not within the limit" if v is None else f"{v:.2f} s"


def report_levels(levels: list[Level]) -> None:
    rows = []
    for lv in levels:
        rate = lv.filled / lv.fill_s if lv.fill_s else math.nan
        rows.append([lv.attached, _f(_ms(lv.attach, 50)), _f(_ms(lv.attach, 99)),
                     _f(_ms(lv.cni, 50)), _f(_ms(lv.cni, 99)), _f(_ms(lv.ref, 50)),
                     _f(_ms(lv.ref, 99)), _f(_ms(lv.get, 50)), f"{lv.rss_kib / 1024:.1f}",
                     f"{lv.filled} in {lv.fill_s:.1f}s, {_f(rate, 0)}/s"])
    print_table(["attached", "attach p50", "p99", "CNI ADD p50", "p99", "ref ADD p50", "p99",
                 "GET nets p50", "RSS MiB", "fill (API, concurrent)"], rows,
                "latency in ms with N containers attached (lower is better)")
    n = [len(lv.attach) for lv in levels], [len(lv.cni) for lv in levels]
    print(f"  samples per level: attach {n[0]}, CNI ADD {n[1]}, reference"
          f" {[len(lv.ref) for lv in levels]}")
    print("  attach = POST /v1/endpoints; CNI ADD = the installed plexus plugin exec'd in host1;")
    print(f"  ref = bridge + host-local exec'd in {REF_HOST}, its own bridge holding ~100"
          " containers.")
    print("  GET nets = GET /v1/networks back to back after the rounds; the agent's periodic"
          " reconcile")
    print("  (every 300 s by default) runs when it runs, so this is not an idle figure.")


def level_targets(levels: list[Level]) -> list[list[object]]:
    lo, hi = levels[0], levels[-1]
    attach = _ms(hi.attach, 50) / _ms(lo.attach, 50)
    cni = _ms(hi.cni, 50) / _ms(hi.ref, 50)
    span = hi.attached - lo.attached
    rss = (hi.rss_kib - lo.rss_kib) / span if span > 0 else math.nan
    return [
        [f"attach p50 at {hi.size} / at {lo.size}", f"{_f(attach)}x",
         f"<= {TARGETS['attach']}x", _verdict(attach, TARGETS["attach"])],
        [f"CNI ADD p50 at {hi.size} / at {lo.size}",
         ratio(_ms(hi.cni, 50), _ms(lo.cni, 50)), "", ""],
        [f"CNI ADD p50 at {hi.size} / reference ADD p50", f"{_f(cni)}x",
         f"<= {TARGETS['cni']}x", _verdict(cni, TARGETS["cni"])],
        [f"agent RSS per container ({hi.attached} vs {lo.attached})", f"{_f(rss, 1)} KiB",
         f"<= {TARGETS['rss']:.0f} KiB", _verdict(rss, TARGETS["rss"])],
    ]


NUD = re.compile(r"\b(NOARP|PERMANENT|REACHABLE|STALE|DELAY|PROBE|FAILED|INCOMPLETE|NONE)\s*$")


def kind_of(line: str) -> str:
    """Which kind of object a monitor line is about (``ip -o monitor`` prints no label)."""
    monitor, _, text = line.partition(": ")
    if monitor == "nft":
        return "nft"
    if " lladdr " in text or NUD.search(text):
        # plexus writes only static (PERMANENT) neighbours; the rest is the kernel's own cache
        # aging (multicast NOARP entries collected, a gateway probed), whoever is running.
        return "ip neigh" if "PERMANENT" in text else CACHE
    if re.match(r"(Deleted )?\d+: \S+: <", text):
        return "ip link"
    if re.match(r"(Deleted )?\d+: \S+\s+inet6? ", text):
        return "ip addr"
    return "ip route"


CACHE = "ip neigh, kernel cache"


def _by_kind(lines: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(("ip link", "ip addr", "ip route", "ip neigh", CACHE, "nft"), 0)
    for line in lines:
        counts[kind_of(line)] += 1
    return counts


def report_restart(size: int, quiet: Restart, timed: Restart) -> list[list[object]]:
    objects = sum(sum(c) for c in quiet.counts.values())
    during, control = _by_kind(quiet.lines), _by_kind(quiet.control)
    rows: list[list[object]] = [
        ["SIGTERM until the agent exited", f"{quiet.stop_s:.2f} s / {timed.stop_s:.2f} s",
         f"exit status {quiet.stop_status} / {timed.stop_status}"],
        ["start until GET /v1/status ready", f"{_s(quiet.ready_s)} / {_s(timed.ready_s)}", ""],
        ["start until DNS answers for a container", _s(timed.dns_s), "(2nd restart)"],
        ["start until a CNI ADD succeeds", _s(timed.cni_s), "(2nd restart)"],
        ["monitor lines across the restart", len(quiet.lines),
         f"{len(quiet.control)} in a {quiet.control_s:.0f} s control window without one"],
        *[[f"  {kind}", during[kind], f"{control[kind]} in the control window"]
          for kind in during],
        *[[f"diff {kind}: added / removed / changed", " / ".join(map(str, c)), ""]
          for kind, c in quiet.counts.items()],
    ]
    print_table(["restart", "value", ""], rows,
                f"agent restart with {size} containers (1st restart: kernel objects, nothing"
                " else going on / 2nd: timed)", "lrl")
    print("  monitors: ip -o monitor link address route neigh, nft monitor (host1), from SIGTERM"
          f" to {QUIET:.0f} s after ready;")
    print("  diff: ip -j -d link, ip -j addr (by ifname), nft -j list table inet plexus (no"
          " handles, set elements sorted); *_timer fields ignored")
    for monitor in ("ip", "nft"):
        lines = [ln for ln in quiet.lines if ln.startswith(f"{monitor}: ")]
        if lines:
            print(f"  {monitor} monitor printed across the restart (first 20 of {len(lines)}):")
        for line in lines[:20]:
            print(f"    | {line[:160]}")
    if quiet.control:
        print(f"  the control window (first 10 of {len(quiet.control)}):")
    for line in quiet.control[:10]:
        print(f"    | {line[:160]}")
    for e in quiet.examples[:10]:
        print(f"    diff: {e[:160]}")
    for note in quiet.notes + timed.notes:
        print(f"  note: {note}")
    changed = [ln for ln in quiet.lines if kind_of(ln) != CACHE]
    return [["kernel objects changed by the restart (monitor lines + diffs)",
             f"{len(changed) + objects} (control {len(quiet.control)})", "0",
             "met" if not changed and not objects else "MISSED"]]


def report_reconcile(size: int, rc: Reconcile) -> list[list[object]]:
    lat = rc.latencies
    passes = (f"{len(rc.passes_ms)}, duration p50 {_f(percentile(rc.passes_ms, 50), 0)} ms,"
              f" max {_f(max(rc.passes_ms), 0)} ms" if rc.passes_ms else "n/a")
    rows: list[list[object]] = [
        ["how", rc.mode],
        ["GET /v1/networks samples", f"{len(lat)} in {rc.window_s:.1f} s"
                                     f" ({len(rc.errors)} errors)"],
        ["latency p50 / p99", f"{_f(_ms(lat, 50))} / {_f(_ms(lat, 99))} ms"],
        ["longest event-loop stall, client view (max latency)",
         f"{_f(1000 * max(lat)) if lat else '-'} ms"],
        ["longest loop stall since the agent's start-up, its own (ms)", rc.agent_stall],
        ["reconcile passes (agent's duration_ms)", passes],
        ["agent CPU in the window", f"{_f(rc.agent_cpu_s)} s"],
    ]
    print_table(["API during a full reconcile", "value"], rows,
                f"API latency while a full reconcile pass runs over {size} containers", "ll")
    for line in rc.notes:
        print(f"  {line}")
    for e in rc.errors[:3]:
        print(f"  error: {e[:160]}")
    p99 = _ms(lat, 99)
    return [["GET /v1/networks p99 during a full reconcile", f"{_f(p99)} ms",
             f"<= {TARGETS['api p99']:.0f} ms", _verdict(p99, TARGETS["api p99"])]]


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000",
                    help="containers attached at each level, comma-separated")
    ap.add_argument("--samples", type=int, default=100, help="samples per figure and level")
    ap.add_argument("--concurrency", type=int, default=8, help="API requests in flight (fill)")
    ap.add_argument("--ref-containers", type=int, default=100,
                    help="containers on the reference's bridge")
    ap.add_argument("--networks", type=int, default=0,
                    help=f"plexus networks (default: one per {PER_NETWORK} containers, >= 2)")
    args = ap.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        ap.error(f"invalid --sizes {args.sizes!r}: expected numbers separated by commas")
    if not args.sizes or args.sizes[0] < 1:
        ap.error(f"invalid --sizes {args.sizes!r}: expected positive numbers")
    args.samples = max(1, args.samples)
    args.networks = args.networks or max(2, math.ceil(args.sizes[-1] / PER_NETWORK))
    if args.sizes[-1] / args.networks > 1000:
        ap.error(f"invalid --networks {args.networks}: a bridge takes at most 1,024 ports")
    return args


def setup(world: World, tmp: Path, args: argparse.Namespace) -> tuple[Plexus, Reference]:
    agent = world.add_host(HOST)
    plugin, kind = install_plugin(tmp / "cni-bin")
    client = Client(str(agent.socket))
    subnets = SUBNETS.subnets(new_prefix=21)
    names = [f"scale{i}" for i in range(args.networks)]
    for name in names:
        client.post("/v1/networks", {"name": name, "subnets": [str(next(subnets))]})
    px = Plexus(agent, plugin, names)
    print(f"plexus: agent pid {px.pid()} in {HOST}, {len(names)} networks of /21, CNI plugin"
          f" {plugin} ({kind})")
    world.add_ns(REF_HOST)
    data_dir = tmp / "host-local"
    data_dir.mkdir()
    ref = Reference(data_dir)
    pre = [f"rf{i}" for i in range(args.ref_containers)]
    netns_batch("add", pre)
    failed = sum(ref.run("ADD", n, n).returncode != 0 for n in pre)
    print(f"reference: {len(pre) - failed} containers on {REF_BRIDGE} in {REF_HOST}"
          f" ({failed} failed)", flush=True)
    return px, ref


def phase(name: str, failures: list[str], fn: Callable[[], Any]) -> Any:
    """Run one phase; a failure is reported and the remaining phases still run."""
    t0 = time.perf_counter()
    print(f"\n{name} ...", flush=True)
    try:
        result = fn()
    except Exception as exc:  # report it, then tear down properly
        failures.append(f"{name}: {exc!r}"[:400])
        print(f"  FAILED: {exc!r}"[:400], flush=True)
        return None
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return result


def run(px: Plexus, ref: Reference, tmp: Path, args: argparse.Namespace) -> list[str]:
    failures: list[str] = []
    levels: list[Level] = []
    for size in args.sizes:
        try:
            level = phase(f"level {size}", failures, lambda s=size: run_level(px, ref, s, args))
        except KeyboardInterrupt:  # the first Ctrl-C ends the levels, not the run
            print("  interrupted: no more levels", flush=True)
            break
        if level is None:
            break
        levels.append(level)
    if not levels:
        print("  no level was measured: no restart, no reconcile")
        return failures
    if len(levels) < len(args.sizes):
        print("  restart and reconcile run with the containers attached now", flush=True)
    report_levels(levels)
    for e in [e for lv in levels for e in lv.errors][:5]:
        print(f"  error: {e}")
    targets = level_targets(levels)
    top = int(px.client.get("/v1/status").get("endpoints", levels[-1].size))
    quiet = phase("restart (kernel objects)", failures, lambda: restart_objects(px, tmp))
    timed = phase("restart (timed)", failures, lambda: restart_timed(px)) if quiet else None
    if quiet and timed:
        targets += report_restart(top, quiet, timed)
    rc = phase("reconcile", failures, lambda: reconcile(px, max(300, 3 * args.samples)))
    if rc is not None:
        targets += report_reconcile(top, rc)
    print_table(["figure", "this run", "target", ""], targets,
                "targets (benchmarks are never pass/fail)", "lrrl")
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_sandbox("scale.py"):
        return 2
    header("plexus control plane at scale: attach, CNI ADD, memory, reconcile, restart", [
        f"levels: {', '.join(map(str, args.sizes))} containers attached; {args.samples} samples"
        f" per figure; fill with {args.concurrency} concurrent API requests",
        f"reference: {CNI_PATH}/bridge + host-local (isGateway, ipMasq) in {REF_HOST},"
        f" {args.ref_containers} containers on its bridge",
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
    ])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="plexus-bench-scale-") as tmpdir, \
            World(Path(tmpdir) / "world") as world:
        tmp = Path(tmpdir)
        px, ref = setup(world, tmp, args)
        try:
            failures = run(px, ref, tmp, args)
        finally:
            px.agent.kill(signal.SIGTERM)  # before the namespaces go: no 5,000 link events
            netns_batch("del", [f"sc{i}" for i in range(px.attached)]
                        + [f"rf{i}" for i in range(args.ref_containers)])
    print(f"\ntotal {time.perf_counter() - t0:.0f}s"
          + (f"; {len(failures)} phase(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Attach + detach latency: plexus (API, agent in host netns "host1") against the reference CNI
``bridge`` plugin with ``host-local`` IPAM and ``ipMasq`` (executed as a runtime executes it, in
the same host netns).

    tests/sandbox .venv/bin/python bench/attach.py [--count 200] [--warmup 5]

Both sides get their container namespaces pre-created (``ip netns add``, untimed). Operations are
interleaved one container at a time, and who goes first alternates, so both see the same machine
state (the same number of links, the same load). Only timings are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from _common import (
    CniResult,
    bridge_config,
    cni_exec,
    header,
    host_links,
    in_netns,
    logged_orphans,
    missing_veths,
    netns_batch,
    percentile,
    print_table,
    ratio,
    require_sandbox,
    sh,
)

from plexus.api.client import ApiError, Client
from tests.harness.world import World

PX_NET, PX_SUBNET = "bench", "10.88.0.0/16"
REF_NET, REF_BRIDGE, REF_SUBNET = "refnet", "cni-ref0", "10.77.0.0/16"
HOST = "host1"


@dataclass
class Side:
    name: str
    add: list[float] = field(default_factory=list)  # seconds, measured containers only
    delete: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # phase → CPU seconds spent

    def record(self, phase: str, seconds: float, measured: bool) -> None:
        if measured:
            (self.add if phase == "add" else self.delete).append(seconds)


def _proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Plexus:
    def __init__(self, client: Client, side: Side) -> None:
        self.client = client
        self.side = side

    def attach(self, i: int, measured: bool) -> None:
        body = {"container_id": f"pxc{i}", "network": PX_NET, "netns": f"/run/netns/pxc{i}",
                "ifname": "eth0"}
        t0 = time.perf_counter()
        try:
            ep = self.client.post("/v1/endpoints", body)
        except ApiError as exc:
            self.side.errors.append(f"attach pxc{i}: {exc.status} {exc.kind}: {exc.message}")
            return
        self.side.record("add", time.perf_counter() - t0, measured)
        if measured:
            self.side.addresses.append(ep["addresses"][0] if ep.get("addresses") else "")

    def detach(self, i: int, measured: bool) -> None:
        body = {"container_id": f"pxc{i}", "network": PX_NET}
        t0 = time.perf_counter()
        try:
            self.client.post("/v1/endpoints/detach", body)
        except ApiError as exc:
            self.side.errors.append(f"detach pxc{i}: {exc.status} {exc.kind}: {exc.message}")
            return
        self.side.record("del", time.perf_counter() - t0, measured)


class Reference:
    def __init__(self, data_dir: str, side: Side) -> None:
        self.config = bridge_config(REF_NET, REF_BRIDGE, REF_SUBNET, data_dir, ip_masq=True)
        self.side = side

    def _run(self, verb: str, i: int) -> CniResult | None:
        r = cni_exec(verb, self.config, f"refc{i}", f"/run/netns/refc{i}")
        if r.returncode != 0:
            self.side.errors.append(f"{verb} refc{i}: rc={r.returncode} {r.stdout}{r.stderr}")
            return None
        return r

    def attach(self, i: int, measured: bool) -> None:
        r = self._run("ADD", i)
        if r is None:
            return
        self.side.record("add", r.seconds, measured)
        if measured:
            ips = r.json().get("ips", [])
            self.side.addresses.append(ips[0]["address"] if ips else "")

    def detach(self, i: int, measured: bool) -> None:
        r = self._run("DEL", i)
        if r is not None:
            self.side.record("del", r.seconds, measured)


def _interleave(n: int, warmup: int, ops: list[Callable[[int, bool], None]],
                cpu: list[tuple[Side, Callable[[], float]]], phase: str) -> None:
    """Run op[k](i) for each container, alternating which side goes first; accumulate the CPU
    each side spent in this phase (measured containers only)."""
    for i in range(n):
        order = range(len(ops)) if i % 2 == 0 else reversed(range(len(ops)))
        for k in order:
            side, clock = cpu[k]
            before = clock()
            ops[k](i, i >= warmup)
            if i >= warmup:
                side.cpu[phase] = side.cpu.get(phase, 0.0) + clock() - before


def _addresses_ok(side: Side, subnet: str, count: int) -> str:
    net = ipaddress.ip_network(subnet)
    good = [a for a in side.addresses if a and ipaddress.ip_interface(a).ip in net]
    unique = len({ipaddress.ip_interface(a).ip for a in good})
    return f"{len(good)}/{count} in {subnet}, {unique} distinct"


def _nft_elements() -> int:
    out = sh("nsenter", f"--net=/run/netns/{HOST}", "--", "nft", "-j", "list", "table", "inet",
             "plexus", check=False).stdout
    if not out.strip():
        return 0
    objs = json.loads(out)["nftables"]
    return sum(len(o.get("set", o.get("map", {})).get("elem", []))
               for o in objs if "set" in o or "map" in o)


def _leftovers(client: Client, data_dir: Path, nft_base: int) -> list[tuple[str, str, str]]:
    links = host_links(HOST)
    px_veths = [ln["ifname"] for ln in links if ln["ifname"].startswith("pxv")]
    other_veths = [ln["ifname"] for ln in links
                   if ln.get("linkinfo", {}).get("info_kind") == "veth"
                   and ln["ifname"] != "up0" and not ln["ifname"].startswith("pxv")]
    endpoints = client.get("/v1/endpoints")
    leases = [p.name for p in (data_dir / REF_NET).glob("*")
              if p.name != "lock" and not p.name.startswith("last_reserved_ip")]
    nat = sh("nsenter", f"--net=/run/netns/{HOST}", "--", "iptables", "-t", "nat", "-S",
             check=False).stdout
    chains = [ln for ln in nat.splitlines() if ln.startswith("-N CNI-")]
    return [
        ("plexus", "px* veths left in host1", str(len(px_veths))),
        ("plexus", "endpoints left (GET /v1/endpoints)", str(len(endpoints))),
        ("plexus", f"nft set/map elements left (network alone: {nft_base})",
         str(_nft_elements())),
        ("reference", "veths left in host1", str(len(other_veths))),
        ("reference", "host-local leases left", str(len(leases))),
        ("reference", "iptables CNI-* nat chains left", str(len(chains))),
    ]


def _ms(values: list[float], p: float) -> float:
    return 1000 * percentile(values, p)


def report(px: Side, ref: Side, count: int) -> None:
    rows: list[list[object]] = []
    for label, a, b in (
        ("attach (ADD)", px.add, ref.add),
        ("detach (DEL)", px.delete, ref.delete),
    ):
        for p in (50, 99):
            rows.append([f"{label} p{p}", f"{_ms(a, p):.2f}", f"{_ms(b, p):.2f}",
                         ratio(_ms(a, p), _ms(b, p))])
    px_both = [a + d for a, d in zip(px.add, px.delete, strict=False)]
    ref_both = [a + d for a, d in zip(ref.add, ref.delete, strict=False)]
    rows.append(["attach+detach p50", f"{_ms(px_both, 50):.2f}", f"{_ms(ref_both, 50):.2f}",
                 ratio(_ms(px_both, 50), _ms(ref_both, 50))])
    for label, a, b in (("attach mean", px.add, ref.add), ("detach mean", px.delete, ref.delete)):
        ma = 1000 * sum(a) / len(a) if a else float("nan")
        mb = 1000 * sum(b) / len(b) if b else float("nan")
        rows.append([label, f"{ma:.2f}", f"{mb:.2f}", ratio(ma, mb)])
    for phase, label in (("add", "CPU per attach"), ("del", "CPU per detach")):
        ca = 1000 * px.cpu.get(phase, 0.0) / max(1, count)
        cb = 1000 * ref.cpu.get(phase, 0.0) / max(1, count)
        rows.append([label, f"{ca:.2f}", f"{cb:.2f}", ratio(ca, cb)])
    print_table(["ms (lower is better)", "plexus", "reference", "plexus/ref"], rows,
                f"latency over {count} containers")
    print("  CPU: plexus = the agent process (incl. its background work during the phase);")
    print("       reference = the bridge plugin and the children it waits for (host-local,"
          " iptables).")
    target = _ms(px.add, 50) / _ms(ref.add, 50) if ref.add and px.add else float("nan")
    print(f"\n  target: plexus attach p50 <= 0.50x reference; this run: {target:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200, help="measured containers per side")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured containers first")
    ap.add_argument("--samples", type=Path, help="also write every measured sample (ms) as JSON")
    args = ap.parse_args(argv)
    if not require_sandbox("attach.py"):
        return 2
    count, warmup = max(1, args.count), max(0, args.warmup)
    total = count + warmup
    header("plexus attach/detach latency vs reference CNI bridge + host-local (ipMasq)", [
        f"{count} measured containers per side (+{warmup} warm-up), interleaved one by one,"
        " first mover alternating",
        f"plexus: POST /v1/endpoints{{,/detach}} over the unix socket, network {PX_NET}"
        f" {PX_SUBNET}, agent in netns {HOST}",
        f"reference: {os.path.join('/usr/lib/cni', 'bridge')} (isGateway, ipMasq, host-local"
        f" {REF_SUBNET}), cniVersion 1.0.0, executed in netns {HOST}",
    ])
    px, ref = Side("plexus"), Side("reference")
    with tempfile.TemporaryDirectory(prefix="plexus-bench-") as tmp, \
            World(Path(tmp) / "world") as world:
        agent = world.add_host(HOST)
        assert agent.proc is not None
        client = Client(str(agent.socket))
        client.post("/v1/networks", {"name": PX_NET, "subnets": [PX_SUBNET]})
        nft_base = _nft_elements()
        data_dir = Path(tmp) / "host-local"
        data_dir.mkdir()
        names = [f"pxc{i}" for i in range(total)] + [f"refc{i}" for i in range(total)]
        t0 = time.perf_counter()
        netns_batch("add", names)
        print(f"pre-created {len(names)} namespaces in {time.perf_counter() - t0:.2f}s (untimed)")
        plexus, reference = Plexus(client, px), Reference(str(data_dir), ref)
        pid = agent.proc.pid
        cpu = [(px, lambda: _proc_cpu(pid)), (ref, _children_cpu)]
        try:
            with in_netns(f"/run/netns/{HOST}"):
                t0, start = time.perf_counter(), datetime.now()
                _interleave(total, warmup, [plexus.attach, reference.attach], cpu, "add")
                t1, middle = time.perf_counter(), datetime.now()
                # untimed: every endpoint the agent reports still has its veth
                missing = missing_veths(client.get("/v1/endpoints"), host_links(HOST))
                t2 = time.perf_counter()
                _interleave(total, warmup, [plexus.detach, reference.detach], cpu, "del")
                t3 = time.perf_counter()
            print(f"attach phase {t1 - t0:.1f}s, detach phase {t3 - t2:.1f}s (both sides)")
            report(px, ref, count)
            if args.samples:
                args.samples.write_text(json.dumps({
                    s.name: {"add_ms": [1000 * v for v in s.add],
                             "del_ms": [1000 * v for v in s.delete]} for s in (px, ref)
                }))
                print(f"  samples written to {args.samples}")
            orphans = logged_orphans(agent.log)
            during_attach = [n for when, n in orphans if start <= when < middle]
            checks = [
                ("plexus", "attach errors", str(sum("attach" in e for e in px.errors))),
                ("plexus", "detach errors", str(sum("detach" in e for e in px.errors))),
                ("plexus", "addresses", _addresses_ok(px, PX_SUBNET, count)),
                ("plexus", "endpoints missing their veth after attaching", str(len(missing))),
                ("plexus", "links reconcile deleted as 'orphans' (agent log)",
                 f"{len(orphans)} ({len(during_attach)} during the attach phase)"),
                ("reference", "ADD/DEL errors", str(len(ref.errors))),
                ("reference", "addresses", _addresses_ok(ref, REF_SUBNET, count)),
                *_leftovers(client, data_dir, nft_base),
            ]
            print_table(["side", "check", "value"], checks, "correctness (cheap checks)", "lll")
            for e in (px.errors + ref.errors)[:5]:
                print(f"  error: {e}")
            for m in missing[:5]:
                print(f"  endpoint without its veth after attaching: {m}")
            if orphans:
                print("  reconcile deleted as orphans: "
                      + ", ".join(f"{n} at {w:%H:%M:%S}" for w, n in orphans[:5])
                      + f" (attach phase {start:%H:%M:%S}-{middle:%H:%M:%S})")
        finally:
            netns_batch("del", names)
    return 0


if __name__ == "__main__":
    sys.exit(main())

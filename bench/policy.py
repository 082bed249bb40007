"""Network policy at the issue's sizes: compile and apply time of plexus's policy table, and
what the policies in force cost real traffic (against the same policies as linear rules).

    tests/sandbox .venv/bin/python bench/policy.py [--endpoints 10000] [--policies 1000]
        [--nodes 100] [--budget 1800] [--traffic-policies 100,1000] [--connects 2000]
        [--seconds 4] [--rounds 3] [--skip-apply] [--skip-traffic]
    quick (< 1 min):  ... bench/policy.py --quick

Apply (simulated endpoints, real compiler, renderer and kernel). A cluster in realistic shapes
(bench/_policy_gen.py: namespaces of 20 apps x 5 replicas sharing labels, 10 policies per
namespace, NetworkPolicy and CiliumNetworkPolicy, selectors across namespaces, named ports,
port ranges, ipBlocks with excepts), its endpoints spread over --nodes hosts, this host being
one of them. What the policy reconciler does on each change, timed step by step: compile
(the compiler's answer to the change: ``Compiler.compile`` for the first, then
``Compiler.policies`` / ``Compiler.endpoint`` and their element deltas), render (the JSON
batch: the whole table, or the delta), and the nft batch (libnftables, in a namespace of its
own). Changes, one after the other: one policy changed (a port), one endpoint
added that 100 policies select (the first monitoring pod: a new identity), one label change
to an existing identity and one to a new identity. Compiles are bounded by --budget seconds in
all; one that runs out is reported as such and the rest skipped. Where the time goes: cProfile
of a full compile at a tenth of the size (cProfile multiplies the time by ~10), and of the
full render.

Traffic (bench/_policy_traffic.py): a real agent, containers started with ``plexus run``,
policies with ``plexus policy apply``; TCP connect latency and iperf3 single-stream throughput
between two containers with 0, 100 and 1,000 policies in force, then the same policies as a
linear chain of rules (bench/_policy_linear.py) in a table of their own instead.

Figures are printed next to the targets and the anchors; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import _policy_gen as gen
from _common import header, netns_batch, print_table, require_sandbox, sh

from plexus.agent.reconcilers.policy import settle
from plexus.dataplane.nft import policy as render
from plexus.dataplane.nft import setelem
from plexus.dataplane.nft.libnft import LibNft
from plexus.dataplane.nft.policy_table import PolicyTable
from plexus.dataplane.nft.setelem import ElementChannel
from plexus.model.types import Endpoint
from plexus.policy.compile import Compiler, Inputs
from plexus.policy.evaluate import Evaluator, Workload
from plexus.policy.journal import Delta, Sets
from plexus.policy.model import EndpointSelector, Policy

NETNS = "polbench"
NODE = "n0"
TARGETS = {"full": 1000.0, "change": 20.0}  # ms
ANCHORS = [
    "Cilium: policy enforced < 600 ms per endpoint, < 5 s cluster-wide",
    "OVN-Kubernetes: ~2 s until a deny policy is active",
    "Antrea: 10k pods x 10k policies computed in about 2 s",
]


class OutOfBudget(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Interrupts the (pure Python) work inside after ``seconds``."""
    def expire(_sig: int, _frame: Any) -> None:
        raise OutOfBudget

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Step:
    name: str
    target: float
    compile_ms: float = float("nan")
    render_ms: float = float("nan")
    nft_ms: float = float("nan")
    changed: int = 0
    total_elements: int = 0
    note: str = ""

    @property
    def total(self) -> float:
        return self.compile_ms + self.render_ms + self.nft_ms


class Bench:
    """The reconciler's work, change by change, against a real table in NETNS: the compiler's
    answer to each change (its element delta) rendered and sent as one batch."""

    def __init__(self, shape: gen.Shape, nft: LibNft, seconds: float) -> None:
        self.shape = shape
        self.nft = nft
        self.left = seconds
        self.compiler = Compiler()
        self.policies = gen.policies(shape)
        self.endpoints = {ep.store_key: ep for ep in gen.endpoints(shape)}
        self.namespaces = gen.namespaces(shape)
        self.chains: dict[str, str] | None = None  # None: no table yet
        self.table = PolicyTable(nft, ElementChannel(f"/run/netns/{NETNS}"))  # as the agent's

    def inputs(self) -> Inputs:
        return Inputs(self.policies, self.namespaces, self.endpoints, NODE)

    def step(self, name: str, target: float, change: Callable[[], Delta] | None = None) -> Step:
        """``change``: the compiler call for one change; None: compile everything."""
        s = Step(name, target)
        if self.left <= 0:
            s.note = "skipped: compile budget spent"
            return s
        t0 = time.perf_counter()
        try:
            with budget(self.left):
                delta = self.compiler.compile(self.inputs()) if change is None else change()
        except OutOfBudget:
            s.note = f"compile not done after {self.left:.0f} s (--budget)"
            self.left = 0
            return s
        t1 = time.perf_counter()
        self.left -= t1 - t0
        if self.chains is None:  # a new table (the agent's PolicyTable.replace)
            t2 = t1
            self.table.replace_sync(self.compiler.sets, self.compiler.chains)
        else:  # the delta is rendered as it is sent (the agent's PolicyTable.change)
            t2 = t1
            self.table.change_sync([delta], self.chains, self.compiler.chains)
        t3 = time.perf_counter()
        if change is None:
            settle()  # as the agent does once a full compile is in force (after the timing)
        s.compile_ms, s.render_ms, s.nft_ms = 1000 * (t1 - t0), 1000 * (t2 - t1), 1000 * (t3 - t2)
        s.total_elements = sum(len(e) for e in self.compiler.sets.values())
        s.changed = s.total_elements if self.chains is None else sum(
            len(v) for part in (delta.added, delta.removed) for v in part.values())
        self.chains = dict(self.compiler.chains)
        return s


def selecting(policies: list[Policy], namespaces: dict[str, dict[str, str]],
              ep: Endpoint) -> int:
    """Policies that select ``ep``, as their subject or as a peer of one of their rules."""
    ev = Evaluator(policies, namespaces)
    w = Workload(ep.name, ep.policy_namespace, ep.labels)
    return sum(1 for p in policies if ev.selects(p, w) or any(
        isinstance(peer, EndpointSelector) and ev.selector_matches(peer, w)
        for r in (*p.ingress, *p.egress) for peer in r.peers))


def run_changes(b: Bench) -> list[Step]:
    steps = [b.step("full compile and apply", TARGETS["full"])]
    i = next(n for n, p in enumerate(b.policies) if p.name.startswith("allow-app"))
    b.policies[i] = gen.changed_policy(b.policies[i])
    steps.append(b.step(f"one policy changed ({b.policies[i].ref})", TARGETS["change"],
                        lambda: b.compiler.policies(b.policies)))
    new = gen.monitoring_endpoint(len(b.endpoints) + 1)
    b.endpoints[new.store_key] = new
    n = selecting(b.policies, b.namespaces, new)
    steps.append(b.step(f"one endpoint added, {n} policies select it", TARGETS["change"],
                        lambda: b.compiler.endpoint(new.store_key, new)))
    key = next(k for k, e in b.endpoints.items() if e.node == NODE)
    ep = b.endpoints[key]
    other = f"app-{(int(ep.labels['app'][4:]) + 1) % b.shape.apps:02}"
    b.endpoints[key] = gen.relabelled(ep, app=other)
    steps.append(b.step("one label change (to an existing identity)", TARGETS["change"],
                        lambda: b.compiler.endpoint(key, b.endpoints[key])))
    b.endpoints[key] = gen.relabelled(b.endpoints[key], version="canary")
    steps.append(b.step("one label change (to a new identity)", TARGETS["change"],
                        lambda: b.compiler.endpoint(key, b.endpoints[key])))
    return steps


def kernel_elements() -> dict[str, int]:
    """Elements per set of the table as ``nft -j list`` reads them back (independent view)."""
    import json
    out = sh("nsenter", f"--net=/run/netns/{NETNS}", "--", "nft", "-j", "list", "table",
             render.FAMILY, render.TABLE, timeout=300).stdout
    sizes: dict[str, int] = {}
    for o in json.loads(out)["nftables"]:
        for kind in ("set", "map"):
            if kind in o:
                sizes[o[kind]["name"]] = len(o[kind].get("elem", []) or [])
    return sizes


def profile(fn: Callable[[], object], top: int = 8) -> list[list[object]]:
    """The functions where ``fn`` spends its own time, with their share."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    stats = pstats.Stats(pr, stream=io.StringIO())
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    rows = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    def where(f: str) -> str:
        return f.rsplit("/src/", 1)[-1] if "/src/" in f else f.rsplit("/", 1)[-1]

    return [[f"{where(f)}:{line} {name}", f"{v[1]:,}", f"{v[2]:.2f}",
             f"{100 * v[2] / total:.0f}%", f"{v[3]:.2f}"] for (f, line, name), v in rows]


def _ms(v: float) -> str:
    return "-" if v != v else f"{v:,.1f}"


def _verdict(s: Step) -> str:
    if s.total != s.total:
        return "n/a"
    return f"{s.total / s.target:.2f}x ({'met' if s.total <= s.target else 'MISSED'})"


def apply_part(shape: gen.Shape, seconds: float) -> None:
    header(f"Policy compile and apply: {shape.endpoints:,} endpoints, {shape.policies:,} "
           f"policies, {shape.nodes} host(s)", [
               f"{shape.namespaces} namespaces x {shape.apps} apps x {shape.replicas} replicas, "
               f"{shape.per_ns} policies per namespace; this host is {NODE}",
               f"real Compiler + nft.policy renderer + libnftables batch in netns {NETNS}",
               "compile = the compiler's answer to the change (Compiler.compile for the first, "
               "then its answer to each change)",
           ])
    netns_batch("add", [NETNS])
    nft = LibNft(NETNS)
    try:
        b = Bench(shape, nft, seconds)
        local = sum(1 for e in b.endpoints.values() if e.node == NODE)
        print(f"  endpoints on this host: {local}; compile budget {seconds:.0f} s")
        steps = run_changes(b)
        rows = [[s.name, _ms(s.compile_ms), _ms(s.nft_ms), _ms(s.total),
                 f"{s.changed:,}", f"<= {s.target:,.0f}", _verdict(s)] for s in steps]
        print_table(["change", "compile ms", "render+apply ms", "total ms", "elements +/-",
                     "target ms", "total/target"], rows, "time per change (lower is better)")
        for s in steps:
            if s.note:
                print(f"  {s.name}: {s.note}")
        print("\n  anchors (their published figures, not measured here):")
        for a in ANCHORS:
            print(f"    {a}")
        if b.chains is not None:
            elements_report(b.compiler.sets, b.chains)
            render_profile(b.compiler.sets, b.chains)
    finally:
        with contextlib.suppress(Exception):
            nft.run_sync(render.render_teardown())
        nft.close()
        netns_batch("del", [NETNS])
    compile_profile(shape)


def elements_report(sets: Sets, chains: dict[str, str]) -> None:
    kernel = kernel_elements()
    rows = [[name, f"{len(e):,}", f"{kernel.get(name, -1):,}"]
            for name, e in sorted(sets.items()) if e or kernel.get(name)]
    rows.append(["total", f"{sum(len(e) for e in sets.values()):,}",
                 f"{sum(kernel.values()):,}"])
    print_table(["set / map", "compiled", "in the kernel (nft -j list)"], rows,
                f"elements after the last change ({len(chains)} policies with chains)")


def render_profile(sets: Sets, chains: dict[str, str]) -> None:
    def build() -> object:  # what a new table's batches are made of (PolicyTable.replace)
        return (render.render_table(sets, chains, hooked=False),
                setelem.batch(render.FAMILY, render.TABLE, render.writable_elements(sets), 1))

    rows = profile(build, top=5)
    print_table(["a new table's batches: function", "calls", "own s", "share", "cum s"],
                rows, "where the render time goes (cProfile)", align="lrrrr")


def compile_profile(shape: gen.Shape) -> None:
    small = replace(shape, endpoints=max(200, shape.endpoints // 10),
                    policies=max(20, shape.policies // 10), nodes=max(1, shape.nodes // 10))
    policies = gen.policies(small)
    endpoints = {ep.store_key: ep for ep in gen.endpoints(small)}
    namespaces = gen.namespaces(small)
    compiler = Compiler()
    rows = profile(lambda: compiler.compile(Inputs(policies, namespaces, endpoints, NODE)))
    print_table(["full compile: function", "calls", "own s", "share", "cum s"],
                rows, f"where the compile time goes (cProfile, {small.endpoints:,} endpoints, "
                f"{small.policies:,} policies, {small.nodes} host(s))", align="lrrrr")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--endpoints", type=int, default=10000)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=100,
                    help="hosts the endpoints are spread over (this host is one)")
    ap.add_argument("--budget", type=float, default=1800, help="seconds of compiling in all")
    ap.add_argument("--traffic-policies", default="100,1000")
    ap.add_argument("--connects", type=int, default=2000, help="TCP connects per setting")
    ap.add_argument("--seconds", type=int, default=4, help="iperf3 -t")
    ap.add_argument("--rounds", type=int, default=3, help="iperf3 runs per setting")
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--skip-traffic", action="store_true")
    args = ap.parse_args(argv)
    if not require_sandbox("policy.py"):
        return 2
    if args.quick:
        args.endpoints, args.policies, args.nodes = 400, 40, 4
        args.traffic_policies, args.connects, args.seconds, args.rounds = "10,100", 300, 1, 1
        args.budget = min(args.budget, 60)
    if not args.skip_apply:
        apply_part(gen.Shape(args.endpoints, args.policies, nodes=max(1, args.nodes)),
                   args.budget)
    if not args.skip_traffic:
        import _policy_traffic as traffic
        sizes = [int(x) for x in args.traffic_policies.split(",") if x.strip()]
        traffic.run(gen.Shape(args.endpoints, max(sizes), nodes=max(1, args.nodes)), sizes,
                    max(50, min(args.connects, 20000)), max(1, args.seconds),
                    max(1, min(args.rounds, 10)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

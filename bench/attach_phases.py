"""Where an attach's time goes, in-process: the agent's core built as the daemon builds it
(``wiring.build``: store, informer, reconcilers, nftables, DNS; no API server, no CLI), driven
by direct service calls, with selected steps timed by wrapping their methods.

    tests/sandbox .venv/bin/python bench/attach_phases.py [--count 100] [--burst 200]
                                                          [--parallel 8]

Phases: --count attaches one at a time (each waits until every reconciler applied it, as an API
attach does), then as many detaches, then as many CNI ADDs through the CNI service (the request
the shim would send, parsed and validated in-process); then a burst of --burst attaches with
--parallel in flight, during which the agent's own loop monitor (``plexus status``:
loop_stall_max_ms, reset before the burst) records the event loop's longest stall, which on a
shared machine also counts time the scheduler gave to other processes; so the loop's longest
single step in CPU time of its thread is shown too (``loop_stall.StepMeter``). The agent
runs in this process's namespace (the sandbox's); each container is an ``ip netns add``
namespace, made before the timing starts. Wall times suffer from other work on the machine;
CPU time per operation (the whole process's, and the event loop thread's alone) much less so.
Step names that a refactoring removed are reported as missing, not fatal. Only figures are
printed; nothing is asserted (timings never are).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import header, netns_batch, percentile, print_table, require_sandbox
from loop_stall import StepMeter

from plexus.agent import identity, wiring
from plexus.agent.wiring import Agent
from plexus.cni import validate
from plexus.config import AgentConfig
from plexus.dataplane.drivers import build_drivers
from plexus.dataplane.events import KernelEvents
from plexus.dataplane.host import HostNetlink
from plexus.dataplane.nft.firewall import NftFirewall
from plexus.dataplane.nft.libnft import open_nft
from plexus.services.endpoints import AttachSpec
from plexus.services.networks import NetworkSpec
from plexus.store import SqliteStore

# (module, class, method): the steps of an attach, detach and CNI ADD worth a line each.
STEPS = [
    ("plexus.services.endpoints", "EndpointService", "_validate"),
    ("plexus.services.endpoints", "EndpointService", "_commit"),
    ("plexus.services.endpoints", "EndpointService", "_mark_ready"),
    ("plexus.services.endpoints", "EndpointService", "release"),
    ("plexus.services.context", "Context", "settle"),
    ("plexus.services.context", "Context", "seen"),
    ("plexus.dataplane.drivers.bridge", "BridgeDriver", "ensure_endpoint"),
    ("plexus.dataplane.host", "HostNetlink", "delete_link"),
    ("plexus.agent.reconcilers.firewall", "FirewallReconciler", "reconcile_batch"),
    ("plexus.agent.reconcilers.dns", "DnsReconciler", "reconcile_batch"),
]
SUBNET = "10.50.0.0/20"


class Steps:
    """Wall time of each call of the wrapped methods, by method name."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.missing: list[str] = []

    def wrap_all(self) -> None:
        for module, cls_name, name in STEPS:
            cls = getattr(sys.modules.get(module) or __import__(module, fromlist=["_"]),
                          cls_name, None)
            original = getattr(cls, name, None)
            if original is None:
                self.missing.append(f"{cls_name}.{name}")
                continue
            wrapped = (self._wrap_async if asyncio.iscoroutinefunction(original)
                       else self._wrap_sync)(name, original)
            setattr(cls, name, wrapped)

    def _wrap_async(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.times.setdefault(name, []).append(time.perf_counter() - t0)
        return timed

    def _wrap_sync(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times.setdefault(name, []).append(time.perf_counter() - t0)
        return timed


def ms(values: list[float], p: float = 50) -> str:
    return f"{1000 * percentile(values, p):.2f}" if values else "-"


class Cpu:
    """CPU time per operation over a phase: the whole process's (every thread, and the kernel's
    work done in its syscalls) and the event loop thread's alone. Less sensitive than wall time
    to other processes on a shared machine."""

    def __init__(self) -> None:
        self.process, self.loop = time.process_time(), time.thread_time()  # on the loop

    def row(self, what: str, n: int) -> list[object]:
        process = (time.process_time() - self.process) / n
        loop = (time.thread_time() - self.loop) / n
        return [f"  {what}: CPU ms each, process / event-loop thread", "",
                f"{1000 * process:.2f}", f"{1000 * loop:.2f}"]


async def timed_each(n: int, call: Callable[[int], Awaitable[Any]],
                     pause: float = 0.0) -> list[float]:
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        await call(i)
        took.append(time.perf_counter() - t0)
        if pause:
            await asyncio.sleep(pause)  # lets the background deletions finish in between
    return took


async def sequential(agent: Agent, n: int, steps: Steps) -> list[list[object]]:
    def attach(prefix: str) -> Callable[[int], Awaitable[Any]]:
        return lambda i: agent.endpoints.attach(AttachSpec(
            container_id=f"{prefix}{i}", network="n", netns=f"/run/netns/{prefix}{i}"))

    async def cni_add(i: int) -> None:
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"k{i}", "CNI_NETNS": f"/run/netns/k{i}",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/nonexistent"}
        conf = {"cniVersion": "1.0.0", "name": "n", "type": "plexus"}
        await agent.cni.handle(validate.prepare("plexus", env, json.dumps(conf)))

    steps.times.clear()
    rows: list[list[object]] = []
    cpu = Cpu()
    took = await timed_each(n, attach("c"))
    rows += [["attach (one at a time)", n, ms(took), ms(took, 90)], cpu.row("attach", n)]
    took = await timed_each(n, lambda i: agent.endpoints.detach(f"c{i}", network="n"), 0.02)
    rows.append(["detach", n, ms(took), ms(took, 90)])
    cpu = Cpu()
    took = await timed_each(n, cni_add)
    rows += [["CNI ADD (in-process)", n, ms(took), ms(took, 90)], cpu.row("CNI ADD", n)]
    for name, values in steps.times.items():
        rows.append([f"  {name}", len(values), ms(values), ms(values, 90)])
    return rows


async def burst(agent: Agent, n: int, parallel: int) -> list[list[object]]:
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> float:
        async with gate:
            t0 = time.perf_counter()
            await agent.endpoints.attach(AttachSpec(
                container_id=f"b{i}", network="n", netns=f"/run/netns/b{i}"))
            return time.perf_counter() - t0

    StepMeter.install()
    agent.monitor.worst = StepMeter.longest = 0.0  # what follows is the burst's alone
    t0, cpu = time.perf_counter(), Cpu()
    took = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    stall = agent.status()["loop_stall_max_ms"]
    return [[f"attach burst ({parallel} in flight)", n, ms(list(took)), ms(list(took), 90)],
            cpu.row("attach", n),
            [f"  {n / wall:.0f} attaches/s; longest event-loop stall (loop_stall_max_ms)",
             "", f"{stall:.1f}", ""],
            ["  longest step of the event loop, CPU ms of its thread", "",
             f"{1000 * StepMeter.longest:.1f}", ""]]


async def prefill(agent: Agent, n: int, parallel: int) -> None:
    """``n`` endpoints attached before anything is measured, on networks of their own (at most
    1,000 ports a bridge): what grows with the agent's size, apart from the measured bridge's."""
    nets = (n + 999) // 1000
    for k in range(nets):
        await agent.networks.create(NetworkSpec(name=f"f{k}", subnets=[f"10.{200 + k}.0.0/22"]))
    netns_batch("add", [f"f{i}" for i in range(n)])
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with gate:
            await agent.endpoints.attach(AttachSpec(
                container_id=f"f{i}", network=f"f{i // 1000}", netns=f"/run/netns/f{i}"))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    print(f"  prefilled {n} endpoints on {nets} networks in {time.perf_counter() - t0:.1f}s",
          flush=True)


async def main(args: argparse.Namespace) -> None:
    steps = Steps()
    steps.wrap_all()
    tmp = Path(tempfile.mkdtemp(prefix="plexus-phases-"))
    cfg = AgentConfig(state_dir=tmp, socket=tmp / "s", node="n1", dns_workers=1)
    store = SqliteStore(tmp / "db")
    owner = await identity.agent_owner(store, cfg.node)
    host = HostNetlink(owner)
    agent = wiring.build(cfg, store, build_drivers(host, owner), NftFirewall(open_nft()), host,
                         host, dns=wiring.dns_service(cfg), kernel_events=KernelEvents(None),
                         link_state=host.link_state)
    await agent.start()
    try:
        await agent.networks.create(NetworkSpec(name="n", subnets=[SUBNET]))
        netns_batch("add", [f"{p}{i}" for p in "ck" for i in range(args.count)]
                    + [f"b{i}" for i in range(args.burst)])
        if args.prefill:
            await prefill(agent, args.prefill, args.parallel)
        rows = await sequential(agent, args.count, steps)
        rows += await burst(agent, args.burst, args.parallel)
    finally:
        await agent.close()
        await store.close()
    print_table(["phase / step", "n", "p50 ms", "p90 ms"], rows, "", "lrrr")
    if steps.missing:
        print(f"  steps not found (renamed?): {', '.join(steps.missing)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--count", type=int, default=100, help="attaches, detaches and CNI ADDs")
    ap.add_argument("--burst", type=int, default=200, help="attaches in the parallel burst")
    ap.add_argument("--parallel", type=int, default=8, help="attaches in flight in the burst")
    ap.add_argument("--prefill", type=int, default=0,
                    help="endpoints attached on other networks before measuring")
    parsed = ap.parse_args()
    if require_sandbox("attach_phases.py"):
        header("where an attach's time goes (in-process agent, steps timed by wrapping)", [
            f"{parsed.count} containers one at a time; then {parsed.burst} with "
            f"{parsed.parallel} in flight; network n {SUBNET}, agent in the sandbox's netns"])
        asyncio.run(main(parsed))

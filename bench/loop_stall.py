"""Event-loop stalls while plexus reads the kernel's links: the agent's on-loop pyroute2 dump
(``links.owned_links``) against ``events.owned_links_snapshot``, and a burst of veth deletions
consumed by pyroute2's AsyncIPRoute against ``events.KernelEvents``.

    tests/sandbox .venv/bin/python bench/loop_stall.py [N ...]      (default: 1000 5000)

For each N, a fresh netns gets N veth pairs whose host ends carry a plexus alias, are up and are
ports of plexus-aliased bridges (1,000 ports each; the kernel allows 1,024). A ticker task sleeps
1 ms at a time; the longest gap between its wake-ups is the loop's worst stall ("max stall").
On a shared machine that gap also counts time the scheduler gave to other processes, so the loop
is also measured in CPU time of its thread: its longest single step ("cpu step") and all its
steps together ("loop cpu"), which preemption inflates less (waits, such as for the GIL held by
another thread, do not count). The burst is ``ip link del group G``: the kernel deletes all N
pairs in one request and the notifications (~6 per pair) come as fast as it can make them; the
pairs are made again for each burst, and a burst with no consumer gives the baseline (what the
kernel's deletion work alone does to the loop). IPv6 is off in the namespace (see run_one).
Only figures are printed; nothing is asserted (timings never are).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from typing import Any

from _common import header, percentile, print_table, ratio, require_sandbox, sh
from pyroute2 import AsyncIPRoute

from plexus.dataplane import events, links, netns, rtnl
from plexus.dataplane.events import KernelEvents, LinkChange, LinkEvent, Resync, ResyncReason

GROUP = 7  # IFLA_GROUP of the veths, so that one request deletes them all
PORTS_PER_BRIDGE = 1000
REPEATS = 3
RCVBUF = 4 << 20  # both consumers get the same socket buffer
QUIET = 0.5  # a burst is over when nothing has arrived for this long
SETTLED_MS = 10.0  # the kernel's follow-up work on new links (IPv6 DAD, MLD) is over when a
SETTLE_MAX = 30.0  # second of idle loop has no gap longer than this, or after SETTLE_MAX s
SO_RCVBUFFORCE = 33
OWNER = "bench@00000000"  # the agent whose links these are (links.tag)


def populate(ns: str, n: int, bridges: bool) -> float:
    """N aliased veth pairs, up, as bridge ports; returns seconds. Adds first, then attaches:
    interleaving the two is several times slower in the kernel."""
    lines = []
    if bridges:
        for b in range((n - 1) // PORTS_PER_BRIDGE + 1):
            lines += [f"link add br{b} type bridge",
                      f"link set br{b} alias {links.tag(OWNER, f'net:n{b}')} up"]
    lines += [f"link add pxv{i} group {GROUP} type veth peer name pxc{i}" for i in range(n)]
    for i in range(n):
        lines += [f"link set pxv{i} alias {links.tag(OWNER, f'ep:c{i}/eth0')} "
                  f"master br{i // PORTS_PER_BRIDGE} up",
                  f"link set pxc{i} up"]
    t0 = time.perf_counter()
    sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(lines) + "\n", timeout=1800)
    return time.perf_counter() - t0


class StepMeter:
    """The longest step of the event loop (one callback or task step) in CPU time of the loop
    thread: every asyncio.Handle runs through ``Handle._run``, wrapped here for the bench."""

    longest = 0.0
    total = 0.0
    _original: Callable[[asyncio.Handle], None] | None = None

    @classmethod
    def install(cls) -> None:
        if cls._original is not None:
            return
        original = cls._original = asyncio.events.Handle._run

        def run(handle: asyncio.Handle) -> None:
            t0 = time.thread_time()
            try:
                original(handle)
            finally:
                spent = time.thread_time() - t0
                cls.longest = max(cls.longest, spent)
                cls.total += spent

        asyncio.events.Handle._run = run  # type: ignore[method-assign]


class Ticker:
    """Gaps between wake-ups of a task that sleeps 1 ms at a time: the longest is the loop's
    worst stall as a user sees it; and the loop's longest step and total work in CPU time."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.cpu_ms = 0.0
        self.busy_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def worst_ms(self) -> float:
        return max(self.gaps, default=0.0) * 1e3

    @property
    def p99_ms(self) -> float:
        return percentile(self.gaps, 99) * 1e3 if self.gaps else 0.0

    async def __aenter__(self) -> Ticker:
        StepMeter.install()
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)
        StepMeter.longest = StepMeter.total = 0.0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cpu_ms, self.busy_ms = StepMeter.longest * 1e3, StepMeter.total * 1e3
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now


@dataclass
class Figures:
    stall_ms: float  # the longest gap
    p99_ms: float
    cpu_ms: float  # the longest loop step, CPU time
    busy_ms: float  # the loop's CPU time, all steps
    wall_ms: float
    found: int


async def measure(fn: Callable[[], Awaitable[Sized]]) -> Figures:
    """Medians over REPEATS runs (one preemption by another process would otherwise decide)."""
    runs = []
    for _ in range(REPEATS):
        async with Ticker() as ticker:
            t0 = time.perf_counter()
            found = len(await fn())
            wall = time.perf_counter() - t0
        runs.append((ticker.worst_ms, ticker.p99_ms, ticker.cpu_ms, ticker.busy_ms, wall * 1e3))
    return Figures(*(statistics.median(r[i] for r in runs) for i in range(5)), found)


async def settle() -> tuple[float, Figures]:
    """Wait until an idle loop runs smoothly; returns (seconds waited, the last idle second)."""
    t0 = time.perf_counter()
    while True:
        async with Ticker() as idle:
            await asyncio.sleep(1)
        waited = time.perf_counter() - t0
        if idle.worst_ms < SETTLED_MS or waited > SETTLE_MAX:
            return waited, Figures(idle.worst_ms, idle.p99_ms, idle.cpu_ms, idle.busy_ms, 0, 0)


async def on_loop_dump(path: str) -> list[rtnl.LinkInfo]:
    """The alternative not chosen: the same parser on the loop, one datagram per loop turn."""
    loop = asyncio.get_running_loop()
    found: list[rtnl.LinkInfo] = []
    buf = bytearray(65536)
    with await asyncio.to_thread(netns.netlink_socket, path) as sock:
        sock.setblocking(False)
        sock.send(rtnl.dump_request(1))
        while True:
            size = await loop.sock_recv_into(sock, buf)
            if rtnl.dump_chunk(memoryview(buf)[:size], 1, found)[0]:
                return [link for link in found if link.alias is not None]
            await asyncio.sleep(0)  # sock_recv_into does not suspend when data is waiting


async def snapshots(path: str) -> dict[str, Figures]:
    waited, idle = await settle()
    print(f"  settled after {waited:.0f}s (idle loop: max gap {idle.stall_ms:.1f} ms)", flush=True)
    ipr = AsyncIPRoute(fileno=netns.netlink_socket(path).detach())
    await ipr.setup_endpoint()
    try:
        old = await measure(lambda: links.owned_links(ipr, OWNER))
    finally:
        ipr.close()
    return {
        "idle": idle,
        "old": old,
        "new": await measure(lambda: events.owned_links_snapshot(path, owner=OWNER)),
        "alt": await measure(lambda: on_loop_dump(path)),
    }


@dataclass
class Burst:
    stall_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms: float = 0.0
    busy_ms: float = 0.0
    events: int = 0
    owned_deleted: int = 0
    resyncs: int = 0
    drain_s: float = 0.0
    last: float = 0.0
    note: str = ""


async def burst(ns: str, consume: Callable[[Burst], Awaitable[None]]) -> Burst:
    """Delete every veth of group GROUP while ``consume`` reads the notifications."""
    await settle()
    stats = Burst()
    task = asyncio.create_task(consume(stats))
    await asyncio.sleep(0.2)  # subscribed, START handled
    async with Ticker() as ticker:
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("ip", "-n", ns, "link", "del", "group",
                                                    str(GROUP))
        await asyncio.wait_for(proc.wait(), 600)
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline and time.perf_counter() - max(stats.last, t0) < QUIET:
            await asyncio.sleep(0.05)
    stats.drain_s = stats.last - t0 if stats.last else 0.0
    stats.stall_ms, stats.p99_ms = ticker.worst_ms, ticker.p99_ms
    stats.cpu_ms, stats.busy_ms = ticker.cpu_ms, ticker.busy_ms
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return stats


async def consume_nothing(path: str, stats: Burst) -> None:
    """The baseline: what the deletion alone (the kernel, the ip process) does to the loop."""
    await asyncio.Event().wait()


async def consume_new(path: str, stats: Burst) -> None:
    """A reconciler's intake: count what it would enqueue."""
    async with KernelEvents(path, rcvbuf=RCVBUF) as stream:
        async for event in stream:
            if event == Resync(ResyncReason.START):
                continue
            stats.events += 1
            stats.last = time.perf_counter()
            if isinstance(event, Resync):
                stats.resyncs += 1
                stats.note = f"Resync({event.reason.value})"
            elif (isinstance(event, LinkEvent) and event.change is LinkChange.DELETED
                  and event.link.alias is not None):
                stats.owned_deleted += 1


async def _subscribed_ipr(path: str) -> Any:
    ipr = AsyncIPRoute(fileno=netns.netlink_socket(path).detach())
    await ipr.bind(groups=rtnl.RTMGRP_LINK | rtnl.RTMGRP_IPV4_IFADDR
                   | rtnl.RTMGRP_IPV6_IFADDR)
    ipr.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    return ipr


async def consume_pyroute2(path: str, stats: Burst) -> None:
    """What the agent would do with its netlink library: bind the groups, read, filter."""
    ipr = await _subscribed_ipr(path)
    try:
        while True:
            try:
                async for msg in ipr.get():
                    stats.events += 1
                    stats.last = time.perf_counter()
                    if (msg["header"]["type"] == rtnl.RTM_DELLINK and msg["family"] == 0
                            and (msg.get("ifalias") or "").startswith("plexus:")):
                        stats.owned_deleted += 1
            except Exception as exc:  # ENOBUFS leaves the object unusable: start again
                stats.resyncs += 1
                stats.note = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):
                    ipr.close()
                ipr = await _subscribed_ipr(path)
    finally:
        with contextlib.suppress(Exception):
            ipr.close()


def run_one(n: int) -> dict[str, Any]:
    name = f"stall{n}"
    path = netns.create_named(name)
    # Without IPv6 on the new links: its per-link follow-up work (DAD, MLD reports, router
    # solicitations) for 2N links kept both CPUs busy for minutes at N=5000 and drowned the
    # figures; the kernel's link events are the same, only the fe80:: address events go.
    for scope in ("all", "default"):
        netns.write_sysctl(path, f"net.ipv6.conf.{scope}.disable_ipv6", "1")
    try:
        made = populate(name, n, bridges=True)
        print(f"N={n}: {n} veth pairs made in {made:.1f}s", flush=True)
        snap = asyncio.run(snapshots(path))
        consumers = {"new": consume_new, "old": consume_pyroute2, "none": consume_nothing}
        runs: dict[str, list[Burst]] = {label: [] for label in consumers}
        for i in range(REPEATS):
            for label, consume in consumers.items():
                if i or label != "new":  # the first burst deletes the snapshot's links
                    populate(name, n, bridges=False)
                runs[label].append(asyncio.run(burst(name, functools.partial(consume, path))))
    finally:
        netns.delete_named(name)
    return {"n": n, "snap": snap, "burst_new": medians(runs["new"]),
            "burst_old": medians(runs["old"]), "burst_none": medians(runs["none"])}


def medians(runs: list[Burst]) -> Burst:
    """Field by field; the error note of the last run that had one."""
    numbers = [f.name for f in dataclasses.fields(Burst) if f.name != "note"]
    merged = Burst(**{k: statistics.median(getattr(r, k) for r in runs) for k in numbers})
    merged.note = next((r.note for r in reversed(runs) if r.note), "")
    return merged


def report(r: dict[str, Any]) -> None:
    n, snap = r["n"], r["snap"]
    rows = [
        ["idle loop (1 s, after settling)", *_snap_cells(snap["idle"])[:4], "-", "-"],
        ["old: links.owned_links, pyroute2 on the loop", *_snap_cells(snap["old"])],
        ["new: owned_links_snapshot (worker thread)", *_snap_cells(snap["new"])],
        ["alt: same parser on the loop, chunked", *_snap_cells(snap["alt"])],
    ]
    print_table(["owned-link snapshot", "max stall ms", "p99 gap ms", "cpu step ms", "loop cpu ms",
                 "wall ms", "links"], rows,
                title=f"N={n}: snapshot (medians of {REPEATS} runs)")
    rows = [[label, f"{b.stall_ms:.1f}", f"{b.p99_ms:.1f}", f"{b.cpu_ms:.1f}", f"{b.busy_ms:.0f}",
             b.events, b.owned_deleted,
             b.resyncs, f"{b.drain_s:.1f}"]
            for label, b in (("no consumer (the deletion alone)", r["burst_none"]),
                             ("old: pyroute2 AsyncIPRoute.get()", r["burst_old"]),
                             ("new: KernelEvents", r["burst_new"]))]
    print_table(["consumer", "max stall ms", "p99 gap ms", "cpu step ms", "loop cpu ms",
                 "received", "owned DELETED", "resyncs", "drain s"],
                rows, title=f"N={n}: burst of {n} veth deletions (ip link del group), medians of "
                            f"{REPEATS} bursts")
    for label, b in (("old", r["burst_old"]), ("new", r["burst_new"])):
        if b.note:
            print(f"  {label}: last error {b.note}")


def _snap_cells(f: Figures) -> list[str]:
    return [f"{f.stall_ms:.1f}", f"{f.p99_ms:.1f}", f"{f.cpu_ms:.1f}", f"{f.busy_ms:.0f}",
            f"{f.wall_ms:.0f}", str(f.found)]


def summary(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        s, bo, bn = r["snap"], r["burst_old"], r["burst_new"]
        so, sn = s["old"], s["new"]
        rows.append([r["n"],
                     f"{so.stall_ms:.1f}", f"{sn.stall_ms:.1f}", ratio(so.stall_ms, sn.stall_ms),
                     f"{so.cpu_ms:.1f}", f"{sn.cpu_ms:.1f}", ratio(so.cpu_ms, sn.cpu_ms),
                     f"{bo.stall_ms:.1f}", f"{bn.stall_ms:.1f}", ratio(bo.stall_ms, bn.stall_ms),
                     f"{bo.cpu_ms:.1f}", f"{bn.cpu_ms:.1f}", ratio(bo.cpu_ms, bn.cpu_ms)])
    print_table(["N", "snapshot old", "new", "old/new", "cpu step old", "new", "old/new",
                 "burst old", "new", "old/new", "cpu step old", "new", "old/new"], rows,
                title="event-loop stalls, ms: max stall and longest CPU step (old = pyroute2)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="*", default=[1000, 5000], help="veth pairs")
    args = ap.parse_args(argv)
    if not require_sandbox("loop_stall.py"):
        return 2
    header("event-loop stalls: link snapshot and deletion burst, old vs new", [
        "stall = longest gap between wake-ups of a task sleeping 1 ms",
        f"python {sys.version.split()[0]}, switch interval {sys.getswitchinterval() * 1e3:.0f} ms",
    ])
    results = []
    for n in args.n:
        results.append(run_one(n))
        report(results[-1])
    summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

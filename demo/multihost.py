"""The demo's multi-host act: etcd plus three simulated hosts, one overlay network across them.

A real etcd and three agents (``--store etcd://...``), one container per host on an overlay
network; containers of different hosts talk over VXLAN and find each other by name; the kernel
of each host holds one FDB and one neighbour entry per other host and one route per other
host's block; one agent is killed with SIGKILL while its container keeps answering, then comes
back and changes nothing.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from demo.acts import Check
from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, Probe, tcp_probe
from tests.harness.world import Agent, World, nsexec

HOSTS = ["host1", "host2", "host3"]


def _until(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _answered(ns: str, ip: str) -> Probe:
    probe = tcp_probe(ns, ip, 80, 1.0)
    for _ in range(30):  # another host's routes follow within moments
        if probe.outcome is ANSWERED:
            break
        time.sleep(0.2)
        probe = tcp_probe(ns, ip, 80, 1.0)
    return probe


def _kernel_counts(host: str) -> tuple[int, int, int]:
    """(FDB entries, neighbours, routes) plexus programmed on the overlay's VXLAN device."""
    links = json.loads(nsexec(host, "ip", "-j", "-d", "link", "show", "type", "vxlan").stdout)
    dev = links[0]["ifname"]
    fdb = [e for e in json.loads(nsexec(host, "bridge", "-j", "fdb", "show", "dev", dev).stdout)
           if e.get("dst")]
    neigh = json.loads(nsexec(host, "ip", "-j", "neigh", "show", "dev", dev).stdout)
    routes = json.loads(nsexec(host, "ip", "-j", "route", "show", "dev", dev, "proto",
                               "112").stdout)
    return len(fdb), len(neigh), len(routes)


def _traffic(agents: list[Agent], out: list[Check]) -> None:
    for src, dst in ((0, 1), (1, 2), (2, 0)):
        a, b = agents[src], agents[dst]
        target = f"c{dst + 1}"
        got = _answered(a.netns(f"c{src + 1}"), b.address(target, "ov"))
        out.append(Check(f"c{src + 1} ({a.host}) → {target} ({b.host}) over VXLAN",
                         f"answer {target}", str(got), got.answer.startswith(target)))
    lookup = agents[0].cli("dns", "lookup", "c3", "--network", "ov", check=False).stdout
    want = agents[2].address("c3", "ov")
    out.append(Check("host1's DNS answers for c3 (on host3)", want,
                     lookup.split("\n")[0][:60], want in lookup))


def _kill_and_return(agents: list[Agent], store: str, out: list[Check], figures: Table) -> None:
    a1, a2 = agents[0], agents[1]
    before = [_kernel_counts(h) for h in HOSTS]
    c2 = a2.address("c2", "ov")
    a2.kill(signal.SIGKILL)
    got = _answered(a1.netns("c1"), c2)
    out.append(Check("host2's agent killed -9: c2 still answers c1", "answer c2", str(got),
                     got.answer.startswith("c2")))
    down = _until(lambda: not {h["name"]: h for h in a1.json("host", "ls")}["host2"]["alive"])
    out.append(Check("host1 sees host2 down once its lease runs out", "down",
                     "down" if down else "still alive", down))
    a2.start(extra=["--store", store])
    time.sleep(1.0)  # its start-up sync, and the others' reaction to its lease
    after = [_kernel_counts(h) for h in HOSTS]
    out.append(Check("host2's agent back: nothing duplicated on any host", str(before),
                     str(after), before == after))
    counts = [f"{h} {c[0]}/{c[1]}/{c[2]}" for h, c in zip(HOSTS, after, strict=True)]
    figures.add_row("per host: FDB / neighbours / routes on the VXLAN device", ", ".join(counts))


def multi_host(workdir: Path, console: Console) -> list[Check]:
    out: list[Check] = []
    figures = Table(title="several hosts: etcd, one overlay network")
    figures.add_column("what")
    figures.add_column("figure")
    with World(workdir / "world") as world, cluster(world, workdir, HOSTS) as (etcd, agents):
        console.print(f"etcd at {etcd.url}; agents on {', '.join(HOSTS)}")
        agents[0].cli("network", "create", "ov", "--driver", "overlay", "--subnet",
                      "10.78.0.0/24", "--block-size", "28")
        _until(lambda: all("ov" in {n["name"] for n in a.json("network", "ls")}
                           for a in agents))
        started = time.monotonic()
        for i, agent in enumerate(agents, 1):
            agent.run_echo(f"c{i}", "ov")
        figures.add_row("3 containers started, one per host",
                        f"{1000 * (time.monotonic() - started):.0f} ms")
        for h in agents[0].json("host", "ls"):
            figures.add_row(f"{h['name']} ({h['address']})", f"blocks {', '.join(h['blocks'])}")
        _traffic(agents, out)
        _kill_and_return(agents, etcd.url, out, figures)
    console.print(figures)
    return out

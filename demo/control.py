"""The demo's control-plane act: a restart changes nothing that is right, drift is repaired.

Run after the topology is built: it restarts the agent and compares the host's namespace
before and after (a restart must change no link, address, route or rule), then deletes
a container's veth and the bridge's gateway address by hand and times how long the agent takes
to notice (kernel events) and put them back.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from demo.acts import Check
from tests.harness.world import World, nsexec, tcp_request

AGENT_OPTIONS = ["--metrics-address", "9100"]  # host1's agent (demo/__main__.py)


def kernel_state(ns: str) -> dict[str, list[Any]]:
    """What a restart must not change, read with ip and nft: links (index, name, master,
    flags, mtu, MAC, alias), addresses, routes, and the nftables table without its handles.
    (Not `ip monitor`: the kernel re-announces bridge ports on its own every few hundred ms.)"""
    def read(*argv: str) -> list[dict[str, Any]]:
        return list(json.loads(nsexec(ns, *argv).stdout or "[]"))

    keep = ("ifindex", "ifname", "master", "flags", "mtu", "address", "ifalias")
    links = sorted(tuple(str(link.get(k)) for k in keep) for link in read("ip", "-j", "link"))
    addrs = sorted((a["ifname"], str(i.get("local")), str(i.get("prefixlen")))
                   for a in read("ip", "-j", "addr") for i in a.get("addr_info", []))
    routes = sorted(json.dumps(r, sort_keys=True) for r in read("ip", "-j", "route", "show",
                                                                "table", "all"))
    table = json.loads(nsexec(ns, "nft", "-j", "list", "table", "inet", "plexus").stdout)
    nft = sorted(json.dumps({k: {f: v for f, v in body.items() if f != "handle"}
                             for k, body in item.items()}, sort_keys=True)
                 for item in table["nftables"] if "metainfo" not in item)
    return {"links": links, "addresses": addrs, "routes": routes, "nftables": nft}


def changes(before: dict[str, list[Any]], after: dict[str, list[Any]]) -> list[str]:
    out = []
    for kind in before:
        old, new = set(map(str, before[kind])), set(map(str, after[kind]))
        out += [f"{kind} -{x}" for x in sorted(old - new)]
        out += [f"{kind} +{x}" for x in sorted(new - old)]
    return out


def _until(check: Callable[[], bool], timeout: float = 10.0) -> float | None:
    """Seconds until ``check`` holds (bounded), None if it never did."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def restart_and_repair(world: World, console: Console) -> list[Check]:
    a = world.agents["host1"]
    host = world.host_addr("host1")
    out: list[Check] = []
    figures = Table(title="control plane: one path to the kernel")
    figures.add_column("what")
    figures.add_column("figure")

    before = kernel_state("host1")
    a.kill(signal.SIGTERM)
    started = time.monotonic()
    a.start(extra=AGENT_OPTIONS)
    ready = time.monotonic() - started
    time.sleep(0.5)  # and the full pass that follows start-up
    changed = changes(before, kernel_state("host1"))
    figures.add_row("agent restart: time until ready", f"{1000 * ready:.0f} ms")
    figures.add_row("agent restart: kernel objects changed", str(len(changed)))
    out.append(Check("restart changes nothing in the kernel", "no change",
                     "; ".join(changed[:2]) or "no change", not changed))

    veth = a.container("web")["endpoints"][0]["host_ifname"]
    nsexec("host1", "ip", "link", "del", veth)
    took = _until(lambda: tcp_request("outside", host, 8080, 0.3).startswith("web"))
    figures.add_row("web's veth deleted by hand: serving again after",
                    "never" if took is None else f"{1000 * took:.0f} ms")
    out.append(Check("a deleted veth is put back (kernel event)", "web answers again",
                     "never" if took is None else "web answers again", took is not None))

    bridge = next(n["bridge"] for n in a.json("network", "ls") if n["name"] == "backend")
    nsexec("host1", "ip", "addr", "del", "10.90.0.1/24", "dev", bridge)
    took = _until(lambda: "10.90.0.1" in nsexec("host1", "ip", "-br", "addr", "show", "dev",
                                                bridge).stdout)
    figures.add_row("backend's gateway address deleted: back after",
                    "never" if took is None else f"{1000 * took:.0f} ms")
    out.append(Check("a deleted gateway address is put back", "10.90.0.1 is back",
                     "never" if took is None else "10.90.0.1 is back", took is not None))
    status = a.json("status")
    figures.add_row("objects the reconcilers are failing on", str(len(status["errors"])))
    console.print(figures)
    return out

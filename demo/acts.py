"""`make demo`: a small topology in a sandbox, proven with real traffic, then torn down.

outside (198.51.100.1 "internet", 203.0.113.100) ── host1 (agent)
                                                     ├─ frontend (dual stack): web, api
                                                     ├─ backend:               api, db
                                                     └─ vault (--internal):    secret
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from tests.harness.world import (
    ECHO,
    INTERNET_ADDR,
    OUTSIDE_ADDR,
    Agent,
    World,
    nsexec,
    ping_rtt_ms,
    sh,
    tcp_request,
    udp_request,
)

console = Console()


@dataclass
class Check:
    what: str
    expect: bool
    detail: str
    ok: bool


def build(world: World) -> None:
    a = world.agents["host1"]
    steps = [
        ("network create frontend --ipv6", ["network", "create", "frontend", "--ipv6"]),
        (
            "network create backend --subnet 10.90.0.0/24",
            ["network", "create", "backend", "--subnet", "10.90.0.0/24"],
        ),
        ("network create vault --internal", ["network", "create", "vault", "--internal"]),
    ]
    for label, args in steps:
        t = time.perf_counter()
        a.cli(*args)
        console.print(f"  plexus {label:<48} {1000 * (time.perf_counter() - t):6.1f} ms")
    runs = [
        ("web", ["frontend"], ["-p", "8080:80", "-p", "8053:80/udp"]),
        ("api", ["frontend", "backend"], ["-p", "127.0.0.1:9090:80"]),
        ("db", ["backend"], []),
        ("secret", ["vault"], []),
    ]
    for name, nets, opts in runs:
        t = time.perf_counter()
        a.run_echo(name, nets, *opts)
        console.print(f"  plexus run {name:<44} {1000 * (time.perf_counter() - t):6.1f} ms")
    for name, _, _ in runs:
        a.wait_listening(name)
    # An "internet" server in the outside namespace, to see what source address arrives.
    subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            "outside",
            sys.executable,
            ECHO,
            "internet",
            "80",
        ],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not tcp_request("outside", INTERNET_ADDR, 80, 0.3) and time.monotonic() < deadline:
        time.sleep(0.05)


def checks(world: World) -> list[Check]:
    a = world.agents["host1"]
    host = world.host_addr("host1")
    ns = {n: a.netns(n) for n in ("web", "api", "db", "secret")}
    ip = {n: a.address(n) for n in ns}
    api_backend = a.address("api", "backend")
    web6 = a.address("web", "frontend", 6)
    api6 = a.address("api", "frontend", 6)
    out: list[Check] = []

    def check(what: str, expect: bool, probe: Callable[[], str], want: str = "") -> None:
        reply = probe()
        ok = bool(reply) == expect and (not want or want in reply)
        out.append(Check(what, expect, reply or "no answer", ok))

    check("web → api (frontend, TCP)", True, lambda: tcp_request(ns["web"], ip["api"], 80), "api")
    check("web → api (frontend, IPv6)", True, lambda: tcp_request(ns["web"], api6, 80), "api")
    check("api → db (backend, UDP)", True, lambda: udp_request(ns["api"], a.address("db"), 80))
    check("web → db (other network)", False, lambda: tcp_request(ns["web"], ip["db"], 80, 1))
    check("db → web (other network)", False, lambda: tcp_request(ns["db"], ip["web"], 80, 1))
    check("db → api's frontend address", False, lambda: tcp_request(ns["db"], ip["api"], 80, 1))
    check("api → db via backend", True, lambda: tcp_request(ns["api"], a.address("db"), 80))
    check(
        "web → internet (masqueraded)",
        True,
        lambda: tcp_request(ns["web"], INTERNET_ADDR, 80),
        f"internet {host}",
    )
    check(
        "secret (internal) → internet",
        False,
        lambda: tcp_request(ns["secret"], INTERNET_ADDR, 80, 1),
    )
    check("secret (internal) → web", False, lambda: tcp_request(ns["secret"], ip["web"], 80, 1))
    check(
        "outside → host:8080 (published, source kept)",
        True,
        lambda: tcp_request("outside", host, 8080),
        f"web {OUTSIDE_ADDR}",
    )
    check("outside → host:8053/udp (published)", True, lambda: udp_request("outside", host, 8053))
    check("outside → web's address directly", False, lambda: _routed_probe(world, ip["web"]))
    check("host localhost:8080 → web", True, lambda: tcp_request("host1", "127.0.0.1", 8080))
    check(
        "web → host:8080 (hairpin to itself)",
        True,
        lambda: tcp_request(ns["web"], host, 8080),
        "web",
    )
    check(
        "api → host:8080 (hairpin to neighbour)",
        True,
        lambda: tcp_request(ns["api"], host, 8080),
        "web",
    )
    check(
        "host localhost:9090 → api (127.0.0.1 publish)",
        True,
        lambda: tcp_request("host1", "127.0.0.1", 9090),
        "api",
    )
    check(
        "outside → host:9090 (127.0.0.1 publish)",
        False,
        lambda: tcp_request("outside", host, 9090, 1),
    )
    check("host → web (host reaches containers)", True, lambda: tcp_request("host1", ip["web"], 80))
    check("web → api over IPv6 ping", True, lambda: "ok" if _ping6(ns["web"], api6) else "")
    check("web resolves api by name (plexus DNS)", True,
          lambda: _resolve(a, "web", "api"), ip["api"])
    check("db resolves web (not on its networks)", False, lambda: _resolve(a, "db", "web"))
    check("api resolves db.backend", True, lambda: _resolve(a, "api", "db.backend"),
          a.address("db"))
    del api_backend, web6
    return out


def _resolve(agent: Agent, container: str, name: str) -> str:
    """glibc's resolver in the container, with the resolv.conf plexus wrote for it."""
    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False).stdout
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def _ping6(ns: str, ip: str) -> bool:
    return nsexec(ns, "ping", "-6", "-c1", "-W1", ip, check=False).returncode == 0


def _routed_probe(world: World, ip: str) -> str:
    """The outside host adds a route to the container through the host and tries anyway."""
    host = world.host_addr("host1")
    nsexec("outside", "ip", "route", "replace", f"{ip}/32", "via", host)
    try:
        return tcp_request("outside", ip, 80, 1)
    finally:
        nsexec("outside", "ip", "route", "del", f"{ip}/32", check=False)


def report(world: World, results: list[Check]) -> bool:
    a = world.agents["host1"]
    t = Table(title="containers")
    for col in ("name", "networks", "addresses", "published"):
        t.add_column(col)
    for c in a.json("ps"):
        addrs = "\n".join(f"{e['network']}: {', '.join(e['addresses'])}" for e in c["endpoints"])
        t.add_row(c["name"], ", ".join(c["networks"]), addrs, ", ".join(c["ports"]) or "-")
    console.print(t)
    r = Table(title="what can reach what (real traffic)")
    for col in ("check", "expected", "observed", ""):
        r.add_column(col)
    for c in results:
        mark = "[green]ok[/green]" if c.ok else "[red]FAIL[/red]"
        r.add_row(c.what, "connects" if c.expect else "blocked", c.detail, mark)
    console.print(r)
    lat = Table(title="latency (ping, average of 10)")
    lat.add_column("path")
    lat.add_column("rtt")
    paths = [
        ("web → api (same bridge)", a.netns("web"), a.address("api")),
        ("host → web", "host1", a.address("web")),
        ("web → internet (via NAT)", a.netns("web"), INTERNET_ADDR),
    ]
    for label, src, dst in paths:
        rtt = ping_rtt_ms(src, dst, 10)
        lat.add_row(label, "-" if rtt is None else f"{rtt:.3f} ms")
    console.print(lat)
    return all(c.ok for c in results)


def teardown(world: World) -> bool:
    a = world.agents["host1"]
    for name in ("web", "api", "db", "secret"):
        a.cli("rm", "-f", name)
    for net in ("frontend", "backend", "vault"):
        a.cli("network", "rm", net)
    links = json.loads(nsexec("host1", "ip", "-j", "link").stdout)
    left = [link["ifname"] for link in links if link["ifname"].startswith(("px", "pxbr"))]
    table = nsexec("host1", "nft", "-j", "list", "table", "inet", "plexus").stdout
    elements = sum(
        len(s.get("set", s.get("map", {})).get("elem", []))
        for s in json.loads(table)["nftables"]
        if "set" in s or "map" in s
    )
    rows = a.cli("network", "ls", "--json").stdout.strip()
    console.print(
        f"teardown: links left {left or 'none'}, set elements left {elements}, "
        f"networks left {json.loads(rows) or 'none'}"
    )
    return not left and elements == 0 and json.loads(rows) == []


def verdicts(title: str, results: list[Check]) -> bool:
    """A table of checks that are not about reachability: what was observed, and ok or not."""
    t = Table(title=title)
    for col in ("check", "observed", ""):
        t.add_column(col)
    for c in results:
        t.add_row(c.what, c.detail, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]")
    console.print(t)
    return all(c.ok for c in results)

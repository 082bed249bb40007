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

from tests.harness.probes import (
    ANSWERED,
    DROPPED,
    REFUSED,
    UNREACHABLE,
    Outcome,
    Probe,
    tcp_probe,
    udp_probe,
    wait_for_answer,
)
from tests.harness.world import (
    ECHO,
    INTERNET_ADDR,
    OUTSIDE_ADDR,
    Agent,
    World,
    nsexec,
    ping_rtt_ms,
    sh,
)

console = Console()


@dataclass
class Check:
    what: str
    expect: str  # what a working plexus shows: "answer", "dropped", "refused", an address...
    detail: str  # what was observed
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
        ["ip", "netns", "exec", "outside", sys.executable, ECHO, "internet", "80"],
        start_new_session=True,
    )
    wait_for_answer(lambda: tcp_probe("outside", INTERNET_ADDR, 80, 0.3))


class Checks:
    """The checks of one run. A check that expects no answer names a control (the same server
    answering another client, or the same client reaching the same server another way) that
    must be answered in the same breath, so a server that is down cannot pass for isolation."""

    def __init__(self) -> None:
        self.done: list[Check] = []

    def answered(self, what: str, probe: Callable[[], Probe], want: str = "") -> None:
        p = probe()
        ok = p.outcome is ANSWERED and want in p.answer
        self.done.append(Check(what, f"answer {want}".strip(), str(p), ok))

    def blocked(self, what: str, probe: Callable[[], Probe],
                control: tuple[str, Callable[[], Probe]], outcome: Outcome = DROPPED) -> None:
        label, control_probe = control
        p, c = probe(), control_probe()
        ok = p.outcome is outcome and c.outcome is ANSWERED
        self.done.append(Check(what, str(outcome), f"{p}; control {label}: {c}", ok))

    def observed(self, what: str, expect: str, detail: str, ok: bool) -> None:
        self.done.append(Check(what, expect, detail or "nothing", ok))


def checks(world: World) -> list[Check]:
    a = world.agents["host1"]
    host = world.host_addr("host1")
    ns = {n: a.netns(n) for n in ("web", "api", "db", "secret")}
    ip = {n: a.address(n) for n in ns}
    api_backend = a.address("api", "backend")
    api6 = a.address("api", "frontend", 6)
    c = Checks()

    c.answered("web → api (frontend, TCP)", lambda: tcp_probe(ns["web"], ip["api"], 80), "api")
    c.answered("web → api (frontend, IPv6)", lambda: tcp_probe(ns["web"], api6, 80), "api")
    c.answered("api → db (backend, UDP)", lambda: udp_probe(ns["api"], ip["db"], 80), "db")
    api_to_db = ("api → db", lambda: tcp_probe(ns["api"], ip["db"], 80))
    api_to_web = ("api → web", lambda: tcp_probe(ns["api"], ip["web"], 80))
    c.blocked("web → db (other network)", lambda: tcp_probe(ns["web"], ip["db"], 80, 1),
              api_to_db)
    c.blocked("db → web (other network)", lambda: tcp_probe(ns["db"], ip["web"], 80, 1),
              api_to_web)
    c.blocked("db → api's frontend address", lambda: tcp_probe(ns["db"], ip["api"], 80, 1),
              ("db → api's backend address", lambda: tcp_probe(ns["db"], api_backend, 80)))
    c.answered("api → db via backend", lambda: tcp_probe(ns["api"], ip["db"], 80), "db")
    c.answered("web → internet (masqueraded)", lambda: tcp_probe(ns["web"], INTERNET_ADDR, 80),
               f"internet {host}")
    web_to_internet = ("web → internet", lambda: tcp_probe(ns["web"], INTERNET_ADDR, 80))
    # An internal network gives its containers no default route; the firewall stops them
    # all the same when they add one of their own.
    c.blocked("secret (internal) → internet", lambda: tcp_probe(ns["secret"], INTERNET_ADDR, 80),
              web_to_internet, UNREACHABLE)
    vault_gw = _gateway(a, "vault")
    c.blocked("secret (internal) → internet, via a route of its own",
              lambda: _with_route(ns["secret"], vault_gw, INTERNET_ADDR), web_to_internet)
    c.blocked("secret (internal) → web, via a route of its own",
              lambda: _with_route(ns["secret"], vault_gw, ip["web"]), api_to_web)
    outside_to_web = ("outside → host:8080", lambda: tcp_probe("outside", host, 8080))
    c.answered("outside → host:8080 (published, source kept)", outside_to_web[1],
               f"web {OUTSIDE_ADDR}")
    c.answered("outside → host:8053/udp (published)", lambda: udp_probe("outside", host, 8053),
               "web")
    c.blocked("outside → web's address directly", lambda: _routed_probe(world, ip["web"]),
              outside_to_web)
    c.answered("host localhost:8080 → web", lambda: tcp_probe("host1", "127.0.0.1", 8080), "web")
    c.answered("web → host:8080 (hairpin to itself)", lambda: tcp_probe(ns["web"], host, 8080),
               "web")
    c.answered("api → host:8080 (hairpin to neighbour)",
               lambda: tcp_probe(ns["api"], host, 8080), "web")
    local_api = ("localhost:9090", lambda: tcp_probe("host1", "127.0.0.1", 9090))
    c.answered("host localhost:9090 → api (127.0.0.1 publish)", local_api[1], "api")
    # Not published there, so the host's own stack answers with a RST: refused, not dropped.
    c.blocked("outside → host:9090 (127.0.0.1 publish)",
              lambda: tcp_probe("outside", host, 9090, 1), local_api, REFUSED)
    c.answered("host → web (host reaches containers)", lambda: tcp_probe("host1", ip["web"], 80),
               "web")
    pinged = _ping6(ns["web"], api6)
    c.observed("web → api over IPv6 ping", "reply", "reply" if pinged else "", pinged)
    _dns_checks(c, a, ip, api_backend)
    return c.done


def _dns_checks(c: Checks, a: Agent, ip: dict[str, str], api_backend: str) -> None:
    got = _resolve(a, "web", "api")
    c.observed("web resolves api by name (plexus DNS)", ip["api"], got, got == ip["api"])
    # db's resolver answers for its own networks (the control) but not for web's.
    got, control = _resolve(a, "db", "web"), _resolve(a, "db", "api")
    c.observed("db resolves web (not on its networks)", "no address",
               f"{got or 'no address'}; control db resolves api: {control or 'nothing'}",
               got == "" and control == api_backend)
    got = _resolve(a, "api", "db.backend")
    c.observed("api resolves db.backend", ip["db"], got, got == ip["db"])


def _resolve(agent: Agent, container: str, name: str) -> str:
    """glibc's resolver in the container, with the resolv.conf plexus wrote for it."""
    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False).stdout
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def _ping6(ns: str, ip: str) -> bool:
    return nsexec(ns, "ping", "-6", "-c1", "-W1", ip, check=False).returncode == 0


def _gateway(agent: Agent, network: str) -> str:
    net = next(n for n in agent.json("network", "ls") if n["name"] == network)
    return str(net["subnets"][0]["gateway"])


def _with_route(ns: str, gateway: str, ip: str) -> Probe:
    """A container adds a default route through its gateway and tries anyway."""
    nsexec(ns, "ip", "route", "replace", "default", "via", gateway)
    try:
        return tcp_probe(ns, ip, 80, 1)
    finally:
        nsexec(ns, "ip", "route", "del", "default", check=False)


def _routed_probe(world: World, ip: str) -> Probe:
    """The outside host adds a route to the container through the host and tries anyway."""
    host = world.host_addr("host1")
    nsexec("outside", "ip", "route", "replace", f"{ip}/32", "via", host)
    try:
        return tcp_probe("outside", ip, 80, 1)
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
        r.add_row(c.what, c.expect, c.detail, mark)
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
    # The built-in "host" and "none" networks are always there and own nothing.
    nets = [n["name"] for n in a.json("network", "ls")
            if n.get("labels", {}).get("plexus.builtin") != "true"]
    console.print(
        f"teardown: links left {left or 'none'}, set elements left {elements}, "
        f"networks left {nets or 'none'}"
    )
    return not left and elements == 0 and nets == []


def verdicts(title: str, results: list[Check]) -> bool:
    """A table of checks that are not about reachability: what was observed, and ok or not."""
    t = Table(title=title)
    for col in ("check", "observed", ""):
        t.add_column(col)
    for c in results:
        t.add_row(c.what, c.detail, "[green]ok[/green]" if c.ok else "[red]FAIL[/red]")
    console.print(t)
    return all(c.ok for c in results)

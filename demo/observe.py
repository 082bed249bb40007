"""The demo's services and observability acts, on the single-host world (after the policy act):
a service in front of three shop containers on the backend network, called from db (on the
backend network only), spread and following a label change; then the flow log, which names
the connections and the drop the policy act made; then the Prometheus metrics the agent
serves on 127.0.0.1:9100 in host1 (--metrics-address), and the web view on the same listener,
fetched and, where Debian's chromium is installed, rendered by a headless browser."""

from __future__ import annotations

import collections
import re
import tempfile
import time
from pathlib import Path

from rich.console import Console

from demo.acts import Check
from tests.harness import chromium
from tests.harness.probes import ANSWERED, tcp_probe
from tests.harness.prometheus import http_get
from tests.harness.world import World

SHOPS = ("shop1", "shop2", "shop3")


def _spread(world: World, vip: str, count: int) -> collections.Counter[str]:
    a = world.agents["host1"]
    ns = a.netns("db")
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        probe = tcp_probe(ns, vip, 80, 1.0)
        seen[probe.answer.split()[0] if probe.outcome is ANSWERED else "no answer"] += 1
    return seen


def services_act(world: World, console: Console) -> list[Check]:
    a = world.agents["host1"]
    for name in SHOPS:
        a.run_echo(name, "backend", "--label", "app=shop")
    for name in SHOPS:
        a.wait_listening(name)
    started = time.perf_counter()
    out = a.cli("service", "create", "shop", "--network", "backend", "--selector", "app=shop",
                "--port", "80").stdout.split()
    console.print(f"  plexus service create shop (in force when it returns) "
                  f"{1000 * (time.perf_counter() - started):.1f} ms, VIP {out[1]}")
    vip = out[1].split(",")[0]
    seen = _spread(world, vip, 60)
    checks = [Check("db → shop VIP:80, 60 connections", "spread over shop1-3",
                    dict(sorted(seen.items())).__repr__(), set(seen) == set(SHOPS))]
    named = a.json("dns", "lookup", "shop", "--network", "backend")["addresses"]
    checks.append(Check("dns lookup shop --network backend", vip, " ".join(named),
                        vip in named))
    a.cli("label", "shop3", "app=retired")
    seen = _spread(world, vip, 30)
    checks.append(Check("plexus label shop3 app=retired, 30 more", "shop1 and shop2 only",
                        dict(sorted(seen.items())).__repr__(), set(seen) == {"shop1", "shop2"}))
    return checks


def services_cleanup(world: World) -> None:
    a = world.agents["host1"]
    a.cli("service", "rm", "shop")
    a.cli("rm", "-f", *SHOPS)


def flows_act(world: World) -> list[Check]:
    a = world.agents["host1"]
    to_shop = a.json("flows", "--from", "db", "--port", "80")
    shops = {f["dst"]["name"] for f in to_shop if f["dst"]["name"].startswith("shop")}
    checks = [Check("plexus flows --from db --port 80", "connections to shop1-3 (after DNAT)",
                    f"{len(to_shop)} records, to {sorted(shops)}", shops == set(SHOPS))]
    drops = a.json("flows", "--verdict", "dropped", "--to", "db")
    why = sorted({f["reason"] for f in drops})
    checks.append(Check("plexus flows --verdict dropped --to db", "the policy act's drop, named",
                        f"{len(drops)} records: {why}",
                        "policy NetworkPolicy default/db-from-api" in why))
    return checks


def metrics_act(world: World) -> list[Check]:
    a = world.agents["host1"]
    tcp_probe(a.netns("web"), a.address("db", "backend"), 80, 0.5)  # isolated: counted
    status, text = http_get("host1", "127.0.0.1", 9100, "/metrics", 30.0)
    endpoints = sum(float(v) for v in re.findall(r"^plexus_endpoints\{[^}]*\} (\S+)$", text,
                                                  re.M))
    want = a.json("status")["endpoints"]
    checks = [Check("GET 127.0.0.1:9100/metrics: plexus_endpoints", f"{want} (plexus status)",
                    f"{endpoints:.0f} (HTTP {status})", endpoints == want)]
    isolated = re.findall(r'^plexus_dropped_packets_total\{[^}]*reason="isolation"[^}]*\} '
                          r'(\S+)$', text, re.M)
    checks.append(Check("plexus_dropped_packets_total{reason=isolation}", ">= 1 (web → db)",
                        " ".join(isolated) or "absent", sum(map(float, isolated)) >= 1))
    received = re.findall(r'^plexus_container_network_receive_bytes_total\{container="shop1"'
                          r'[^}]*\} (\S+)$', text, re.M)
    checks.append(Check("shop1's received bytes", "> 0", " ".join(received) or "absent",
                        sum(map(float, received)) > 0))
    return checks


def web_act(world: World, console: Console) -> list[Check]:
    """The page lists host1's containers; a headless chromium (if installed) shows them too, and
    the screenshot is kept (the demo's own files go with its temporary directory)."""
    a = world.agents["host1"]
    want = sorted(c["name"] for c in a.json("ps") if c["node"] == "host1")
    status, page = http_get("host1", "127.0.0.1", 9100, "/", 30.0)
    listed = sorted(set(re.findall(r'class="container[^"]*" data-name="([^"]+)"', page)))
    checks = [Check("GET 127.0.0.1:9100/ (the web view)", f"{len(want)} containers (plexus ps)",
                    f"{len(listed)} listed (HTTP {status})", listed == want)]
    if not chromium.available():
        console.print("  chromium is not installed: the page is not rendered (make deps)")
        return checks
    shot = Path(tempfile.gettempdir()) / "plexus-demo-web-view.png"
    with tempfile.TemporaryDirectory(prefix="plexus-demo-chromium-") as tmp, \
            chromium.Browser(Path(tmp), "host1") as browser:
        browser.open("http://127.0.0.1:9100/")
        shown = sorted(browser.wait_for(
            "[...new Set([...document.querySelectorAll('.container')]"
            ".map(c => c.dataset.name))]", 10))
        browser.screenshot(shot)
    console.print(f"  screenshot of the web view: {shot}")
    checks.append(Check("headless chromium renders the page", f"{len(want)} containers",
                        f"{len(shown)} in the DOM", shown == want))
    return checks

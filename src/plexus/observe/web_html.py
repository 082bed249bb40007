"""The web view's HTML, rendered here from ``web_state.snapshot`` and flow records: the page, the
live part the page's script swaps in every few seconds, and one table row per flow (which the
flow stream sends as it is). One renderer, on the server: the script (``static/web.js``) only
fetches and inserts, so nothing is drawn twice in two languages. Every value is escaped.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from html import escape
from typing import Any

from plexus.observe.flows import Flow, Side

FLOW_COLUMNS = ("time (UTC)", "event", "verdict", "proto", "source", "destination", "reason",
                "bytes")


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def page(state: dict[str, Any], flows: list[Flow], query: str = "") -> str:
    """The whole page; ``query``: the page's own query string, a filter the flows keep."""
    node = _e(state["node"])
    last = max((f.time for f in flows), default=0.0)
    rows = "".join(flow_row(f) for f in reversed(flows))
    head = "".join(f"<th>{c}</th>" for c in FLOW_COLUMNS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>plexus · {node}</title>
<link rel="stylesheet" href="/static/web.css">
<script src="/static/web.js" defer></script>
</head><body>
<header><h1>plexus</h1><span>agent on <b>{node}</b></span>
<span id="status">as of {_clock(state["time"])} UTC</span>
<a href="/api/state">state JSON</a><a href="/metrics">metrics</a></header>
<main>
<section id="state">{live(state)}</section>
<section id="flows-panel"><h2>Flows <small id="flow-status">{_e(_filter_text(query))}</small></h2>
<noscript><p>New flows appear here with JavaScript on; reload for the latest.</p></noscript>
<div class="scroll"><table id="flows" data-last="{last!r}" data-query="{_e(query)}">
<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div></section>
</main></body></html>
"""


def live(state: dict[str, Any]) -> str:
    """The part of the page that changes: the map, IPAM, services, policies."""
    return (f'<div id="map" class="map">{_map(state)}</div><div class="panels">'
            f"{_ipam(state)}{_services(state)}{_policies(state)}</div>")


def _map(state: dict[str, Any]) -> str:
    where: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = \
        defaultdict(list)
    for c in state["containers"]:
        for ep in c["endpoints"]:
            where[(c["node"], ep["network"])].append((c, ep))
    networks = {n["name"]: n for n in state["networks"]}
    out = []
    for h in state["hosts"]:
        used = {net for node, net in where if node == h["name"]}
        # The local host lists every network; those without containers take one line.
        idle = sorted(set(networks) - used) if h["local"] else []
        body = "".join(_network_box(networks.get(n), n, where[(h["name"], n)])
                       for n in sorted(used))
        if idle:
            body += f'<p class="idle">no containers on: {_e(", ".join(idle))}</p>'
        status = "" if h["alive"] else ' <span class="down">down</span>'
        cls = "host local" if h["local"] else "host"
        out.append(f'<div class="{cls}" data-host="{_e(h["name"])}"><h2>host {_e(h["name"])} '
                   f'<small>{_e(h["address"])}</small>{status}</h2>'
                   f'{body or "<p class=empty>no networks</p>"}</div>')
    return "".join(out)


def _network_box(net: dict[str, Any] | None, name: str,
                 members: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    about = ""
    if net is not None:
        subnets = " ".join(p["subnet"] for p in net["pools"])
        flags = " internal" if net["internal"] else ""
        flags += " · spans hosts" if net["spans_hosts"] else ""
        about = f'{_e(net["driver"])} · {_e(subnets)}{flags}'
    items = "".join(_container_item(c, ep) for c, ep in sorted(members, key=lambda m:
                                                                  m[0]["name"]))
    return (f'<div class="network" data-network="{_e(name)}"><h3>{_e(name)} '
            f'<small>{about}</small></h3>'
            f"<ul>{items}</ul></div>")


def _container_item(c: dict[str, Any], ep: dict[str, Any]) -> str:
    door = _e(c["front_door"])
    ports = " ".join(ep["ports"])
    rate = ""
    if ep["rx_rate"] is not None:
        rate = (f'<span class="rate" title="received / sent">↓ {_bytes(ep["rx_rate"])}/s '
                f'↑ {_bytes(ep["tx_rate"])}/s</span>')
    elif ep["rx_bytes"] is not None:  # one reading of the counters so far: the totals
        rate = (f'<span class="rate" title="received / sent, in all">↓ {_bytes(ep["rx_bytes"])} '
                f'↑ {_bytes(ep["tx_bytes"])}</span>')
    return (f'<li class="container state-{_e(c["state"])}" data-name="{_e(c["name"])}" '
            f'data-door="{door}"><span class="name">{_e(c["name"])}</span>'
            f'<span class="door door-{door}">{door}</span>'
            f'<span class="addr">{_e(" ".join(ep["addresses"]))}</span>'
            + (f'<span class="ports" title="published ports">{_e(ports)}</span>' if ports else "")
            + rate + "</li>")


def _ipam(state: dict[str, Any]) -> str:
    rows = []
    for n in state["networks"]:
        for p in n["pools"]:
            used, size = p["used"], max(p["size"], 1)
            rows.append(f'<tr data-network="{_e(n["name"])}"><td>{_e(n["name"])}</td>'
                        f'<td>{_e(p["pool"])}</td><td><meter min="0" max="{size}" '
                        f'value="{used}" high="{size * 0.8:.0f}"></meter></td>'
                        f'<td>{used} / {_size(p["size"])}</td></tr>')
    return _panel("IPAM", "ipam", ("network", "pool", "use", "addresses"), rows)


def _services(state: dict[str, Any]) -> str:
    rows = [f'<tr><td>{_e(s["ref"])}</td><td>{_e(s["network"])}</td>'
            f'<td>{_e(" ".join(s["vips"]) or "headless")}</td><td>{_e(" ".join(s["ports"]))}</td>'
            f'<td>{_e(" ".join(s["publish"]))}</td><td>{_e(s["selector"])}</td></tr>'
            for s in state["services"]]
    return _panel("Services", "services",
                  ("service", "network", "address", "ports", "published", "selects"), rows)


def _policies(state: dict[str, Any]) -> str:
    rows = [f'<tr><td>{_e(p["ref"])}{" <em>audit</em>" if p["audit"] else ""}</td>'
            f'<td>{_e(p["kind"])}</td><td>{_e(p["tier"])}</td><td>{_e(p["subject"])}</td>'
            f'<td>{p["ingress_rules"]} in · {p["egress_rules"]} out</td></tr>'
            for p in state["policies"]]
    return _panel("Policies", "policies", ("policy", "kind", "tier", "applies to", "rules"),
                  rows)


def _panel(title: str, ident: str, columns: tuple[str, ...], rows: list[str]) -> str:
    head = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join(rows) or f'<tr><td colspan="{len(columns)}" class="empty">none</td></tr>'
    return (f'<section><h2>{title}</h2><table id="{ident}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></section>")


def flow_row(f: Flow) -> str:
    """One flow as a table row; its ends and verdict also as attributes, for filters and
    tests."""
    verdict = _e(f.verdict)
    size = f"{_bytes(f.bytes)}" if f.event == "end" else ""
    return (f'<tr class="flow verdict-{verdict}" data-src="{_e(f.src.name)}" '
            f'data-dst="{_e(f.dst.name)}" data-event="{_e(f.event)}" data-verdict="{verdict}" '
            f'data-dport="{f.dst.port}"><td>{_clock(f.time)}</td><td>{_e(f.event)}</td>'
            f'<td class="verdict">{verdict}</td><td>{_e(f.proto)}</td><td>{_side(f.src)}</td>'
            f"<td>{_side(f.dst)}</td><td>{_e(f.reason)}</td><td>{size}</td></tr>")


def _side(s: Side) -> str:
    where = f"{s.address}:{s.port}" if s.port else s.address
    if not s.name:
        return _e(where)
    return f'<b>{_e(s.name)}</b> <small>{_e(where)}</small>'


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # unreachable: the loop returns at GB


def _size(n: int) -> str:
    """A pool's size; an IPv6 /64 as a power of two rather than 20 digits."""
    return str(n) if n < 2**24 else f"~2^{round(math.log2(n))}"


def _filter_text(query: str) -> str:
    return f"filtered: {query}" if query else "live"

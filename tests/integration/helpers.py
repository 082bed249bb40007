"""Independent oracles: read the kernel with `ip -j` and `nft -j`, and the datastore with sqlite3,
never through plexus's own code."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.world import nsexec


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``check`` (bounded) for state the agent finishes after answering, such as the
    kernel's deletion of a veth after a CNI DEL."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def links(ns: str) -> list[dict[str, Any]]:
    return list(json.loads(nsexec(ns, "ip", "-j", "-d", "link").stdout))


def plexus_links(ns: str) -> set[str]:
    return {link["ifname"] for link in links(ns) if link["ifname"].startswith("px")}


def addresses(ns: str, ifname: str) -> list[str]:
    data = json.loads(nsexec(ns, "ip", "-j", "addr", "show", "dev", ifname).stdout)
    return [
        f"{a['local']}/{a['prefixlen']}" for a in data[0]["addr_info"] if a.get("scope") == "global"
    ]


def global_addresses(ns: str) -> list[str]:
    """Every global-scope address in namespace ``ns`` (``ip -j addr``), as ADDRESS/PREFIX."""
    data = json.loads(nsexec(ns, "ip", "-j", "addr").stdout)
    return [
        f"{a['local']}/{a['prefixlen']}"
        for link in data
        for a in link["addr_info"]
        if a.get("scope") == "global"
    ]


def nft_table(ns: str) -> list[dict[str, Any]]:
    out = nsexec(ns, "nft", "-j", "list", "table", "inet", "plexus", check=False)
    return list(json.loads(out.stdout)["nftables"]) if out.returncode == 0 else []


def nft_elements(ns: str) -> dict[str, list[Any]]:
    """Set/map name → its elements."""
    found: dict[str, list[Any]] = {}
    for item in nft_table(ns):
        for kind in ("set", "map"):
            if kind in item:
                found[item[kind]["name"]] = item[kind].get("elem", [])
    return found


def store_rows(state_dir: Path, prefix: str) -> dict[str, str]:
    """Read the agent's SQLite file directly (read-only)."""
    db = sqlite3.connect(f"file:{state_dir / 'plexus.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "select key, value from kv where key >= ? and key < ?", (prefix, prefix + "\xff")
        ).fetchall()
    finally:
        db.close()
    return {str(k): str(v) for k, v in rows}


def link_owner(agent: Any) -> str:
    """The tag on an agent's links (``plexus:TAG:net:NAME``): its node's name and the first 8
    hex digits of its datastore's id, read from the SQLite file."""
    [store_id] = store_rows(agent.state_dir, "/plexus/meta/store-id").values()
    return f"{agent.host}@{store_id[:8]}"


def by_alias(ns: str) -> dict[str, str]:
    """ifalias → ifname of every link in ``ns`` that has an alias."""
    return {link["ifalias"]: link["ifname"] for link in links(ns) if "ifalias" in link}


BUILTIN_NETWORKS = ["host", "none"]  # every agent has them (as Docker has)


def user_networks(agent: Any) -> list[dict[str, Any]]:
    """`plexus network ls --json` without the built-in networks."""
    return [n for n in agent.json("network", "ls") if n["name"] not in BUILTIN_NETWORKS]


def bridge_of(agent: Any, network: str | None = None) -> str:
    """The bridge of ``network`` (default: the only user network)."""
    nets = user_networks(agent)
    if network is None:
        assert len(nets) == 1, nets
        return str(nets[0]["bridge"])
    return str(next(n["bridge"] for n in nets if n["name"] == network))


def elements_of(ns: str, kind: str, table: str, name: str) -> list[Any]:
    """The elements of ``kind`` ("map" or "set") ``name`` of ``table`` (inet), as `nft -j`
    lists them: any plexus table (``nft_elements`` reads ``inet plexus`` whole)."""
    out = nsexec(ns, "nft", "-j", "list", kind, "inet", table, name).stdout
    [found] = [x[kind] for x in json.loads(out)["nftables"] if kind in x]
    return list(found.get("elem", []))


# -- plexus verify ------------------------------------------------------------------------------


def verify(agent: Any, *args: str) -> tuple[int, dict[str, Any]]:
    """`plexus verify --json`: its exit code (0 or 1, anything else fails) and its report."""
    r = agent.cli("verify", "--json", *args, check=False)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def probe_of(report: dict[str, Any], src: str, dst: str, port: int,
             proto: str = "tcp") -> dict[str, Any]:
    """The one probe of ``report`` from ``src`` to ``dst``'s ``port``."""
    [found] = [p for p in report["probes"] if (p["from"], p["to"], p["port"], p["protocol"])
               == (src, dst, port, proto)]
    return dict(found)


def disagreements(report: dict[str, Any]) -> set[tuple[str, str, int]]:
    """(from, to, port) of every probe where the kernel disagrees with the model."""
    return {(p["from"], p["to"], p["port"]) for p in report["mismatches"]}

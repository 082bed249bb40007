"""The services table's renderers: the JSON they produce, and that a change touches only the
frontends it names (the kernel's view: tests/integration/test_lb_dataplane.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from dataclasses import replace
from typing import Any

from plexus.dataplane.nft import lb
from plexus.dataplane.nft._json import Json
from plexus.dataplane.nft.lb_table import ServiceTable
from plexus.lb.model import Backend, Frontend, Published, diff, index

ip = ipaddress.ip_address


def backends(*addrs: str, port: int = 80) -> tuple[Backend, ...]:
    return tuple(Backend(ip(a), port) for a in addrs)


WEB = Frontend("ns/web", "http", "tcp", ip("10.96.0.1"), 80,
               backends("10.1.0.2", "10.1.0.3", "10.1.0.4"),
               published=(Published(None, 8080),))
STICKY = Frontend("ns/sticky", "", "tcp", ip("10.96.0.2"), 80, backends("10.1.0.2", "10.1.0.3"),
                  affinity=600)
EMPTY = Frontend("ns/empty", "", "udp", ip("10.96.0.3"), 53,
                 published=(Published(ip("203.0.113.1"), 5353),))
V6 = Frontend("ns/six", "", "tcp", ip("fd96::1"), 443, backends("fd01::2", port=8443))
ALL = (WEB, STICKY, EMPTY, V6)


def adds(cmds: list[Json], kind: str) -> list[dict[str, Any]]:
    return [c["add"][kind] for c in cmds if kind in c.get("add", {})]


def rules(cmds: list[Json], chain: str) -> list[list[Json]]:
    return [r["expr"] for r in adds(cmds, "rule") if r["chain"] == chain]


def element_keys(cmds: list[Json], verb: str, name: str) -> list[Any]:
    out: list[Any] = []
    for c in cmds:
        body = c.get(verb, {}).get("element")
        if body and body["name"] == name:
            out += [e[0] if isinstance(e, list) else e for e in body["elem"]]
    return out


def names_in(cmds: list[Json]) -> set[str]:
    """Every chain and set a batch names (as an object, a goto target or an @reference)."""
    text = json.dumps(cmds)
    found = {o[k]["name"] for c in cmds for o in c.values() for k in ("chain", "set") if k in o}
    found |= {r["chain"] for r in adds(cmds, "rule")}
    return found | {n for n in lb.SETS if f'"{n}"' in text or f"@{n}" in text}


# -- the whole table -------------------------------------------------------------------------


def test_the_table_replaces_itself_and_declares_its_maps() -> None:
    cmds = lb.render_table(ALL)
    assert [next(iter(c)) for c in cmds[:3]] == ["add", "delete", "add"]
    maps = {m["name"]: m for m in adds(cmds, "map")}
    assert maps["vips4"]["type"] == ["ipv4_addr", "inet_proto", "inet_service"]
    assert maps["vips4"]["map"] == "verdict"
    assert maps["ports6"]["type"] == ["inet_proto", "inet_service"]
    hooks = {c["name"]: (c["hook"], c["prio"]) for c in adds(cmds, "chain") if "hook" in c}
    assert hooks["nat_prerouting"] == ("prerouting", -110)
    assert hooks["nat_output"] == ("output", -110)
    assert hooks["filter_prerouting"] == ("prerouting", -110)


def test_every_vip_is_one_element_leading_to_its_own_chain() -> None:
    cmds = lb.render_table(ALL)
    vips = [e for c in cmds if (b := c.get("add", {}).get("element")) and b["name"] == "vips4"
            for e in b["elem"]]
    assert [{"concat": ["10.96.0.1", "tcp", 80]}, {"goto": {"target": "svc tcp 80 10.96.0.1"}}] \
        in vips
    assert element_keys(cmds, "add", "ports4") == [{"concat": ["tcp", 8080]}]
    assert element_keys(cmds, "add", "vips6") == [{"concat": ["fd96::1", "tcp", 443]}]


def test_backends_are_drawn_with_falling_odds_and_no_set() -> None:
    first, second, last = rules(lb.render_table([WEB]), lb.chain_name(WEB))
    assert first[0] == {"match": {"op": "==", "right": 0, "left": {
        "numgen": {"mode": "random", "mod": 3, "offset": 0}}}}
    assert first[-1] == {"dnat": {"family": "ip", "addr": "10.1.0.2", "port": 80}}
    assert second[0]["match"]["left"]["numgen"]["mod"] == 2
    assert last == [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                               "right": "tcp"}},
                    {"dnat": {"family": "ip", "addr": "10.1.0.4", "port": 80}}]
    assert '"set"' not in json.dumps([first, second, last])  # no anonymous set per service


def test_a_backend_calling_its_frontend_is_marked_by_one_lookup() -> None:
    cmds = lb.render_table(ALL)
    assert {"concat": ["10.96.0.1", "tcp", 80, "10.1.0.3"]} in element_keys(cmds, "add",
                                                                             "hairpin4")
    assert {"concat": ["tcp", 8080, "10.1.0.4"]} in element_keys(cmds, "add", "hairpin_any4")
    marks = [r for r in rules(cmds, "services") if lb.MARK_HAIRPIN in r]
    assert [r[-2]["match"]["right"] for r in marks] == [
        "@hairpin4", "@hairpin_any4", "@hairpin6", "@hairpin_any6"]


def test_affinity_keeps_a_timed_set_and_a_chain_per_backend() -> None:
    cmds = lb.render_table([STICKY])
    sets = {s["name"]: s for s in adds(cmds, "set")}
    first = lb.affinity_set(STICKY, STICKY.backends[0])
    assert sets[first]["timeout"] == 600 and sets[first]["flags"] == ["timeout"]
    update, dnat = rules(cmds, lb.endpoint_chain(STICKY, STICKY.backends[0]))
    assert update[0]["set"] == {"op": "update", "set": f"@{first}",
                                "elem": {"payload": {"protocol": "ip", "field": "saddr"}}}
    assert dnat[1] == {"dnat": {"family": "ip", "addr": "10.1.0.2", "port": 80}}
    chain = rules(cmds, lb.chain_name(STICKY))
    assert chain[0] == [{"match": {"op": "==", "left": {"payload": {"protocol": "ip",
                                                                    "field": "saddr"}},
                                   "right": f"@{first}"}},
                        {"goto": {"target": lb.endpoint_chain(STICKY, STICKY.backends[0])}}]
    assert chain[-1] == [{"goto": {"target": lb.endpoint_chain(STICKY, STICKY.backends[1])}}]


def test_no_backend_means_reject_elements_and_no_chain() -> None:
    cmds = lb.render_table([EMPTY])
    assert element_keys(cmds, "add", "noep4") == [{"concat": ["10.96.0.3", "udp", 53]},
                                                  {"concat": ["203.0.113.1", "udp", 5353]}]
    assert lb.chain_name(EMPTY) not in {c["name"] for c in adds(cmds, "chain")}
    assert rules(cmds, "reject")[0][1] == {"reject": {"type": "tcp reset"}}


# -- changes ---------------------------------------------------------------------------------


def test_a_change_touches_only_the_frontend_that_changed() -> None:
    before = index(ALL)
    moved = replace(WEB, backends=backends("10.1.0.2", "10.1.0.9"))
    cmds = lb.render_change(diff(before, index([moved, STICKY, EMPTY, V6])), before)
    assert names_in(cmds) == {lb.chain_name(WEB), "hairpin4", "hairpin_any4"}
    assert {"flush": lb.obj("chain", name=lb.chain_name(WEB))} in cmds
    assert not element_keys(cmds, "add", "vips4")  # the map element stays as it is
    touched = [k["concat"] for verb in ("add", "delete")
               for name in ("hairpin4", "hairpin_any4") for k in element_keys(cmds, verb, name)]
    assert sorted(k[-1] for k in touched) == ["10.1.0.3", "10.1.0.3", "10.1.0.4", "10.1.0.4",
                                              "10.1.0.9", "10.1.0.9"]
    assert all(k[:3] == ["10.96.0.1", "tcp", 80] or k[:2] == ["tcp", 8080] for k in touched)


def test_a_removed_affinity_backend_takes_only_its_own_chain_and_set() -> None:
    before = index(ALL)
    shrunk = replace(STICKY, backends=STICKY.backends[1:])
    cmds = lb.render_change(diff(before, index([WEB, shrunk, EMPTY, V6])), before)
    gone, kept = STICKY.backends
    assert {"delete": lb.obj("chain", name=lb.endpoint_chain(STICKY, gone))} in cmds
    assert {"delete": lb.obj("set", name=lb.affinity_set(STICKY, gone))} in cmds
    assert lb.endpoint_chain(STICKY, kept) not in names_in(cmds)  # its clients stay put
    assert names_in(cmds) == {lb.chain_name(STICKY), lb.endpoint_chain(STICKY, gone),
                              lb.affinity_set(STICKY, gone), "hairpin4"}
    assert element_keys(cmds, "delete", "hairpin4") == [
        {"concat": ["10.96.0.2", "tcp", 80, "10.1.0.2"]}]


def test_losing_the_last_backend_swaps_the_dnat_for_a_reject() -> None:
    before = index(ALL)
    drained = replace(WEB, backends=())
    cmds = lb.render_change(diff(before, index([drained, STICKY, EMPTY, V6])), before)
    assert element_keys(cmds, "delete", "vips4") == [{"concat": ["10.96.0.1", "tcp", 80]}]
    assert element_keys(cmds, "delete", "ports4") == [{"concat": ["tcp", 8080]}]
    assert element_keys(cmds, "add", "noep4") == [{"concat": ["10.96.0.1", "tcp", 80]}]
    assert element_keys(cmds, "add", "noports4") == [{"concat": ["tcp", 8080]}]
    deletes = [i for i, c in enumerate(cmds) if "delete" in c]
    chain_delete = cmds.index({"delete": lb.obj("chain", name=lb.chain_name(WEB))})
    assert deletes[0] < chain_delete  # the element leading there goes first


def test_a_new_frontend_is_its_chain_then_its_element() -> None:
    cmds = lb.render_change(diff(index(ALL[1:]), index(ALL)), index(ALL[1:]))
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in cmds]
    assert verbs[0] == ("add", "chain") and verbs[-1] == ("add", "element")
    assert not [c for c in cmds if "delete" in c or "flush" in c]
    assert names_in(cmds) == {lb.chain_name(WEB), "vips4", "ports4", "hairpin4",
                              "hairpin_any4"}


def test_removing_every_frontend_leaves_only_the_fixed_table() -> None:
    cmds = lb.render_change(diff(index(ALL), {}), index(ALL))
    assert not [c for c in cmds if "add" in c]
    assert {"delete": lb.obj("chain", name=lb.chain_name(V6))} in cmds
    assert element_keys(cmds, "delete", "noep4") == [{"concat": ["10.96.0.3", "udp", 53]},
                                                     {"concat": ["203.0.113.1", "udp", 5353]}]


# -- the applier -----------------------------------------------------------------------------


class RecordingNft:
    def __init__(self) -> None:
        self.batches: list[list[Json]] = []

    async def run(self, cmds: list[Json]) -> Json:
        self.batches.append(cmds)
        return {}


def test_the_applier_renders_each_change_against_what_it_applied() -> None:
    nft = RecordingNft()
    table = ServiceTable(nft)  # type: ignore[arg-type]
    grown = replace(STICKY, backends=backends("10.1.0.2", "10.1.0.3", "10.1.0.5"))

    async def steps() -> None:
        await table.replace(ALL)
        await table.change(diff(index(ALL), index([WEB, grown, EMPTY, V6])))
        await table.change(diff(index([WEB, grown, EMPTY, V6]), index([WEB, EMPTY, V6])))

    asyncio.run(steps())
    _, grow, drop = nft.batches
    assert lb.endpoint_chain(grown, grown.backends[2]) in names_in(grow)
    # The third backend, added by the previous change, goes with its frontend.
    assert {"delete": lb.obj("chain", name=lb.endpoint_chain(grown, grown.backends[2]))} in drop


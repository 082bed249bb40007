"""The firewall's pure parts: model → FirewallState → nft JSON → FirewallState."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.dataplane.nft import (
    FirewallState,
    NetRule,
    Publication,
    firewall_state,
    parse_table,
    render_net_delta,
    render_pub_delta,
    render_table,
    render_teardown,
    render_update,
)
from plexus.dataplane.nft.render import DROP_COUNTERS, PUB_MAPS, SPECS
from plexus.errors import InvalidArgument
from plexus.model.types import Endpoint, Network, PortMapping, Protocol, Subnet

ip, net = ipaddress.ip_address, ipaddress.ip_network
Json = dict[str, Any]


def network(name: str, *cidrs: str, **kw: Any) -> Network:
    return Network(name, f"{name}0123456789", subnets=tuple(Subnet(net(c)) for c in cidrs), **kw)


def endpoint(network: str, *addrs: str, ports: tuple[PortMapping, ...] = ()) -> Endpoint:
    return Endpoint(
        container_id=f"c-{addrs[0]}", ifname="eth0", network=network, node="n1", netns="/x",
        addresses=tuple(ipaddress.ip_interface(a) for a in addrs), ports=ports,
    )


def pub(port: int, container: str, host_ip: str | None = None, proto: str = "tcp") -> Publication:
    return Publication(
        proto, None if host_ip is None else ip(host_ip), port, ip(container), 80  # type: ignore[arg-type]
    )


STATE = FirewallState(
    (
        NetRule("pxbr-a", (net("10.1.0.0/24"), net("fd01::/64"))),
        NetRule("pxbr-i", (net("10.3.0.0/24"),), internal=True),
    ),
    frozenset({pub(8080, "10.1.0.2"), pub(8081, "10.1.0.3", "127.0.0.1"), pub(8080, "fd01::2")}),
)


def kernel_listing(cmds: list[Json]) -> Json:
    """What `nft -j list table` would show after ``cmds`` (one full-table batch) ran."""
    objs: list[Json] = []
    sets: dict[str, Json] = {}
    for c in cmds:
        ((verb, thing),) = c.items()
        ((kind, body),) = thing.items()
        if verb == "delete" and kind == "table":
            objs.clear()
            sets.clear()
        elif kind == "element":
            sets[body["name"]].setdefault("elem", []).extend(body["elem"])
        elif kind in ("set", "map"):
            sets[body["name"]] = dict(body)
            objs.append({kind: sets[body["name"]]})
        elif not (kind == "table" and objs):
            objs.append({kind: dict(body)})
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *objs]}


# -- firewall_state ------------------------------------------------------------------------------


def test_state_from_networks_and_endpoints() -> None:
    a = network("a", "10.1.0.0/24", "fd01::/64")
    host = network("h", driver="host")
    ep = endpoint("a", "10.1.0.2/24", "fd01::2/64", ports=(PortMapping(8080, 80),))
    state = firewall_state([a, host], [ep, endpoint("h", "10.9.0.2/24", ports=ep.ports)])
    assert state.nets == (NetRule(a.bridge, (net("10.1.0.0/24"), net("fd01::/64"))),)
    assert state.pubs == {pub(8080, "10.1.0.2"), pub(8080, "fd01::2")}


def test_a_host_address_pins_the_family_and_unspecified_means_every_address() -> None:
    a = network("a", "10.1.0.0/24", "fd01::/64")
    ports = (
        PortMapping(1, 80, host_ip=ip("127.0.0.1")),
        PortMapping(2, 80, host_ip=ip("::1")),
        PortMapping(3, 80, host_ip=ip("0.0.0.0")),
    )
    state = firewall_state([a], [endpoint("a", "10.1.0.2/24", "fd01::2/64", ports=ports)])
    assert state.pubs == {
        pub(1, "10.1.0.2", "127.0.0.1"), pub(2, "fd01::2", "::1"), pub(3, "10.1.0.2"),
    }


def test_port_ranges_become_one_publication_per_port() -> None:
    a = network("a", "10.1.0.0/24")
    ports = (PortMapping(8000, 80, "udp", host_port_end=8001, container_port_end=81),)
    state = firewall_state([a], [endpoint("a", "10.1.0.2/24", ports=ports)])
    assert {(p.host_port, p.container_port, p.protocol) for p in state.pubs} == {
        (8000, 80, "udp"), (8001, 81, "udp")
    }


def test_internal_networks_publish_nothing_and_never_masquerade() -> None:
    i = network("i", "10.3.0.0/24", internal=True)
    state = firewall_state([i], [endpoint("i", "10.3.0.2/24", ports=(PortMapping(1, 80),))])
    assert state.pubs == frozenset()
    assert state.nets == (NetRule(i.bridge, (net("10.3.0.0/24"),), True, False),)


def test_masquerade_can_be_switched_off_per_network() -> None:
    n = network("a", "10.1.0.0/24",
                options={"com.docker.network.bridge.enable_ip_masquerade": "false"})
    assert not firewall_state([n], []).nets[0].masquerade


def test_one_publication_per_kernel_key_wins_deterministically() -> None:
    a, b = pub(8080, "10.1.0.3"), pub(8080, "10.1.0.2")
    assert FirewallState((), frozenset({a, b})).canonical().pubs == {b}
    assert FirewallState((), frozenset({b, a})).canonical().pubs == {b}
    # A specific address and "every address" are different keys: both stay.
    c = pub(8080, "10.1.0.3", "127.0.0.1")
    assert FirewallState((), frozenset({b, c})).canonical().pubs == {b, c}


# -- render_table --------------------------------------------------------------------------------


def test_the_table_is_replaced_in_one_batch() -> None:
    cmds = render_table(STATE)
    table = {"table": {"family": "inet", "name": "plexus"}}
    assert cmds[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    assert all(next(iter(c)) == "add" for c in cmds[3:])
    for c in cmds:  # plexus touches no other table
        ((kind, body),) = next(iter(c.values())).items()
        assert (body["family"], body["name" if kind == "table" else "table"]) == ("inet", "plexus")


def test_every_set_a_rule_names_is_declared() -> None:
    cmds = render_table(STATE)
    declared = {b["name"] for c in cmds for k, b in c.get("add", {}).items() if k in ("set", "map")}
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    referenced = {s[1:] for r in rules for s in _strings(r["expr"]) if s.startswith("@")}
    assert referenced == declared == set(SPECS)  # and every declared one is used


def test_chains_hook_where_the_design_says() -> None:
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in render_table(STATE)
              if "chain" in c.get("add", {})}
    assert {n: (c["type"], c["hook"], c["prio"]) for n, c in chains.items()} == {
        "prerouting_filter": ("filter", "prerouting", -300),
        "prerouting_dnat": ("nat", "prerouting", -100),
        "output_dnat": ("nat", "output", -100),
        "forward": ("filter", "forward", 0),
        "input": ("filter", "input", 0),
        "postrouting_nat": ("nat", "postrouting", 100),
    }
    assert all(c["policy"] == "accept" for c in chains.values())


def test_every_drop_of_the_forward_chain_counts_into_its_named_counter() -> None:
    cmds = render_table(STATE)
    declared = [c["add"]["counter"]["name"] for c in cmds if "counter" in c.get("add", {})]
    forward = [c["add"]["rule"]["expr"] for c in cmds
               if c.get("add", {}).get("rule", {}).get("chain") == "forward"]
    drops = [e for e in forward if {"drop": None} in e]
    # The counter comes right before the verdict, so it counts exactly the dropped packets.
    named = [e[e.index({"drop": None}) - 1].get("counter") for e in drops]
    assert sorted(declared) == sorted(DROP_COUNTERS.values())
    assert named == ["drop_internal", "drop_internal", "drop_isolation", "drop_isolation",
                     "drop_unpublished"]  # the second isolation drop: a service VIP's
    assert parse_table({"nftables": [c["add"] for c in cmds if "add" in c]}) is not None


def test_rules_do_not_grow_with_publications() -> None:
    many = FirewallState(STATE.nets, frozenset(pub(1000 + i, "10.1.0.2") for i in range(500)))
    def rules(s: FirewallState) -> list[Json]:
        return [c for c in render_table(s) if "rule" in c.get("add", {})]
    assert rules(many) == rules(STATE) == rules(FirewallState())


def test_publications_are_map_elements() -> None:
    elems = _elements(render_table(STATE))
    assert elems["pub4_any_addr"] == [[{"concat": ["tcp", 8080]}, "10.1.0.2"]]
    assert elems["pub4_any_port"] == [[{"concat": ["tcp", 8080]}, 80]]
    assert elems["pub4_addr"] == [[{"concat": ["127.0.0.1", "tcp", 8081]}, "10.1.0.3"]]
    assert elems["pub6_any_addr"] == [[{"concat": ["tcp", 8080]}, "fd01::2"]]


def test_network_sets() -> None:
    elems = _elements(render_table(STATE))
    assert sorted(elems["bridges"]) == ["pxbr-a", "pxbr-i"]
    assert elems["internal"] == ["pxbr-i"]
    assert {"concat": ["pxbr-a", "pxbr-a"]} in elems["intra"]
    assert elems["masq4"] == [{"prefix": {"addr": "10.1.0.0", "len": 24}}]  # not the internal one
    assert {"concat": ["pxbr-i", {"prefix": {"addr": "10.3.0.0", "len": 24}}]} in elems[
        "bridge_nets4"
    ]


def test_an_overlays_vxlan_device_is_part_of_its_network() -> None:
    ov = network("ov", "10.8.0.0/24", driver="overlay")
    [rule] = firewall_state([ov], []).nets
    assert (rule.bridge, rule.tunnel) == (ov.bridge, "pxvx-ov01234567")
    internal = dataclasses.replace(rule, internal=True)
    elems = _elements(render_table(FirewallState((internal, NetRule("pxbr-b", ())))))
    vx, br = rule.tunnel, rule.bridge
    assert sorted(elems["bridges"]) == sorted([br, vx, "pxbr-b"])  # isolated, never masqueraded
    assert sorted(map(str, elems["intra"])) == sorted(map(str, [
        {"concat": [br, br]}, {"concat": [br, vx]}, {"concat": [vx, br]},
        {"concat": ["pxbr-b", "pxbr-b"]}]))
    assert sorted(elems["internal"]) == sorted([br, vx])
    assert [n for n, _ in (e["concat"] for e in elems["bridge_nets4"])] == [br]


def test_an_overlay_rule_reads_back_with_its_tunnel() -> None:
    state = FirewallState((NetRule("pxbr-o", (net("10.8.0.0/24"),), tunnel="pxvx-o"),
                           NetRule("pxbr-b", (net("10.9.0.0/24"),))))
    assert parse_table(kernel_listing(render_table(state))) == state.canonical()


def test_overlapping_masquerade_subnets_are_merged() -> None:
    # An interval set refuses overlapping elements; one bad pair must not fail the batch.
    state = FirewallState(
        (NetRule("a", (net("10.0.0.0/16"),)), NetRule("b", (net("10.0.1.0/24"),)))
    )
    assert _elements(render_table(state))["masq4"] == [{"prefix": {"addr": "10.0.0.0", "len": 16}}]


def test_empty_sets_get_no_element_command() -> None:
    cmds = render_table(FirewallState())
    assert not any("element" in c.get("add", {}) for c in cmds)


def test_the_batch_is_plain_json() -> None:
    # Tuples, sets, addresses or non-string keys would not come back equal (or not at all).
    cmds = render_table(STATE)
    assert json.loads(json.dumps(cmds)) == cmds


# -- deltas --------------------------------------------------------------------------------------


def test_a_publication_delta_touches_only_its_elements() -> None:
    p = pub(9000, "10.1.0.2", "203.0.113.1", "udp")
    cmds = render_pub_delta([p], [])
    assert cmds == [
        {"add": {"element": {"family": "inet", "table": "plexus", "name": f"pub4_{part}",
                             "elem": [[{"concat": ["203.0.113.1", "udp", 9000]}, data]]}}}
        for part, data in (("addr", "10.1.0.2"), ("port", 80))
    ]
    removal = render_pub_delta([], [p])
    assert [c["delete"]["element"]["elem"] for c in removal] == [
        [{"concat": ["203.0.113.1", "udp", 9000]}]
    ] * 2  # a map element is deleted by its key


def test_moving_a_key_deletes_before_it_adds() -> None:
    old, new = pub(8080, "10.1.0.2"), pub(8080, "10.1.0.3")
    verbs = [next(iter(c)) for c in render_pub_delta([new], [old])]
    assert verbs == ["delete", "add"]  # of pub4_any_addr; pub4_any_port did not change


def test_no_change_no_commands() -> None:
    assert render_update(STATE, STATE) == []
    assert render_update(STATE, FirewallState(tuple(reversed(STATE.nets)), STATE.pubs)) == []


def test_a_network_delta() -> None:
    b = NetRule("pxbr-b", (net("10.2.0.0/24"),))
    cmds = render_net_delta(STATE.nets, (*STATE.nets, b))
    names = sorted(c["add"]["element"]["name"] for c in cmds)
    assert names == ["bridge_nets4", "bridges", "intra", "masq4"]
    assert all(next(iter(c)) == "add" for c in cmds)


def test_teardown_never_fails_on_a_missing_table() -> None:
    assert [next(iter(c)) for c in render_teardown()] == ["add", "delete"]


# -- read back -----------------------------------------------------------------------------------


def test_an_absent_table_reads_as_none() -> None:
    assert parse_table({"nftables": []}) is None


def test_a_table_of_another_shape_reads_as_none() -> None:
    listing = kernel_listing(render_table(STATE))
    without_a_rule = {"nftables": [o for o in listing["nftables"] if "rule" not in o][:-1]}
    assert parse_table(without_a_rule) is None
    extra_rule = {"nftables": [*listing["nftables"], {"rule": {"chain": "forward", "expr": []}}]}
    assert parse_table(extra_rule) is None
    no_map = {"nftables": [o for o in listing["nftables"] if o.get("map", {}).get("name")
                           != PUB_MAPS[0].name]}
    assert parse_table(no_map) is None


def test_half_a_publication_is_not_read_back() -> None:
    listing = kernel_listing(render_table(STATE))
    for o in listing["nftables"]:
        if o.get("map", {}).get("name") == "pub4_any_port":
            o["map"].pop("elem")
    assert pub(8080, "10.1.0.2") not in parse_table(listing).pubs  # type: ignore[union-attr]


def test_read_back_round_trip() -> None:
    assert parse_table(kernel_listing(render_table(STATE))) == STATE.canonical()


# -- properties ----------------------------------------------------------------------------------

PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")
protocols = st.sampled_from(PROTOCOLS)
ports = st.integers(1, 65535)


@st.composite
def states(draw: st.DrawFn) -> FirewallState:
    n = draw(st.integers(0, 4))
    nets = []
    for i in range(n):  # disjoint subnets, as the IPAM hands out
        subnets = [net(f"10.{i}.0.0/24")] + ([net(f"fd0{i}::/64")] if draw(st.booleans()) else [])
        tunnel = f"pxvx-{i}" if draw(st.booleans()) else ""
        nets.append(NetRule(f"pxbr-{i}", tuple(subnets), draw(st.booleans()), draw(st.booleans()),
                            tunnel))
    containers = st.one_of(
        st.builds(lambda h: ip(f"10.0.0.{h}"), st.integers(2, 254)),
        st.builds(lambda h: ip(f"fd00::{h:x}"), st.integers(2, 0xFFFF)),
    )
    raw = draw(st.lists(st.tuples(protocols, st.booleans(), ports, containers, ports), max_size=30))
    pubs = {
        Publication(proto, (ip("127.0.0.1") if c.version == 4 else ip("::1")) if pinned else None,
                    hp, c, cp)
        for proto, pinned, hp, c, cp in raw
    }
    return FirewallState(tuple(nets), frozenset(pubs))


@given(states())
@settings(max_examples=200, deadline=None)
def test_any_state_reads_back_as_its_canonical_form(state: FirewallState) -> None:
    assert parse_table(kernel_listing(render_table(state))) == state.canonical()


@given(states(), states())
@settings(max_examples=200, deadline=None)
def test_a_delta_applied_to_old_gives_new(old: FirewallState, new: FirewallState) -> None:
    listing = kernel_listing(render_table(old))
    _apply_elements(listing, render_update(old, new))
    assert parse_table(listing) == new.canonical()


# -- helpers -------------------------------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _elements(cmds: list[Json]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for c in cmds:
        if "element" in c.get("add", {}):
            body = c["add"]["element"]
            out.setdefault(body["name"], []).extend(body["elem"])
    return out


def _apply_elements(listing: Json, cmds: list[Json]) -> None:
    """Element adds and deletes as the kernel does them; a missing element is an error."""
    bodies = {
        b["name"]: b for o in listing["nftables"] for k, b in o.items() if k in ("set", "map")
    }
    for c in cmds:
        verb, body = next(iter(c)), next(iter(c.values()))["element"]
        target = bodies[body["name"]].setdefault("elem", [])
        for e in body["elem"]:
            key = json.dumps(e[0] if isinstance(e, list) and verb == "add" else e, sort_keys=True)
            found = [x for x in target
                     if json.dumps(x[0] if isinstance(x, list) else x, sort_keys=True) == key]
            if verb == "delete":
                assert found, f"deleting a missing element {e}"
                target.remove(found[0])
            else:
                assert not found or found[0] == e, f"conflicting element {e}"
                if not found:
                    target.append(e)


def test_a_publication_cannot_mix_address_families() -> None:
    with pytest.raises(InvalidArgument, match="host_ip"):
        pub(80, "fd01::2", "127.0.0.1")


def test_a_state_changed_with_replace_is_canonicalised_again() -> None:
    canonical = STATE.canonical()
    assert canonical.canonical() is canonical
    clash = pub(8080, "10.1.0.1")  # same key as an existing publication, and smaller
    changed = dataclasses.replace(canonical, pubs=canonical.pubs | {clash})
    assert changed.canonical().pubs == (canonical.pubs - {pub(8080, "10.1.0.2")}) | {clash}

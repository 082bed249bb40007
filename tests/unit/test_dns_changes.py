"""Changing the record table in place: after any sequence of changes, the table answers exactly
like one built from scratch from the final networks and endpoints, and removing an endpoint
takes back exactly what it published."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plexus.dns import DnsChanges
from plexus.dns.config import DnsSettings, Upstream
from plexus.dns.records import RecordTable
from plexus.dns.wire import QType
from plexus.errors import InvalidArgument
from plexus.model.types import Endpoint, Network
from plexus.testing.dns import endpoint, network

UP = (Upstream(ipaddress.ip_address("203.0.113.53")),)
SETTINGS = DnsSettings(upstreams=UP)

# --- the world the random changes are drawn from ---------------------------------------------

VARIANTS: dict[str, list[Network]] = {  # each network's possible values
    "front": [network("front", "10.1.0.0/24", "fd00:1::/64"),
              network("front", "10.1.0.0/24", options={"dns_upstreams": "198.51.100.1"}),
              network("front", "10.1.0.0/24", "fd00:1::/64", internal=True)],
    "back": [network("back", "10.2.0.0/24"), network("back", "10.2.0.0/16", internal=True)],
    "secret": [network("secret", "10.3.0.0/24", internal=True),
               network("secret", "10.3.0.0/24", options={"dns": "false"})],
}
ADDRESSES = {"front": ["10.1.0.1", "10.1.0.2", "10.1.0.3", "fd00:1::1", "fd00:1::2"],
             "back": ["10.2.0.1", "10.2.0.2", "10.2.0.3"],
             "secret": ["10.3.0.1", "10.3.0.2"],
             "ghost": ["10.9.0.1"]}  # a network that never exists
CONTAINERS = ["0123456789ab" + "c" * 52, "fedcba987654" + "d" * 52, "podman-not-hex"]
NAMES = ["web", "Web", "db", ""]
ALIASES = ["www", "shared", "a.b", "web", "x" * 70]
KEYS = [f"/plexus/endpoints/node{i % 2}/k{i}" for i in range(6)]
DOMAIN = "plexus.internal"


@st.composite
def endpoints(draw: st.DrawFn) -> Endpoint:
    net = draw(st.sampled_from(["front", "front", "back", "secret", "ghost"]))
    addresses = draw(st.lists(st.sampled_from(ADDRESSES[net]), max_size=2, unique=True))
    return endpoint(draw(st.sampled_from(NAMES)), net, *addresses,
                    aliases=draw(st.lists(st.sampled_from(ALIASES), max_size=2, unique=True)),
                    namespace=draw(st.sampled_from(["", "shop"])),
                    container_id=draw(st.sampled_from(CONTAINERS)),
                    ifname=draw(st.sampled_from(["eth0", "eth1"])))


NETWORK_VALUES = st.sampled_from([n for values in VARIANTS.values() for n in values])
ENDPOINT_CHANGE = st.tuples(st.just("endpoint"), st.sampled_from(KEYS),
                            st.none() | endpoints())
NETWORK_CHANGE = st.sampled_from(list(VARIANTS)).flatmap(
    lambda name: st.tuples(st.just("network"), st.just(name),
                           st.none() | st.sampled_from(VARIANTS[name])))
CHANGE = st.one_of(ENDPOINT_CHANGE, ENDPOINT_CHANGE, ENDPOINT_CHANGE, NETWORK_CHANGE)
BATCHES = st.lists(st.lists(CHANGE, min_size=1, max_size=3), min_size=1, max_size=10)
Change = tuple[str, str, object]


def batch(changes: list[Change]) -> DnsChanges:
    nets = {k: v for kind, k, v in changes if kind == "network"}
    eps = {k: v for kind, k, v in changes if kind == "endpoint"}
    return DnsChanges(networks=nets, endpoints=eps)  # type: ignore[arg-type]


# --- what is compared --------------------------------------------------------------------------


def probes() -> Iterator[tuple[str, int]]:
    """(name, type) for every form of every label, the empty non-terminals, the apex, reverse
    names inside and outside the subnets, and a name that is forwarded."""
    labels = ["web", "db", "www", "shared", "a.b", "b", CONTAINERS[0][:12]]
    middles = ["", *VARIANTS, "shop"]
    for label in labels:
        for middle in middles:
            base = f"{label}.{middle}" if middle else label
            for name in (base, f"{base}.{DOMAIN}"):
                yield name, QType.A
                yield name, QType.AAAA
    yield DOMAIN, QType.SOA
    yield from ((f"{m}.{DOMAIN}", QType.A) for m in middles if m)
    yield "example.com", QType.A
    for a in [*(a for values in ADDRESSES.values() for a in values), "10.1.0.99", "8.8.8.8"]:
        yield ipaddress.ip_address(a).reverse_pointer, QType.PTR
    yield ipaddress.ip_address("10.1.0.1").reverse_pointer, QType.A


PROBES = list(probes())
CLIENTS = [None, *(a for values in ADDRESSES.values() for a in values)]


def assert_same_answers(changed: RecordTable, fresh: RecordTable) -> None:
    assert set(changed.networks) == set(fresh.networks)
    assert changed.record_count() == fresh.record_count()
    assert set(changed.upstreams()) == set(fresh.upstreams())
    assert changed.listen_addresses() == fresh.listen_addresses()
    for net in [*VARIANTS, "ghost"]:
        mine = {ip: v.networks for ip, v in changed.client_views(net).items()}
        assert mine == {ip: v.networks for ip, v in fresh.client_views(net).items()}, net
        views = {}
        for client in CLIENTS:
            a, b = changed.view(net, client), fresh.view(net, client)
            assert (a.networks, a.forward, a.upstreams) == (b.networks, b.forward, b.upstreams)
            views[a.networks] = (a, b)
        for a, b in views.values():
            for name, qtype in PROBES:
                assert changed.resolve(a, name, qtype) == fresh.resolve(b, name, qtype), \
                    (a.networks, name, qtype)
        if net in fresh.networks:
            for client in CLIENTS[:4]:
                assert changed.explain(net, "web", "A", client) == \
                    fresh.explain(net, "web", "A", client)


# --- the property ------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(missing=st.sampled_from([None, *VARIANTS]),
       initial=st.dictionaries(st.sampled_from(KEYS), endpoints(), max_size=4),
       batches=BATCHES, domain=st.sampled_from([DOMAIN, ""]))
def test_changed_table_answers_like_one_built_from_the_final_state(
        missing: str | None, initial: dict[str, Endpoint],
        batches: list[list[Change]], domain: str) -> None:
    config = DnsSettings(domain=domain, upstreams=UP)
    networks = {n: values[0] for n, values in VARIANTS.items() if n != missing}
    eps = dict(initial)
    table = RecordTable.build(networks.values(), eps, config)
    for net in [*VARIANTS, "ghost"]:  # views and client maps handed out before the changes
        table.client_views(net)
        for client in CLIENTS:
            table.view(net, client)
    generation = table.generation
    for changes in batches:
        table.apply(batch(changes))
        assert table.generation > generation
        generation = table.generation
        for kind, key, value in changes:
            target: dict[str, object] = networks if kind == "network" else eps  # type: ignore[assignment]
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    fresh = RecordTable.build(networks.values(), eps, config)
    assert_same_answers(table, fresh)
    assert {k: dict(v) for k, v in zip("ne", table.sources, strict=True)} == \
        {"n": networks, "e": eps}


# --- the same, one case at a time --------------------------------------------------------------


def front() -> Network:
    return VARIANTS["front"][0]


def test_removing_an_endpoint_takes_back_exactly_what_it_published() -> None:
    t = RecordTable.build([front()], {}, SETTINGS)
    t.apply(DnsChanges(endpoints={"k1": endpoint("web", "front", "10.1.0.10", aliases=["a.b"],
                                                  namespace="shop")}))
    assert t.explain("front", "b.shop.plexus.internal").resolution.outcome == "nodata"
    assert t.explain("front", "web").resolution.addresses == (ipaddress.ip_address("10.1.0.10"),)
    t.apply(DnsChanges(endpoints={"k1": None}))
    assert t.record_count() == 0
    for gone in ("web.plexus.internal", "b.shop.plexus.internal", "front.plexus.internal"):
        assert t.explain("front", gone).resolution.outcome == "nxdomain", gone
    assert t.explain("front", "plexus.internal").resolution.outcome == "nodata"  # the apex stays


def test_a_shared_ent_lives_until_its_last_endpoint_goes() -> None:
    t = RecordTable.build([front()], {"k1": endpoint("web", "front", "10.1.0.10"),
                                      "k2": endpoint("db", "front", "10.1.0.11")}, SETTINGS)
    t.apply(DnsChanges(endpoints={"k1": None}))
    assert t.explain("front", "front.plexus.internal").resolution.outcome == "nodata"
    t.apply(DnsChanges(endpoints={"k2": None}))
    assert t.explain("front", "front.plexus.internal").resolution.outcome == "nxdomain"


def test_endpoints_with_the_same_endpoint_key_on_two_hosts_are_two_endpoints() -> None:
    here = endpoint("web", "front", "10.1.0.10", container_id="c1", ifname="eth0")
    there = endpoint("web", "front", "10.1.0.20", container_id="c1", ifname="eth0")
    assert here.key == there.key
    t = RecordTable.build([front()], {"/node1/c1/eth0": here}, SETTINGS)
    t.apply(DnsChanges(endpoints={"/node2/c1/eth0": there}))
    assert len(t.explain("front", "web").resolution.addresses) == 2
    t.apply(DnsChanges(endpoints={"/node1/c1/eth0": None}))
    assert t.explain("front", "web").resolution.addresses == (ipaddress.ip_address("10.1.0.20"),)


def test_endpoints_wait_for_their_network_and_leave_with_it() -> None:
    t = RecordTable.build([], {"k1": endpoint("db", "back", "10.2.0.5")}, SETTINGS)
    t.apply(DnsChanges(networks={"back": VARIANTS["back"][0]}))
    assert t.explain("back", "db").resolution.outcome == "answer"
    t.apply(DnsChanges(networks={"back": None}))
    assert t.networks == () and t.record_count() == 0
    t.apply(DnsChanges(networks={"back": VARIANTS["back"][0]}))  # the endpoint is still known
    assert t.explain("back", "db").resolution.outcome == "answer"


def test_changing_a_network_changes_how_its_view_forwards() -> None:
    t = RecordTable.build([front()], {}, SETTINGS)
    view = t.view("front")
    assert view.forward and view.upstreams == UP
    t.apply(DnsChanges(networks={"front": VARIANTS["front"][1]}))
    assert t.view("front") is view  # the listener's view is kept, and follows the change
    assert view.upstreams == (Upstream(ipaddress.ip_address("198.51.100.1")),)
    t.apply(DnsChanges(networks={"front": VARIANTS["front"][2]}))
    assert not view.forward
    assert t.explain("front", "example.com").resolution.outcome == "refused"


def test_client_views_follow_a_container_joining_and_leaving_a_second_network() -> None:
    nets = [front(), VARIANTS["back"][0]]
    t = RecordTable.build(nets, {"k1": endpoint("app", "front", "10.1.0.2")}, SETTINGS)
    held = t.client_views("front")  # what a listener holds on to
    assert held == {}
    t.apply(DnsChanges(endpoints={"k2": endpoint("app", "back", "10.2.0.2")}))
    assert held["10.1.0.2"].networks == ("front", "back")
    t.apply(DnsChanges(networks={"back": None}))
    assert held == {}


def test_a_change_drops_the_cached_answers_of_the_views_it_affects_only() -> None:
    nets = [front(), VARIANTS["back"][0]]
    t = RecordTable.build(nets, {"k1": endpoint("web", "front", "10.1.0.10")}, SETTINGS)
    on_front, on_back = t.view("front"), t.view("back")
    on_front.wire_cache[b"q"] = "answer"
    on_back.wire_cache[b"q"] = "answer"
    dropped = t.apply(DnsChanges(endpoints={"k2": endpoint("db", "front", "10.1.0.11")}))
    assert dropped == [{b"q": "answer"}]
    assert on_front.wire_cache == {} and on_back.wire_cache == {b"q": "answer"}
    assert on_front.serial == t.generation > on_back.serial


def test_a_change_dns_cannot_see_keeps_every_cached_answer() -> None:
    ep = endpoint("web", "front", "10.1.0.10")
    t = RecordTable.build([front()], {"k1": ep}, SETTINGS)
    t.view("front").wire_cache[b"q"] = "answer"
    moved_on = dataclasses.replace(ep, state="pending", labels={"x": "y"})
    assert t.apply(DnsChanges(endpoints={"k1": moved_on})) == []
    assert t.sources[1]["k1"] is moved_on


def test_a_network_must_be_keyed_by_its_own_name() -> None:
    with pytest.raises(InvalidArgument, match="front"):
        DnsChanges(networks={"back": front()})

"""The record table: which names resolve where, to what, and why."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from plexus.dns.config import (
    DnsSettings,
    Upstream,
    dns_enabled,
    format_upstreams,
    listen_addresses,
    network_upstreams,
    parse_upstream,
    parse_upstreams,
    resolv_conf_text_upstreams,
    resolv_conf_upstreams,
)
from plexus.dns.records import RecordTable
from plexus.dns.wire import QType, Rcode
from plexus.errors import InvalidArgument, NotFound
from plexus.model import keys
from plexus.testing.dns import endpoint, network

UP = (Upstream(ipaddress.ip_address("203.0.113.53")),)
SETTINGS = DnsSettings(upstreams=UP)


def ips(*values: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    return tuple(ipaddress.ip_address(v) for v in values)


def table(*eps, nets=None, settings=SETTINGS) -> RecordTable:  # type: ignore[no-untyped-def]
    nets = nets or [network("front", "10.1.0.0/24"), network("back", "10.2.0.0/24")]
    return RecordTable.build(nets, eps, settings)


def ask(t: RecordTable, net: str, name: str, qtype: int = QType.A, client: str | None = None):  # type: ignore[no-untyped-def]
    return t.resolve(t.view(net, client), name, qtype)


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "web", "web.front", "web.plexus.internal", "web.front.plexus.internal",
    "www", "www.front", "www.plexus.internal", "www.front.plexus.internal",
])
def test_name_and_alias_resolve_in_every_form(name: str) -> None:
    t = table(endpoint("web", "front", "10.1.0.10", aliases=["www"]))
    r = ask(t, "front", name)
    assert (r.outcome, r.addresses) == ("answer", ips("10.1.0.10"))


def test_names_are_case_insensitive_and_stored_lower_case() -> None:
    t = table(endpoint("Web", "front", "10.1.0.10", aliases=["WWW"]))
    assert ask(t, "front", "www.front").addresses == ips("10.1.0.10")
    assert t.explain("front", "WEB.Front.").resolution.addresses == ips("10.1.0.10")


def test_short_container_id_resolves_like_docker() -> None:
    ep = endpoint("web", "front", "10.1.0.10", container_id="abcdef0123456789" + "0" * 48)
    t = table(ep)
    r = ask(t, "front", "abcdef012345")
    assert r.addresses == ips("10.1.0.10")
    assert r.matches[0].kind == "id"


def test_kubernetes_style_pod_namespace_names() -> None:
    t = table(endpoint("api", "front", "10.1.0.20", namespace="shop"))
    for name in ("api.shop", "api.shop.plexus.internal"):
        r = ask(t, "front", name)
        assert r.addresses == ips("10.1.0.20"), name
        assert r.matches[0].form.startswith("LABEL.NAMESPACE")
    assert ask(t, "front", "api.other").outcome == "forward"


def test_configurable_domain_and_no_domain() -> None:
    ep = endpoint("web", "front", "10.1.0.10")
    custom = table(ep, settings=DnsSettings(domain="Corp.Example.", upstreams=UP))
    assert custom.settings.domain == "corp.example"
    assert ask(custom, "front", "web.front.corp.example").addresses == ips("10.1.0.10")
    assert ask(custom, "front", "web.plexus.internal").outcome == "forward"
    bare = table(ep, settings=DnsSettings(domain="", upstreams=UP))
    assert ask(bare, "front", "web.front").addresses == ips("10.1.0.10")
    assert ask(bare, "front", "web.plexus.internal").outcome == "forward"


def test_dual_stack_a_and_aaaa() -> None:
    nets = [network("front", "10.1.0.0/24", "fd00:1::/64")]
    t = table(endpoint("web", "front", "10.1.0.10", "fd00:1::10"), nets=nets)
    assert ask(t, "front", "web", QType.A).addresses == ips("10.1.0.10")
    assert ask(t, "front", "web", QType.AAAA).addresses == ips("fd00:1::10")
    assert set(ask(t, "front", "web", QType.ANY).addresses) == set(ips("10.1.0.10", "fd00:1::10"))


def test_invalid_labels_are_skipped_not_fatal() -> None:
    t = table(endpoint("x" * 70, "front", "10.1.0.10", aliases=["ok", "bad..dots", " "]))
    assert ask(t, "front", "ok").addresses == ips("10.1.0.10")
    assert ask(t, "front", "x" * 70).outcome == "forward"


# --- scoping --------------------------------------------------------------------------------


def test_name_does_not_resolve_on_a_network_the_container_is_not_on() -> None:
    t = table(endpoint("db", "back", "10.2.0.5"))
    assert ask(t, "back", "db").addresses == ips("10.2.0.5")
    r = ask(t, "front", "db")
    assert r.outcome == "forward"
    assert "exists on network back" in r.reason
    under_domain = ask(t, "front", "db.back.plexus.internal")
    assert under_domain.outcome == "nxdomain"
    assert "back" in under_domain.reason


def test_client_on_two_networks_sees_both_and_prefers_the_listener_network() -> None:
    client = endpoint("app", "front", "10.1.0.2")
    client_back = endpoint("app", "back", "10.2.0.2")
    db = endpoint("db", "back", "10.2.0.5")
    both_front = endpoint("cache", "front", "10.1.0.7")
    both_back = endpoint("cache", "back", "10.2.0.7")
    t = table(client, client_back, db, both_front, both_back)
    assert t.view("front", "10.1.0.2").networks == ("front", "back")
    assert ask(t, "front", "db", client="10.1.0.2").addresses == ips("10.2.0.5")
    # a name on both networks: the address on the network the query came in on
    assert ask(t, "front", "cache", client="10.1.0.2").addresses == ips("10.1.0.7")
    assert ask(t, "back", "cache", client="10.2.0.2").addresses == ips("10.2.0.7")
    # an unknown source (the host, a stranger) sees only the listener's network
    assert ask(t, "front", "db", client="10.1.0.99").outcome == "forward"
    assert set(t.client_views("front")) == {"10.1.0.2", "10.1.0.7"}  # only multi-network ones
    assert t.client_views("front")["10.1.0.2"] is t.view("front", "10.1.0.2")


def test_first_network_with_the_asked_type_wins() -> None:
    nets = [network("front", "10.1.0.0/24"), network("back", "10.2.0.0/24", "fd00:2::/64")]
    eps = [endpoint("app", "front", "10.1.0.2"), endpoint("app", "back", "10.2.0.2"),
           endpoint("svc", "front", "10.1.0.3"), endpoint("svc", "back", "10.2.0.3", "fd00:2::3")]
    t = table(*eps, nets=nets)
    assert ask(t, "front", "svc", QType.AAAA, client="10.1.0.2").addresses == ips("fd00:2::3")


# --- round-robin ----------------------------------------------------------------------------


def test_shared_alias_gives_every_address_in_stable_base_order() -> None:
    eps = [endpoint(f"web{i}", "front", f"10.1.0.{10 + i}", aliases=["web"]) for i in range(3)]
    t = table(*reversed(eps))
    r = ask(t, "front", "web")
    assert sorted(r.addresses) == list(ips("10.1.0.10", "10.1.0.11", "10.1.0.12"))
    assert "round-robin over 3 addresses" in r.reason
    assert {m.container for m in r.matches} == {"web0", "web1", "web2"}


def test_alias_equal_to_name_does_not_duplicate_addresses() -> None:
    t = table(endpoint("web", "front", "10.1.0.10", aliases=["web", "WEB"]))
    assert ask(t, "front", "web").addresses == ips("10.1.0.10")


# --- reverse --------------------------------------------------------------------------------


def test_ptr_for_container_addresses() -> None:
    nets = [network("front", "10.1.0.0/24", "fd00:1::/64")]
    t = table(endpoint("web", "front", "10.1.0.10", "fd00:1::10"), nets=nets)
    r = ask(t, "front", "10.0.1.10.in-addr.arpa", QType.PTR)
    assert r.targets == ("web.front.plexus.internal",)
    v6 = ipaddress.ip_address("fd00:1::10").reverse_pointer
    assert ask(t, "front", v6, QType.PTR).targets == ("web.front.plexus.internal",)
    assert ask(t, "front", "10.0.1.10.in-addr.arpa", QType.A).outcome == "nodata"


def test_reverse_inside_our_subnet_is_nxdomain_outside_is_forwarded() -> None:
    t = table(endpoint("web", "front", "10.1.0.10"))
    assert ask(t, "front", "99.0.1.10.in-addr.arpa", QType.PTR).outcome == "nxdomain"
    assert ask(t, "front", "8.8.8.8.in-addr.arpa", QType.PTR).outcome == "forward"
    # another network's addresses are not revealed
    assert ask(t, "back", "10.0.1.10.in-addr.arpa", QType.PTR).outcome == "forward"


# --- negative answers -----------------------------------------------------------------------


def test_nodata_versus_nxdomain() -> None:
    t = table(endpoint("web", "front", "10.1.0.10"))
    nodata = ask(t, "front", "web.plexus.internal", QType.AAAA)
    assert (nodata.outcome, nodata.rcode, nodata.zone) == ("nodata", Rcode.NOERROR,
                                                           "plexus.internal")
    assert ask(t, "front", "web", QType.MX).outcome == "nodata"
    nx = ask(t, "front", "nope.plexus.internal")
    assert (nx.outcome, nx.rcode, nx.zone) == ("nxdomain", Rcode.NXDOMAIN, "plexus.internal")


def test_empty_non_terminals_are_nodata_and_apex_has_soa() -> None:
    t = table(endpoint("web", "front", "10.1.0.10", namespace="shop", aliases=["a.b"]))
    for ent in ("front.plexus.internal", "shop.plexus.internal", "b.plexus.internal",
                "b.front.plexus.internal", "plexus.internal"):
        assert ask(t, "front", ent).outcome == "nodata", ent
    soa = ask(t, "front", "plexus.internal", QType.SOA)
    assert soa.soa and soa.outcome == "answer"


# --- forwarding decisions -------------------------------------------------------------------


def test_everything_else_is_forwarded_to_the_network_or_agent_upstreams() -> None:
    own = Upstream(ipaddress.ip_address("198.51.100.1"), 5353)
    nets = [network("front", "10.1.0.0/24", options={"dns_upstreams": "198.51.100.1:5353"}),
            network("back", "10.2.0.0/24")]
    t = table(nets=nets)
    assert ask(t, "front", "example.com").upstreams == (own,)
    assert ask(t, "back", "example.com").upstreams == UP
    assert set(t.upstreams()) == {own, *UP}


def test_internal_networks_do_not_forward() -> None:
    nets = [network("secret", "10.3.0.0/24", internal=True)]
    t = table(endpoint("vault", "secret", "10.3.0.5"), nets=nets)
    assert ask(t, "secret", "vault").addresses == ips("10.3.0.5")
    r = ask(t, "secret", "example.com")
    assert (r.outcome, r.rcode) == ("refused", Rcode.REFUSED)
    assert "internal" in r.reason


def test_no_upstreams_is_servfail() -> None:
    t = table(settings=DnsSettings())
    r = ask(t, "front", "example.com")
    assert (r.outcome, r.rcode) == ("servfail", Rcode.SERVFAIL)


def test_non_internet_class_and_opaque_names_are_forwarded() -> None:
    t = table(endpoint("web", "front", "10.1.0.10"))
    assert t.resolve(t.view("front"), "web", QType.A, qclass=3).outcome == "forward"
    assert t.resolve(t.view("front"), "web", QType.A, opaque=True).outcome == "forward"


def test_unknown_network_view_refuses() -> None:
    t = table()
    assert ask(t, "gone", "web").outcome == "refused"


# --- explain --------------------------------------------------------------------------------


def test_explain_says_which_endpoint_and_alias_matched() -> None:
    t = table(endpoint("web", "front", "10.1.0.10", aliases=["www"]))
    e = t.explain("front", "www.front.plexus.internal", "A")
    d = e.to_dict()
    assert d["outcome"] == "answer" and d["rcode"] == "NOERROR"
    assert d["matches"][0]["label"] == "www" and d["matches"][0]["kind"] == "alias"
    assert d["matches"][0]["form"] == "LABEL.NETWORK.DOMAIN"
    assert "www.front.plexus.internal" in e.text() and "container web" in e.text()


def test_explain_forwarded_and_errors() -> None:
    t = table()
    e = t.explain("front", "example.com", "AAAA")
    assert e.resolution.outcome == "forward" and e.rcode == ""
    assert "forwarded to 203.0.113.53:53" in e.text()
    with pytest.raises(NotFound):
        t.explain("nope", "x")
    with pytest.raises(InvalidArgument):
        t.explain("front", "x", "BOGUS")
    assert t.explain("front", "x", "TYPE65").qtype == "HTTPS"


def test_generation_and_sources() -> None:
    ep = endpoint("web", "front", "10.1.0.10")
    a, b = table(ep), table(ep)
    assert b.generation > a.generation
    networks, endpoints = a.sources
    assert list(networks) == ["front", "back"]
    # endpoints given as a plain iterable are filed under their datastore keys
    assert dict(endpoints) == {keys.endpoint("node1", ep.container_id, "eth-front"): ep}
    assert RecordTable.build([], [], generation=7).generation == 7
    assert RecordTable.build([], {"mine": ep}).sources[1] == {"mine": ep}


def test_endpoints_on_unknown_networks_or_without_addresses_are_ignored() -> None:
    t = table(endpoint("ghost", "nowhere", "10.9.0.1"), endpoint("blank", "front"))
    assert t.record_count() == 0


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("203.0.113.1", "203.0.113.1", 53), ("203.0.113.1:5353", "203.0.113.1", 5353),
    ("[2001:db8::1]:54", "2001:db8::1", 54), ("2001:db8::1", "2001:db8::1", 53),
    ("[2001:db8::1]", "2001:db8::1", 53), (" 10.0.0.1 ", "10.0.0.1", 53),
])
def test_parse_upstream(text: str, host: str, port: int) -> None:
    assert parse_upstream(text) == Upstream(ipaddress.ip_address(host), port)


@pytest.mark.parametrize("text", ["", "dns.google", "1.2.3.4:0", "1.2.3.4:99999", "[::1",
                                  "[::1]x", "1.2.3.4:x"])
def test_parse_upstream_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_upstream(text)


def test_upstream_lists_round_trip_through_network_options() -> None:
    ups = parse_upstreams(["203.0.113.1", "203.0.113.2:5353,[2001:db8::1]:53", "203.0.113.1"])
    assert len(ups) == 3
    net = network("n", options={"dns_upstreams": format_upstreams(ups)})
    assert network_upstreams(net) == ups
    assert str(ups[2]) == "[2001:db8::1]:53"


def test_resolv_conf(tmp_path: Path) -> None:
    text = ("# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n"
            "nameserver bogus\nnameserver 10.0.0.2 # trailing\n")
    found = resolv_conf_text_upstreams(text)
    assert [str(u.host) for u in found] == ["127.0.0.53", "fe80::1", "10.0.0.2"]
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    assert resolv_conf_upstreams(path) == found
    assert resolv_conf_upstreams(tmp_path / "missing") == ()


def test_dns_enabled_and_listen_addresses() -> None:
    on = network("a", "10.1.0.0/24", "fd00:1::/64")
    off = network("b", options={"dns": "false"})
    assert dns_enabled(on) and not dns_enabled(off)
    assert [str(a) for a in listen_addresses(on)] == ["10.1.0.1", "fd00:1::1"]
    assert listen_addresses(off) == ()
    t = table(nets=[on, off])
    assert list(t.listen_addresses()) == ["a"]


@pytest.mark.parametrize(("field", "value"), [("ttl", -1), ("ttl", 10**6), ("domain", "a..b")])
def test_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument):
        DnsSettings(**{field: value})  # type: ignore[arg-type]


def test_a_thousand_endpoints_sharing_an_alias() -> None:
    # (How long a build takes is bench/dns_update.py's business, not a pass/fail here.)
    nets = [network("front", "10.0.0.0/16")]
    eps = [endpoint(f"c{i}", "front", str(ipaddress.ip_address("10.0.4.1") + i),
                    aliases=[f"a{i}", "shared"], namespace="ns") for i in range(1000)]
    t = RecordTable.build(nets, eps, SETTINGS)
    shared = ask(t, "front", "shared").addresses
    assert sorted(shared) == [e.addresses[0].ip for e in eps]
    assert ask(t, "front", "a999.ns").addresses == ips("10.0.7.232")


def test_a_container_on_an_internal_and_an_external_network_may_forward() -> None:
    nets = [network("secret", "10.3.0.0/24", internal=True), network("front", "10.1.0.0/24")]
    eps = [endpoint("app", "secret", "10.3.0.2"), endpoint("app", "front", "10.1.0.2"),
           endpoint("only", "secret", "10.3.0.3")]
    t = table(*eps, nets=nets)
    assert ask(t, "secret", "example.com", client="10.3.0.2").outcome == "forward"
    assert ask(t, "secret", "example.com", client="10.3.0.3").outcome == "refused"
    assert ask(t, "secret", "example.com").outcome == "refused"

"""The expectations of `plexus verify` (pure, over a fake cache): which local containers must
reach which endpoints on which ports and which must not, and why; and how a probe's outcome is
judged against them."""

from __future__ import annotations

import ipaddress
import struct

from plexus.model.types import Endpoint, ExposedPort, Network, PortMapping, Subnet
from plexus.observe.expect import MAX_PORTS, Expectation, Model, expectations, target_ports
from plexus.observe.neigh import BUDGET, delneigh_request
from plexus.observe.probe import Outcome, Result
from plexus.observe.verify import judge, made, on_link, report, rounds
from plexus.policy import documents
from plexus.state.cache import Cache


def _net(name: str, cidr: str, driver: str = "bridge", internal: bool = False) -> Network:
    net = ipaddress.ip_network(cidr)
    return Network(name, name * 4, driver, (Subnet(net, next(net.hosts())),), internal=internal)


NETS = [_net("a", "10.1.0.0/24"), _net("b", "10.2.0.0/24"), _net("i", "10.3.0.0/24",
                                                                 internal=True),
        _net("ov", "10.4.0.0/24", "overlay")]


def _ep(name: str, network: str, address: str, node: str = "n1", **kw: object) -> Endpoint:
    net = next(n for n in NETS if n.name == network)
    gateway = net.subnets[0].gateway
    fields: dict[str, object] = {
        "container_id": f"id-{name}", "ifname": "eth0", "network": network, "node": node,
        "netns": f"/run/netns/{name}", "name": name, "labels": {"pod": name}, "state": "ready",
        "addresses": (ipaddress.ip_interface(f"{address}/24"),),
        "gateways": (gateway,) if gateway is not None else (), **kw}
    return Endpoint(**fields)  # type: ignore[arg-type]


def _model(*eps: Endpoint, policies: tuple[dict[str, object], ...] = ()) -> Model:
    cache = Cache(node="n1")
    for n in NETS:
        cache.networks[n.name] = n
    for ep in eps:
        cache.endpoints[ep.store_key] = ep
    for i, doc in enumerate(policies):
        cache.policies[f"p{i}"] = documents.parse(doc)
    return Model.of(cache)


def _of(found: list[Expectation], src: str, dst: str, port: int = 80,
        proto: str = "tcp") -> Expectation:
    [e] = [e for e in found if (e.src.name if e.src else "host", e.dst.name, e.port,
                                e.protocol) == (src, dst, port, proto)]
    return e


def test_one_network_connects_and_networks_are_isolated_and_internal_ones_closed() -> None:
    found = expectations(_model(_ep("a1", "a", "10.1.0.2"), _ep("a2", "a", "10.1.0.3"),
                                _ep("b1", "b", "10.2.0.2"), _ep("i1", "i", "10.3.0.2")))
    same = _of(found, "a1", "a2")
    assert same.reachable and same.reason == "network a; no policy selects either end"
    assert str(same.address) == "10.1.0.3"
    assert (_of(found, "a1", "b1").reachable, _of(found, "a1", "b1").reason) == (
        False, "isolation: networks a and b")
    assert _of(found, "b1", "i1").reason == "internal network i"
    assert _of(found, "i1", "a1").reason == "internal network i"  # nor out of it
    assert len(found) == 4 * 3  # every ordered pair, the default port only


def test_a_container_on_two_networks_reaches_both_by_the_shared_one() -> None:
    two = [_ep("ab", "a", "10.1.0.9"),
           _ep("ab", "b", "10.2.0.9", ifname="eth1", gateways=())]
    found = expectations(_model(*two, _ep("a1", "a", "10.1.0.2"), _ep("b1", "b", "10.2.0.2")))
    to_b = _of(found, "ab", "b1")
    assert to_b.reachable and to_b.src is not None and to_b.src.network == "b"
    assert not _of(found, "a1", "b1").reachable
    # b1 reaches ab's address on b, not its address on a (that one is behind isolation)
    assert {(str(e.address), e.reachable) for e in found if e.src and e.src.name == "b1"
            and e.dst.name == "ab"} == {("10.1.0.9", False), ("10.2.0.9", True)}


def test_ports_are_the_default_the_exposed_the_published_and_the_policies_capped() -> None:
    ep = _ep("a1", "a", "10.1.0.2", exposes=(ExposedPort(53, "udp"), ExposedPort(9, "sctp")),
             ports=(PortMapping(8080, 8000),))
    assert target_ports(ep, [(443, "tcp"), (80, "tcp")]) == [
        (80, "tcp"), (53, "udp"), (8000, "tcp"), (443, "tcp")]
    many = [(p, "tcp") for p in range(1000, 1020)]
    assert len(target_ports(ep, many)) == MAX_PORTS


POLICY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "only-a2", "namespace": "default"},
          "spec": {"podSelector": {"matchLabels": {"pod": "a1"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a2"}}}],
                                "ports": [{"port": 5432}]}]}}


def test_a_policy_decides_within_a_network_and_its_ports_are_probed() -> None:
    found = expectations(_model(_ep("a1", "a", "10.1.0.2"), _ep("a2", "a", "10.1.0.3"),
                                _ep("a3", "a", "10.1.0.4"), policies=(POLICY,)))
    allowed = _of(found, "a2", "a1", 5432)
    assert allowed.reachable and "NetworkPolicy default/only-a2 ingress[0] allows" in \
        allowed.reason
    denied = _of(found, "a3", "a1", 5432)
    assert not denied.reachable
    assert "policy NetworkPolicy default/only-a2 isolated, no rule allows denies (ingress)" in \
        denied.reason
    assert not _of(found, "a2", "a1", 80).reachable  # only 5432 is allowed
    assert _of(found, "a1", "a3", 5432).reachable  # egress is not isolated


def test_only_local_sources_and_other_hosts_targets_only_on_spanning_networks() -> None:
    found = expectations(_model(_ep("c1", "ov", "10.4.0.2"), _ep("c2", "ov", "10.4.0.3", "n2"),
                                _ep("r1", "a", "10.1.0.7", "n2"), _ep("a1", "a", "10.1.0.2")))
    assert {e.src.name for e in found if e.src} == {"c1", "a1"}
    assert _of(found, "c1", "c2").reachable
    assert not _of(found, "a1", "c2").reachable  # isolated across hosts as on one
    assert not [e for e in found if e.dst.name == "r1"]  # another host's bridge: not ours


def test_udp_to_another_host_is_probed_but_not_judged() -> None:
    c2 = _ep("c2", "ov", "10.4.0.3", "n2", exposes=(ExposedPort(53, "udp"),))
    found = expectations(_model(_ep("c1", "ov", "10.4.0.2"), c2))
    assert _of(found, "c1", "c2", 53, "udp").decidable
    assert not _of(found, "c1", "c2", 80, "tcp").decidable


def test_a_published_port_is_called_from_another_network_through_its_gateway() -> None:
    pub = (PortMapping(8080, 80), PortMapping(9090, 90, host_ip=ipaddress.ip_address(
        "127.0.0.1")), PortMapping(5353, 53, "udp"))
    found = expectations(_model(_ep("a1", "a", "10.1.0.2", ports=pub), _ep("a2", "a", "10.1.0.3"),
                                _ep("b1", "b", "10.2.0.2")))
    published = [e for e in found if e.published]
    assert {e.port for e in published} == {8080, 5353}  # 127.0.0.1 is the host's loopback
    web = _of(found, "b1", "a1", 8080)
    assert (str(web.address), web.container_port, web.reachable) == ("10.2.0.1", 80, True)
    assert web.reason.startswith("published port 8080 -> a1:80")
    assert _of(found, "b1", "a1", 5353, "udp").decidable  # a UDP publication: not judged


def test_a_published_port_without_another_container_is_called_from_the_host() -> None:
    found = expectations(_model(_ep("a1", "a", "10.1.0.2", ports=(PortMapping(8080, 80),)),
                                _ep("i1", "i", "10.3.0.2", ports=(PortMapping(8081, 80),))))
    web = _of(found, "host", "a1", 8080)
    assert str(web.address) == "10.1.0.1" and web.reachable
    assert not [e for e in found if e.port == 8081]  # never installed on an internal network


def test_a_network_filter_keeps_pairs_with_an_end_on_it() -> None:
    model = _model(_ep("a1", "a", "10.1.0.2"), _ep("b1", "b", "10.2.0.2"),
                   _ep("i1", "i", "10.3.0.2"))
    pairs = {(e.src.name if e.src else "", e.dst.name) for e in expectations(model, "b")}
    assert pairs == {("a1", "b1"), ("b1", "a1"), ("b1", "i1"), ("i1", "b1")}


def _judge(e: Expectation, outcome: Outcome, listeners: dict[str, set[tuple[str, int]]] | None
           = None) -> tuple[bool, bool | None]:
    c = judge(e, Result(outcome), listeners or {})
    return c.reached, c.agrees


def test_outcomes_are_judged_as_the_kernel_means_them() -> None:
    found = expectations(_model(_ep("a1", "a", "10.1.0.2", ports=(PortMapping(8080, 80),),
                                    exposes=(ExposedPort(81, "udp"),)),
                                _ep("b1", "b", "10.2.0.2"), _ep("a2", "a", "10.1.0.3")))
    tcp = _of(found, "a2", "a1")
    assert _judge(tcp, Outcome.REFUSED) == (True, True)  # an RST: its stack answered
    assert _judge(tcp, Outcome.SILENT) == (False, False)
    assert _judge(_of(found, "b1", "a1"), Outcome.UNREACHABLE) == (False, True)
    pub = _of(found, "b1", "a1", 8080)
    serving = {"/run/netns/a1": {("tcp", 80)}}
    assert _judge(pub, Outcome.CONNECTED, serving) == (True, True)
    assert _judge(pub, Outcome.REFUSED, serving) == (False, False)  # the host's own RST
    assert _judge(pub, Outcome.CONNECTED)[1] is None  # nothing listens in a1: cannot tell
    udp = _of(found, "a2", "a1", 81, "udp")
    assert _judge(udp, Outcome.REFUSED) == (True, True)  # ICMP port unreachable
    assert _judge(udp, Outcome.SILENT) == (False, False)  # nothing listens: dropped
    assert _judge(udp, Outcome.SILENT, {"/run/netns/a1": {("udp", 81)}})[1] is None


def test_the_report_disagrees_when_one_probe_does() -> None:
    found = expectations(_model(_ep("a1", "a", "10.1.0.2"), _ep("a2", "a", "10.1.0.3")))
    ok = [judge(e, Result(Outcome.CONNECTED), {}) for e in found]
    assert report("n1", ok, 0.1, 1.0)["agrees"]
    bad = report("n1", [*ok[:-1], judge(found[-1], Result(Outcome.SILENT), {})], 0.1, 1.0)
    assert not bad["agrees"] and bad["counts"]["disagree"] == 1
    assert bad["mismatches"][0]["expected"] == "reachable"


def test_pairs_of_one_segment_go_in_rounds_that_bound_the_neighbour_entries() -> None:
    eps = [_ep(f"a{i}", "a", f"10.1.0.{i + 2}") for i in range(40)]
    eps += [_ep(f"b{i}", "b", f"10.2.0.{i + 2}") for i in range(10)]
    found = expectations(_model(*eps))
    linked = [i for i, e in enumerate(found) if on_link(e)]
    assert len(linked) == 40 * 39 + 10 * 9  # isolation probes are not on a link
    batches = rounds(found, linked, "n1")
    assert sorted(i for b in batches for i in b) == linked  # every one, once
    for batch in batches:
        entries = {x for i in batch for x in made(found[i], "n1")}
        assert len(entries) <= BUDGET
    assert len(batches) < 50  # tiles merged: fewer rounds than sources (9 here)


def test_a_probe_on_a_link_makes_an_entry_on_each_side_of_this_host() -> None:
    found = expectations(_model(_ep("c1", "ov", "10.4.0.2"), _ep("c2", "ov", "10.4.0.3", "n2"),
                                _ep("c3", "ov", "10.4.0.4")))
    assert {(ns, str(a)) for ns, _, a in made(_of(found, "c1", "c3"), "n1")} == {
        ("/run/netns/c1", "10.4.0.4"), ("/run/netns/c3", "10.4.0.2")}
    # another host's namespace is that host's: only the source's own entry is taken back
    assert len(made(_of(found, "c1", "c2"), "n1")) == 1


def test_the_neighbour_deletion_is_an_rtm_delneigh_for_the_address() -> None:
    msg = delneigh_request(7, 3, ipaddress.ip_address("10.1.0.9"))
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), 29, 7) and flags & 0x4  # NLM_F_ACK
    family, index = struct.unpack_from("=B3xi", msg, 16)
    assert (family, index) == (2, 3) and msg.endswith(bytes([10, 1, 0, 9]))

"""`plexus verify`'s expectations of services (pure, over a cache fed as the informer feeds it):
a client on a service's network must reach its VIP, one on another network must not, a port
without ready endpoints must refuse; and how a VIP probe's outcome is judged."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from plexus.lb.spec import Service, ServicePort
from plexus.model import keys
from plexus.model.types import Endpoint, Network, Subnet
from plexus.observe.expect import Expectation, Model
from plexus.observe.expect_services import MAX_CLIENTS, expected, vips
from plexus.observe.probe import Outcome, Result
from plexus.observe.verify import judge, on_link, view
from plexus.policy import documents
from plexus.state.cache import Cache
from plexus.store.base import KeyValue
from plexus.store.informer import Change

ip = ipaddress.ip_address
VIP, EMPTY = ip("10.96.0.10"), ip("10.96.0.11")
WEB = Service("default", "web", "a", {"app": "web"}, (ServicePort(80), ServicePort(53, "udp")),
              (VIP,))
NONE = Service("default", "none", "a", {"app": "gone"},
               (ServicePort(80), ServicePort(53, "udp")), (EMPTY,))
DENY = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-closed", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}}


def _net(name: str, cidr: str, internal: bool = False) -> Network:
    net = ipaddress.ip_network(cidr)
    return Network(name, name * 4, "bridge", (Subnet(net, next(net.hosts())),),
                   internal=internal)


NETS = [_net("a", "10.1.0.0/24"), _net("b", "10.2.0.0/24"), _net("i", "10.3.0.0/24", True)]


def _ep(name: str, network: str, address: str, node: str = "n1", **labels: str) -> Endpoint:
    net = next(n for n in NETS if n.name == network)
    return Endpoint(f"id-{name}", "eth0", network, node, f"/run/netns/{name}", name=name,
                    labels={"pod": name, **labels}, state="ready",
                    addresses=(ipaddress.ip_interface(f"{address}/24"),),
                    gateways=(net.subnets[0].gateway,))  # type: ignore[arg-type]


def _put(key: str, value: str) -> Change:
    return Change(key, KeyValue(key, value, 1, 1, 1), 1)


def _model(*eps: Endpoint, services: tuple[Service, ...] = (WEB, NONE),
           policies: tuple[dict[str, Any], ...] = ()) -> Model:
    cache = Cache(node="n1")
    changes = [_put(keys.network(n.name), n.to_json()) for n in NETS]
    changes += [_put(ep.store_key, ep.to_json()) for ep in eps]
    changes += [_put(keys.service(s.namespace, s.name), s.to_json()) for s in services]
    cache.apply(changes)
    for i, doc in enumerate(policies):
        cache.policies[f"p{i}"] = documents.parse(doc)
    return Model.of(cache)


WORLD = (_ep("a1", "a", "10.1.0.2"), _ep("web1", "a", "10.1.0.3", app="web"),
         _ep("web2", "a", "10.1.0.4", app="web"), _ep("b1", "b", "10.2.0.2"),
         _ep("i1", "i", "10.3.0.2"))


def _of(found: list[Expectation], src: str, service: str, port: int = 80,
        proto: str = "tcp") -> Expectation:
    [e] = [e for e in found if e.service is not None and e.src is not None
           and (e.src.name, e.service.name, e.port, e.protocol) == (src, service, port, proto)]
    return e


def _clients(found: list[Expectation], service: str) -> set[tuple[str, int, str]]:
    return {(e.src.name if e.src else "host", e.port, e.protocol) for e in found
            if e.service is not None and e.service.name == service}


def test_a_client_on_the_network_reaches_the_vip_and_one_on_another_does_not() -> None:
    found = vips(_model(*WORLD))
    ok = _of(found, "a1", "web")
    assert ok.reachable and ok.address == VIP and ok.dst is None and not ok.refused
    assert ok.reason == "service default/web (2 ready); no policy selects either end"
    assert sorted(ep.name for ep, port in ok.backends) == ["web1", "web2"]
    apart = _of(found, "b1", "web")
    assert not apart.reachable and not apart.refused
    assert apart.reason == "isolation: networks b and a (service default/web's VIP)"
    # Its own endpoints are no clients, an internal network's container routes nowhere, and a
    # UDP port with endpoints is not probed (an empty datagram draws no answer).
    assert _clients(found, "web") == {("a1", 80, "tcp"), ("b1", 80, "tcp")}
    assert not any(on_link(e) for e in found)  # a VIP is no neighbour: probed all at once


def test_a_port_without_ready_endpoints_must_refuse_its_network_only() -> None:
    found = vips(_model(*WORLD))
    # On its network only, both protocols (ICMP port unreachable for UDP), MAX_CLIENTS by name.
    assert _clients(found, "none") == {(c, port, proto) for c in ("a1", "web1")
                                       for port, proto in ((80, "tcp"), (53, "udp"))}
    empty = _of(found, "a1", "none")
    assert empty.refused and not empty.reachable and empty.address == EMPTY
    assert empty.reason == "service default/none has no ready endpoint for 80/tcp: refused"
    # An endpoint not ready (or gone) backs nothing: the port refuses.
    pending = replace(_ep("web3", "a", "10.1.0.5", app="gone"), state="pending")
    assert _of(vips(_model(*WORLD, pending)), "a1", "none").refused


def test_policy_judges_the_endpoints_behind_the_vip() -> None:
    closed = _of(vips(_model(*WORLD, policies=(DENY,))), "a1", "web")
    assert not closed.reachable and "web-closed" in closed.reason and not closed.decidable
    half = dict(DENY, spec={"podSelector": {"matchLabels": {"pod": "web1"}},
                            "policyTypes": ["Ingress"]})
    mixed = _of(vips(_model(*WORLD, policies=(half,))), "a1", "web")
    assert mixed.decidable.startswith("policy allows some of its endpoints")


def test_clients_are_bounded_and_a_network_filter_keeps_its_side() -> None:
    many = [_ep(f"c{i}", "a", f"10.1.0.{20 + i}") for i in range(5)]
    found = vips(_model(*WORLD, *many))
    assert len([e for e in found if e.service == WEB and e.src is not None
                and e.src.network == "a"]) == MAX_CLIENTS
    only_b = vips(_model(*WORLD), network="b")
    assert _clients(only_b, "web") == {("b1", 80, "tcp")} and _clients(only_b, "none") == set()
    assert _clients(vips(_model(*WORLD), network="a"), "web") == _clients(
        vips(_model(*WORLD)), "web")  # the service's own network: both sides
    # expected() is the pairs and the VIPs together.
    both = expected(_model(*WORLD))
    assert any(e.service is None for e in both) and any(e.service is not None for e in both)


def _judge(e: Expectation, outcome: Outcome,
           listeners: dict[str, set[tuple[str, int]]] | None = None) -> tuple[Any, ...]:
    c = judge(e, Result(outcome), listeners or {})
    v = view(c)
    return c.agrees, v["expected"], v["observed"]


SERVING = {"/run/netns/web1": {("tcp", 80)}, "/run/netns/web2": {("tcp", 80)}}


def test_vip_outcomes_are_judged_as_the_load_balancer_means_them() -> None:
    found = vips(_model(*WORLD))
    ok = _of(found, "a1", "web")
    assert _judge(ok, Outcome.CONNECTED) == (True, "reachable", "reachable")
    # Not connected: wrong only when every endpoint here listens (else its own RST).
    assert _judge(ok, Outcome.SILENT, SERVING) == (False, "reachable", "blocked")
    assert _judge(ok, Outcome.REFUSED, SERVING) == (False, "reachable", "refused")
    assert _judge(ok, Outcome.UNREACHABLE, SERVING)[0] is False
    half = {"/run/netns/web1": {("tcp", 80)}, "/run/netns/web2": set()}
    assert judge(ok, Result(Outcome.REFUSED), half).undecided == \
        "nothing listens on 80/tcp in endpoint web2"
    assert judge(ok, Result(Outcome.SILENT), {}).undecided == \
        "endpoint web1 is on another host (its sockets unseen)"
    apart = _of(found, "b1", "web")
    assert _judge(apart, Outcome.SILENT, SERVING) == (True, "blocked", "blocked")
    assert _judge(apart, Outcome.CONNECTED) == (False, "blocked", "reachable")
    empty = _of(found, "a1", "none")
    assert _judge(empty, Outcome.REFUSED) == (True, "refused", "refused")
    assert _judge(empty, Outcome.SILENT) == (False, "refused", "blocked")
    assert _judge(empty, Outcome.CONNECTED) == (False, "refused", "reachable")
    assert view(judge(empty, Result(Outcome.REFUSED), {}))["to"] == "default/none"


def test_an_ipv6_vip_needs_endpoints_listening_over_ipv6() -> None:
    """A server bound to 0.0.0.0 (``python3 -m http.server``) refuses an IPv6 client itself:
    a refused IPv6 VIP probe then says nothing about the network."""
    vip6 = ipaddress.ip_address("fd00:10:96::5")
    ok = replace(_of(vips(_model(*WORLD)), "a1", "web"), address=vip6)
    assert judge(ok, Result(Outcome.REFUSED), SERVING).undecided == \
        "nothing listens on 80/tcp over IPv6 in endpoint web1"
    dual = {ns: {*ports, ("tcp6", 80)} for ns, ports in SERVING.items()}
    assert _judge(ok, Outcome.REFUSED, dual) == (False, "reachable", "refused")

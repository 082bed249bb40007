"""Services' specs: the CLI's --port, --publish, --selector, the service range and VIP picking,
and Kubernetes v1 Service documents. Pure."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest
import yaml

from plexus.errors import InvalidArgument
from plexus.lb import k8s, spec, vips
from plexus.lb.spec import Publish, Service, ServicePort

IP = ipaddress.ip_address


@pytest.mark.parametrize(("text", "want"), [
    ("80", ServicePort(80)),
    ("53/udp", ServicePort(53, "udp")),
    ("http:80", ServicePort(80, "tcp", 0, "http")),
    ("80:8080", ServicePort(80, "tcp", 8080)),
    ("80:80", ServicePort(80)),
    ("80:web", ServicePort(80, "tcp", "web")),
    ("dns:53:5353/UDP", ServicePort(53, "udp", 5353, "dns")),
    ("web:80:http/tcp", ServicePort(80, "tcp", "http", "web")),
])
def test_port_specs(text: str, want: ServicePort) -> None:
    assert spec.service_port(text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("", "expected"), ("0", "not a port number"), ("70000", "not a port number"),
    ("80/sctp", "protocol 'sctp'"), ("a:b:c:d", "expected"), ("80:", "expected"),
    ("Web:80", "port name"), ("80:Bad_Name", "neither a port number nor a port name"),
])
def test_bad_port_specs_name_the_field_and_value(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as err:
        spec.service_port(text)
    assert err.value.field == "port"
    assert str(err.value).count("\n") == 0


def test_several_ports_are_named_and_distinct() -> None:
    assert len(spec.service_ports(["http:80", "dns:53/udp", "dnst:53/tcp"])) == 3
    with pytest.raises(InvalidArgument, match="given twice"):
        spec.service_ports(["a:80", "b:80"])
    with pytest.raises(InvalidArgument, match="names each"):
        spec.service_ports(["80", "a:81"])
    with pytest.raises(InvalidArgument, match="at least one port"):
        spec.service_ports([])


def test_publish_specs() -> None:
    assert spec.publish("8080:80") == Publish(8080, 80)
    assert spec.publish("127.0.0.1:8080:80/udp") == Publish(8080, 80, "udp", IP("127.0.0.1"))
    assert spec.publish("[::1]:8080:80") == Publish(8080, 80, "tcp", IP("::1"))
    assert spec.publish("0.0.0.0:8080:80") == Publish(8080, 80)
    for bad in ("8080", "x:1:2", "1:2:3:4", "8080:80/icmp"):
        with pytest.raises(InvalidArgument) as err:
            spec.publish(bad)
        assert err.value.field == "publish"
    with pytest.raises(InvalidArgument, match="no port 81/tcp"):
        spec.check_publish((Publish(8080, 81),), (ServicePort(80),))


def test_selectors() -> None:
    assert spec.selector(["app=web", "tier=front"]) == {"app": "web", "tier": "front"}
    for bad in ("app", "=web", "app=we b", "-x=1"):
        with pytest.raises(InvalidArgument) as err:
            spec.selector([bad])
        assert err.value.field == "selector" and err.value.value == bad


def test_affinity() -> None:
    assert spec.affinity("client-ip", None) == ("client-ip", 10800)
    assert spec.affinity("client-ip", 60) == ("client-ip", 60)
    assert spec.affinity("", None) == ("none", 0)
    with pytest.raises(InvalidArgument, match="needs --affinity"):
        spec.affinity("", 5)
    with pytest.raises(InvalidArgument):
        spec.affinity("cookie", None)


def test_a_service_survives_its_json() -> None:
    svc = Service("shop", "web", "net", {"app": "web"}, (ServicePort(80, "tcp", "http", "h"),),
                  (IP("10.96.0.9"), IP("fd00:10:96::9")), False, "client-ip", 30,
                  (Publish(8080, 80, "tcp", IP("127.0.0.1")),), spec.Health(port=80))
    assert Service.from_json(svc.to_json()) == svc


# -- the service range -------------------------------------------------------------------------


def test_ranges_parse_one_per_family() -> None:
    assert vips.parse(["10.96.0.0/16,fd00:10:96::/112"]) == (
        ipaddress.ip_network("10.96.0.0/16"), ipaddress.ip_network("fd00:10:96::/112"))
    for bad in (["10.96.0.1/16"], ["10.0.0.0/4"], ["10.96.0.0/16", "10.97.0.0/16"], ["x"]):
        with pytest.raises(InvalidArgument) as err:
            vips.parse(bad)
        assert err.value.field == "service-cidr"


def test_the_default_range_avoids_routes_and_pools() -> None:
    avoid = [ipaddress.ip_network("10.96.5.0/24"), ipaddress.ip_network("fd00:10:96::/64")]
    assert [str(r) for r in vips.default(avoid)[0]] == ["10.97.0.0/16", "fd00:10:97::/112"]
    ranges, crowded = vips.default([ipaddress.ip_network("10.0.0.0/8")])
    assert [str(r) for r in ranges] == ["172.30.0.0/16", "fd00:10:96::/112"] and crowded == []
    everything = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("172.16.0.0/12")]
    ranges, crowded = vips.default(everything)
    assert crowded == [ipaddress.ip_network("10.96.0.0/16")] == list(ranges[:1])


def test_picking_skips_taken_and_reserved_addresses() -> None:
    net = ipaddress.ip_network("10.96.0.0/30")  # .1 and .2 usable
    assert vips.pick(net, {IP("10.96.0.1")}, random.Random(1)) == IP("10.96.0.2")
    assert vips.pick(net, {IP("10.96.0.1"), IP("10.96.0.2")}) is None
    vips.check([net], IP("10.96.0.1"))
    for bad in ("10.96.0.0", "10.96.0.3", "10.97.0.1", "fd00::1"):
        with pytest.raises(InvalidArgument) as err:
            vips.check([net], IP(bad))
        assert err.value.field == "ip"


# -- Kubernetes Services -------------------------------------------------------------------------

DOC = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, annotations: {plexus.io/network: front}}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
"""


def parse(text: str, networks: tuple[str, ...] = ("front", "back", "host")
          ) -> tuple[Service, tuple[Any, ...]]:
    doc = yaml.safe_load(text)
    return k8s.parse(doc["metadata"].get("namespace", "default"), doc["metadata"]["name"],
                     doc["metadata"], doc["spec"], networks)


def test_a_node_port_service() -> None:
    svc, ips = parse(DOC)
    assert ips == ()
    assert (svc.namespace, svc.name, svc.network, dict(svc.selector)) == (
        "shop", "web", "front", {"app": "web"})
    assert svc.ports == (ServicePort(80, "tcp", "http", "http"), ServicePort(53, "udp", 0, "dns"))
    assert svc.publish == (Publish(30080, 80), Publish(0, 53, "udp"))
    assert (svc.affinity, svc.affinity_seconds, svc.headless) == ("client-ip", 60, False)


def test_headless_cluster_ip_and_the_default_network() -> None:
    text = DOC.replace("type: NodePort", "clusterIP: None").replace(
        "annotations: {plexus.io/network: front}", "labels: {a: b}")
    svc, ips = parse(text, ("front", "host", "none"))
    assert svc.headless and ips == () and svc.network == "front" and svc.publish == ()
    text = DOC.replace("type: NodePort", "clusterIP: 10.96.0.10")
    assert parse(text)[1] == (IP("10.96.0.10"),)


@pytest.mark.parametrize(("change", "field"), [
    (("type: NodePort", "type: LoadBalancer"), "spec.type"),
    (("port: 80,", "port: 0,"), "spec.ports[0].port"),
    (("targetPort: http", "targetPort: Bad_Name"), "spec.ports[0].targetPort"),
    (("protocol: UDP", "protocol: SCTP"), "spec.ports[1].protocol"),
    (("nodePort: 30080", "nodePort: 80"), "spec.ports[0].nodePort"),
    (("timeoutSeconds: 60", "timeoutSeconds: 0"),
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
    (("plexus.io/network: front", "plexus.io/network: nope"),
     "metadata.annotations.plexus.io/network"),
    (("{app: web}", "{'a b': web}"), "spec.selector"),
    (("type: NodePort", "clusterIP: 10.96.0.300"), "spec.clusterIP"),
])
def test_bad_documents_name_the_field(change: tuple[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse(DOC.replace(*change))
    assert err.value.field == field


def test_several_networks_need_the_annotation() -> None:
    text = DOC.replace("annotations: {plexus.io/network: front}", "labels: {}")
    with pytest.raises(InvalidArgument, match="required: 2 networks exist"):
        parse(text)

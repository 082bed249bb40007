"""A cluster in realistic shapes for bench/policy.py: namespaces of apps with several replicas
sharing labels, and policy documents (NetworkPolicy and CiliumNetworkPolicy, parsed by the
project's own parser) selecting apps and allowing from other apps and namespaces on ports,
some by ipBlock. Pure: nothing here touches the kernel.

Shape, per namespace ``ns-III`` (labels ``team``, ``env``): ``apps`` apps ``app-JJ`` of
``replicas`` replicas each (labels ``app``, ``tier`` in web/api/db/cache; named ports ``http``
8080 and ``metrics`` 9090), and ``per_ns`` policies:
- most: ingress to one app from the next app on 8080, and from web-tier pods of the namespaces
  of one team on the named port ``http`` (every 4th a CiliumNetworkPolicy with an endPort range);
- one: ingress on 9090 from pods labelled ``role: monitoring`` in namespaces labelled
  ``purpose: monitoring`` (none exist at first: the endpoint added later is the first);
- one: egress of the api tier to its db tier on 5432, to DNS (any namespace, 53/udp) and to
  an ipBlock outside the cluster with an except (443).
Endpoint addresses are consecutive from 10.64.0.0, each on one of ``nodes`` hosts at random
(seeded: every run builds the same cluster); the bench's host is n0.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, replace
from typing import Any

from plexus.model.types import Endpoint, ExposedPort
from plexus.policy import documents
from plexus.policy.model import Policy

POD_BASE = ipaddress.IPv4Address("10.64.0.0")
TIERS = ("web", "api", "db", "cache")
TEAMS = 10
PORTS = (ExposedPort(8080, "tcp", "http"), ExposedPort(9090, "tcp", "metrics"))
MONITORING_NS = "monitoring"


@dataclass(frozen=True)
class Shape:
    endpoints: int
    policies: int
    replicas: int = 5
    apps: int = 20
    nodes: int = 1

    @property
    def namespaces(self) -> int:
        return max(1, self.endpoints // (self.apps * self.replicas))

    @property
    def per_ns(self) -> int:
        return max(1, self.policies // self.namespaces)


def ns_name(i: int) -> str:
    return f"ns-{i:03}"


def namespaces(shape: Shape) -> dict[str, dict[str, str]]:
    out = {ns_name(i): {"team": f"team-{i % TEAMS}", "env": "staging" if i % 3 == 0 else "prod"}
           for i in range(shape.namespaces)}
    out[MONITORING_NS] = {"purpose": "monitoring"}
    return out


def endpoint(k: int, ns: str, labels: dict[str, str], node: str) -> Endpoint:
    address = POD_BASE + k + 1
    return Endpoint(container_id=f"c{k:06}", ifname="eth0", network="pods", node=node,
                    netns="", namespace=ns, labels=labels,
                    addresses=(ipaddress.ip_interface(f"{address}/10"),), state="ready",
                    exposes=PORTS)


def endpoints(shape: Shape) -> list[Endpoint]:
    out: list[Endpoint] = []
    k = 0
    place = random.Random(10)  # replicas of one app land on different hosts, as a scheduler's
    for i in range(shape.namespaces):
        for j in range(shape.apps):
            for _ in range(shape.replicas):
                if k >= shape.endpoints:
                    return out
                labels = {"app": f"app-{j:02}", "tier": TIERS[j % len(TIERS)]}
                out.append(endpoint(k, ns_name(i), labels, f"n{place.randrange(shape.nodes)}"))
                k += 1
    return out


def monitoring_endpoint(k: int) -> Endpoint:
    """The endpoint added in the "one endpoint" change: a new identity that the monitoring
    policy of every namespace allows as a peer."""
    return endpoint(k, MONITORING_NS, {"app": "prometheus", "role": "monitoring"}, "n0")


def _netpol(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _app_policy(shape: Shape, i: int, j: int, port: int) -> dict[str, Any]:
    ns, app, peer = ns_name(i), f"app-{j % shape.apps:02}", f"app-{(j + 1) % shape.apps:02}"
    team = f"team-{(i + j) % TEAMS}"
    name = f"allow-{app}" if j < shape.apps else f"allow-{app}-{j // shape.apps}"
    if j % 4 == 3:
        return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                         "ingress": [{"fromEndpoints": [{"matchLabels": {"app": peer}}],
                                      "toPorts": [{"ports": [
                                          {"port": str(port), "endPort": port + 9,
                                           "protocol": "TCP"}]}]}]}}
    return _netpol(ns, name, {
        "podSelector": {"matchLabels": {"app": app}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
             "ports": [{"port": port, "protocol": "TCP"}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": team}},
                       "podSelector": {"matchLabels": {"tier": "web"}}}],
             "ports": [{"port": "http", "protocol": "TCP"}]}]})


def _monitoring_policy(i: int) -> dict[str, Any]:
    return _netpol(ns_name(i), "allow-metrics", {
        "podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"purpose": "monitoring"}},
                               "podSelector": {"matchLabels": {"role": "monitoring"}}}],
                     "ports": [{"port": 9090, "protocol": "TCP"}]}]})


def _egress_policy(i: int) -> dict[str, Any]:
    block = f"172.{16 + i // 256 % 16}.{i % 256}.0/24"
    excepted = f"172.{16 + i // 256 % 16}.{i % 256}.128/25"
    return _netpol(ns_name(i), "api-egress", {
        "podSelector": {"matchLabels": {"tier": "api"}},
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}],
             "ports": [{"port": 5432, "protocol": "TCP"}]},
            {"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]},
            {"to": [{"ipBlock": {"cidr": block, "except": [excepted]}}],
             "ports": [{"port": 443, "protocol": "TCP"}]}]})


def documents_of(shape: Shape) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i in range(shape.namespaces):
        for j in range(shape.per_ns):
            if len(docs) >= shape.policies:
                return docs
            if j == 0:
                docs.append(_monitoring_policy(i))
            elif j == 1:
                docs.append(_egress_policy(i))
            else:
                docs.append(_app_policy(shape, i, j - 2, 8080))
    return docs


def policies(shape: Shape) -> list[Policy]:
    return [documents.parse(d) for d in documents_of(shape)]


def changed_policy(p: Policy) -> Policy:
    """The "one policy changed" change: the first ingress rule moves to another port."""
    doc = dict(p.document)
    spec = dict(doc["spec"])
    rules = [dict(r) for r in spec["ingress"]]
    if "toPorts" in rules[0]:
        rules[0]["toPorts"] = [{"ports": [{"port": "7070", "protocol": "TCP"}]}]
    else:
        rules[0]["ports"] = [{"port": 7070, "protocol": "TCP"}]
    spec["ingress"] = rules
    doc["spec"] = spec
    return documents.parse(doc)


def relabelled(ep: Endpoint, **labels: str) -> Endpoint:
    return replace(ep, labels={**ep.labels, **labels})

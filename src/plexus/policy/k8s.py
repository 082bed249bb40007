"""``networking.k8s.io/v1`` NetworkPolicy to the policy model, with the API server's defaulting
and validation (the documents never pass through an API server): ``policyTypes`` defaults to
Ingress, plus Egress iff there are egress rules; a section of a type not listed is ignored; a
podSelector alone selects in the policy's namespace; a peer with no fields is refused."""

from __future__ import annotations

from typing import Any

from plexus.errors import InvalidArgument
from plexus.policy import fields, selectors
from plexus.policy.model import (
    Action,
    CidrPeer,
    Direction,
    EndpointSelector,
    Peer,
    Policy,
    Rule,
    Tier,
)

KIND = "NetworkPolicy"
API_VERSION = "networking.k8s.io/v1"
_PEER_FIELDS = {"podSelector", "namespaceSelector", "ipBlock"}


def parse(namespace: str, name: str, spec: dict[str, Any], audit: bool) -> Policy:
    fields.known_fields("spec", spec, {"podSelector", "policyTypes", "ingress", "egress"})
    if "podSelector" not in spec:
        raise InvalidArgument("spec.podSelector", None, "required ({} selects every pod)")
    subject = EndpointSelector(selectors.parse("spec.podSelector", spec["podSelector"]),
                               namespace=namespace)
    types = _policy_types(spec)
    ingress = _rules(spec, "ingress", "from", namespace) if Direction.INGRESS in types else ()
    egress = _rules(spec, "egress", "to", namespace) if Direction.EGRESS in types else ()
    return Policy(KIND, namespace, name, Tier.NAMESPACED, subject, ingress, egress,
                  isolates=types, audit=audit)


def _policy_types(spec: dict[str, Any]) -> frozenset[Direction]:
    raw = spec.get("policyTypes")
    if not raw:
        egress = bool(spec.get("egress"))
        return frozenset({Direction.INGRESS} | ({Direction.EGRESS} if egress else set()))
    if not isinstance(raw, list):
        raise InvalidArgument("spec.policyTypes", raw, "a list of Ingress and Egress")
    out = set()
    for i, t in enumerate(raw):
        if t not in ("Ingress", "Egress"):
            raise InvalidArgument(f"spec.policyTypes[{i}]", t, "Ingress or Egress")
        out.add(Direction(t.lower()))
    return frozenset(out)


def _rules(spec: dict[str, Any], section: str, peers_key: str,
           namespace: str) -> tuple[Rule, ...]:
    raw = spec.get(section) or []
    if not isinstance(raw, list):
        raise InvalidArgument(f"spec.{section}", raw, "a list of rules")
    rules = []
    for i, r in enumerate(raw):
        field = f"spec.{section}[{i}]"
        if not isinstance(r, dict):
            raise InvalidArgument(field, r, "a rule is a mapping")
        peer_list = fields.listof(f"{field}.{peers_key}", r.get(peers_key))
        peers = tuple(_peer(f"{field}.{peers_key}[{j}]", p, namespace)
                      for j, p in enumerate(peer_list))
        port_list = fields.listof(f"{field}.ports", r.get("ports"))
        entries = tuple(fields.k8s_port(f"{field}.ports[{j}]", p) for j, p in enumerate(port_list))
        rules.append(Rule(Action.ALLOW, f"{section}[{i}]", peers, entries))
    return tuple(rules)



def _peer(field: str, raw: Any, namespace: str) -> Peer:
    if not isinstance(raw, dict) or not raw:
        raise InvalidArgument(field, raw, "a peer needs podSelector, namespaceSelector or ipBlock")
    unknown = set(raw) - _PEER_FIELDS
    if unknown:
        key = sorted(unknown)[0]
        raise InvalidArgument(f"{field}.{key}", raw[key], "unknown field of a peer")
    if "ipBlock" in raw:
        if len(raw) > 1:
            raise InvalidArgument(field, raw, "ipBlock cannot be combined with selectors")
        return _ip_block(f"{field}.ipBlock", raw["ipBlock"])
    pods = selectors.parse(f"{field}.podSelector", raw.get("podSelector"))
    if "namespaceSelector" in raw:
        nss = selectors.parse(f"{field}.namespaceSelector", raw["namespaceSelector"])
        return EndpointSelector(pods, nss)
    return EndpointSelector(pods, namespace=namespace)


def _ip_block(field: str, raw: Any) -> CidrPeer:
    return fields.cidr_block(field, raw, endpoints=True)

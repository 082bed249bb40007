"""The cluster-wide tiers of ``policy.networking.k8s.io/v1alpha1`` (the network-policy-api
project) to the policy model: AdminNetworkPolicy, evaluated before namespaced policies by
``priority`` (0 to 1000, lower first), its rules in order, the first match deciding with Allow,
Deny or Pass (on to the namespaced tier); BaselineAdminNetworkPolicy (one, named ``default``),
evaluated after them for traffic they did not decide, with Allow or Deny.

Subjects and peers select namespaces (``namespaces``) or pods (``pods``: a namespaceSelector
and a podSelector); egress peers may also be ``networks`` (CIDRs, matching every address they
cover, endpoints included). ``nodes`` peers are refused: plexus hosts carry no labels yet.
"""

from __future__ import annotations

from typing import Any

from plexus.errors import InvalidArgument
from plexus.policy import fields, selectors
from plexus.policy.model import (
    Action,
    CidrPeer,
    EndpointSelector,
    Peer,
    Policy,
    PortMatch,
    Rule,
    Tier,
)
from plexus.policy.selectors import EVERYTHING

API_VERSION = "policy.networking.k8s.io/v1alpha1"
ADMIN, BASELINE = "AdminNetworkPolicy", "BaselineAdminNetworkPolicy"
MAX_PRIORITY = 1000
MAX_RULES = 100


def parse(kind: str, name: str, spec: dict[str, Any], audit: bool) -> Policy:
    baseline = kind == BASELINE
    fields.known_fields("spec", spec, {"subject", "ingress", "egress"}
                        | (set() if baseline else {"priority"}))
    if baseline and name != "default":
        raise InvalidArgument("metadata.name", name,
                              "a BaselineAdminNetworkPolicy is named default")
    priority = 0 if baseline else _priority(spec.get("priority"))
    actions = ("Allow", "Deny") if baseline else ("Allow", "Deny", "Pass")
    subject = _subject(spec.get("subject"))
    ingress = _rules(spec, "ingress", "from", actions)
    egress = _rules(spec, "egress", "to", actions)
    return Policy(kind, "", name, Tier.BASELINE if baseline else Tier.ADMIN, subject,
                  ingress, egress, priority=priority, audit=audit)


def _priority(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_PRIORITY:
        raise InvalidArgument("spec.priority", raw, f"required, 0 to {MAX_PRIORITY}")
    return raw


def _subject(raw: Any) -> EndpointSelector:
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in ("namespaces", "pods"):
        raise InvalidArgument("spec.subject", raw, "exactly one of namespaces or pods")
    return _selects("spec.subject", raw)


def _selects(field: str, raw: dict[str, Any]) -> EndpointSelector:
    if "namespaces" in raw:
        namespaces = selectors.parse(f"{field}.namespaces", raw["namespaces"])
        return EndpointSelector(EVERYTHING, namespaces)
    pods = raw["pods"]
    if not isinstance(pods, dict) or "podSelector" not in pods:
        raise InvalidArgument(f"{field}.pods.podSelector", None, "required")
    return EndpointSelector(
        selectors.parse(f"{field}.pods.podSelector", pods["podSelector"]),
        selectors.parse(f"{field}.pods.namespaceSelector", pods.get("namespaceSelector") or {}))


def _rules(spec: dict[str, Any], section: str, peers_key: str,
           actions: tuple[str, ...]) -> tuple[Rule, ...]:
    raw = fields.listof(f"spec.{section}", spec.get(section))
    if len(raw) > MAX_RULES:
        raise InvalidArgument(f"spec.{section}", f"{len(raw)} rules", f"at most {MAX_RULES}")
    return tuple(_rule(f"spec.{section}[{i}]", r, peers_key, actions) for i, r in enumerate(raw))


def _rule(field: str, raw: Any, peers_key: str, actions: tuple[str, ...]) -> Rule:
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "a rule is a mapping (name, action, peers, ports)")
    action = raw.get("action")
    if action not in actions:
        raise InvalidArgument(f"{field}.action", action, f"one of {', '.join(actions)}")
    peer_list = fields.listof(f"{field}.{peers_key}", raw.get(peers_key))
    if not peer_list:
        raise InvalidArgument(f"{field}.{peers_key}", raw.get(peers_key), "at least one peer")
    peers = tuple(_peer(f"{field}.{peers_key}[{i}]", p) for i, p in enumerate(peer_list))
    port_list = fields.listof(f"{field}.ports", raw.get("ports"))
    ports = tuple(_port(f"{field}.ports[{i}]", p) for i, p in enumerate(port_list))
    name = raw.get("name") or field.removeprefix("spec.")
    return Rule(Action(action.lower()), str(name), peers, ports)


def _peer(field: str, raw: Any) -> Peer:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise InvalidArgument(field, raw, "exactly one of namespaces, pods or networks")
    key = next(iter(raw))
    if key in ("namespaces", "pods"):
        return _selects(field, raw)
    if key == "networks" and field.split(".")[1].startswith("egress"):
        cidrs = fields.listof(f"{field}.networks", raw["networks"])
        if len(cidrs) != 1:  # one peer per CIDR keeps a rule's peers a flat union
            raise InvalidArgument(f"{field}.networks", cidrs, "one CIDR per peer entry here")
        return CidrPeer(fields.cidr(f"{field}.networks[0]", cidrs[0]), endpoints=True)
    if key == "nodes":
        raise InvalidArgument(f"{field}.nodes", raw[key], "node peers are not supported yet")
    raise InvalidArgument(f"{field}.{key}", raw[key], "unknown peer")


def _port(field: str, raw: Any) -> PortMatch:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise InvalidArgument(field, raw, "exactly one of portNumber, namedPort or portRange")
    key, value = next(iter(raw.items()))
    if key == "namedPort":
        return PortMatch("tcp", name=fields.port_name(f"{field}.namedPort", str(value)))
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}.{key}", value, "a mapping")
    proto = fields.protocol(f"{field}.{key}.protocol", value.get("protocol"))
    if key == "portNumber":
        return PortMatch(proto, fields.number(f"{field}.portNumber.port", value.get("port")))
    if key == "portRange":
        start = fields.number(f"{field}.portRange.start", value.get("start"))
        end = fields.number(f"{field}.portRange.end", value.get("end"))
        if end <= start:
            raise InvalidArgument(f"{field}.portRange.end", end, f"above start {start}")
        return PortMatch(proto, start, end)
    raise InvalidArgument(f"{field}.{key}", value, "unknown port entry")

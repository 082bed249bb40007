"""``cilium.io/v2`` CiliumNetworkPolicy, its L3/L4 part, to the policy model.

Cilium's meanings kept here: a rule with no L3 peer but ``toPorts`` allows those ports from
everyone, while an empty rule (``- {}``) allows nothing (Cilium's way of writing default deny);
a policy isolates every direction it has rules for (allow or deny) unless ``enableDefaultDeny``
says otherwise; deny rules win over every allow. Endpoint selectors of a namespaced policy
select in its namespace unless they name one: the pseudo-label
``io.kubernetes.pod.namespace`` becomes a selector on the namespace's
``kubernetes.io/metadata.name``, and ``io.cilium.k8s.namespace.labels.KEY`` one on its labels.
CIDR peers select only what lies outside the cluster, as in Cilium. L7 ``rules``, FQDN and
service peers are refused with a clear message: plexus enforces L3/L4 only.
"""

from __future__ import annotations

from typing import Any

from plexus.errors import InvalidArgument
from plexus.policy import fields, selectors
from plexus.policy.model import (
    NS_NAME_LABEL,
    Action,
    CidrPeer,
    Direction,
    EndpointSelector,
    Entity,
    EntityPeer,
    Peer,
    Policy,
    PortMatch,
    Rule,
    Tier,
)
from plexus.policy.selectors import LabelSelector, Requirement

KIND = "CiliumNetworkPolicy"
API_VERSION = "cilium.io/v2"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."
_SOURCES = ("k8s:", "any:")
_UNSUPPORTED = {"toFQDNs": "FQDN rules", "toServices": "service peers",
                "toRequires": "toRequires", "fromRequires": "fromRequires",
                "toGroups": "cloud groups", "icmps": "ICMP rules", "authentication": "mutual auth",
                "fromNodes": "node peers", "toNodes": "node peers"}
_SECTIONS = (("ingress", Direction.INGRESS, Action.ALLOW, "from"),
             ("ingressDeny", Direction.INGRESS, Action.DENY, "from"),
             ("egress", Direction.EGRESS, Action.ALLOW, "to"),
             ("egressDeny", Direction.EGRESS, Action.DENY, "to"))


def parse(namespace: str, name: str, spec: dict[str, Any], audit: bool) -> Policy:
    fields.known_fields("spec", spec, {"endpointSelector", "nodeSelector", "ingress",
                                       "ingressDeny", "egress", "egressDeny",
                                       "enableDefaultDeny", "description", "labels"})
    if "nodeSelector" in spec:
        raise InvalidArgument("spec.nodeSelector", spec["nodeSelector"],
                              "host policies are not supported; use endpointSelector")
    if "endpointSelector" not in spec:
        raise InvalidArgument("spec.endpointSelector", None, "required ({} selects every pod)")
    subject = endpoint_selector("spec.endpointSelector", spec["endpointSelector"], namespace)
    rules: dict[Direction, list[Rule]] = {Direction.INGRESS: [], Direction.EGRESS: []}
    has: set[Direction] = set()
    for section, direction, action, prefix in _SECTIONS:
        raw = spec.get(section)
        if raw is None:
            continue
        if not isinstance(raw, list):
            raise InvalidArgument(f"spec.{section}", raw, "a list of rules")
        has.add(direction)
        for i, r in enumerate(raw):
            rule = _rule(f"spec.{section}[{i}]", r, action, prefix, namespace)
            if rule is not None:
                rules[direction].append(rule)
    isolates = _default_deny(spec.get("enableDefaultDeny"), has)
    return Policy(KIND, namespace, name, Tier.NAMESPACED, subject,
                  tuple(rules[Direction.INGRESS]), tuple(rules[Direction.EGRESS]),
                  isolates=isolates, audit=audit)


def _default_deny(raw: Any, has: set[Direction]) -> frozenset[Direction]:
    if raw is None:
        return frozenset(has)
    if not isinstance(raw, dict):
        raise InvalidArgument("spec.enableDefaultDeny", raw, "a mapping (ingress, egress)")
    out = set()
    for d in Direction:
        value = raw.get(d.value, d in has)
        if not isinstance(value, bool):
            raise InvalidArgument(f"spec.enableDefaultDeny.{d.value}", value, "true or false")
        if value:
            out.add(d)
    return frozenset(out)


def _rule(field: str, raw: Any, action: Action, prefix: str, namespace: str) -> Rule | None:
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "a rule is a mapping")
    for key in raw:
        bare = key.replace("from", "to")
        if bare in _UNSUPPORTED or key in _UNSUPPORTED:
            what = _UNSUPPORTED.get(bare) or _UNSUPPORTED[key]
            raise InvalidArgument(f"{field}.{key}", raw[key], f"{what} are not supported")
        if not key.startswith(prefix) and key != "toPorts":
            raise InvalidArgument(f"{field}.{key}", raw[key], "unknown field of a rule")
    peers = _peers(field, raw, prefix, namespace)
    port_list = _to_ports(f"{field}.toPorts", raw.get("toPorts"))
    if not peers and not port_list:
        return None  # Cilium's "- {}": selects the endpoint, allows nothing
    return Rule(action, field.removeprefix("spec."), peers, port_list)


def _peers(field: str, raw: dict[str, Any], prefix: str, namespace: str) -> tuple[Peer, ...]:
    out: list[Peer] = []
    for suffix in ("Endpoints", "CIDR", "CIDRSet", "Entities"):
        key = f"{prefix}{suffix}"
        for i, item in enumerate(fields.listof(f"{field}.{key}", raw.get(key))):
            out.append(_peer(f"{field}.{key}[{i}]", suffix, item, namespace))
    return tuple(out)


def _peer(field: str, suffix: str, raw: Any, namespace: str) -> Peer:
    if suffix == "Endpoints":
        return endpoint_selector(field, raw, namespace)
    if suffix == "CIDR":
        return CidrPeer(fields.cidr(field, raw), endpoints=False)
    if suffix == "CIDRSet":
        return _cidr_set(field, raw)
    return _entity(field, raw)


def _cidr_set(field: str, raw: Any) -> CidrPeer:
    return fields.cidr_block(field, raw, endpoints=False,
                             missing="required (cidrGroupRef is not supported)")


def _entity(field: str, raw: Any) -> EntityPeer:
    try:
        return EntityPeer(Entity(raw))
    except ValueError:
        names = ", ".join(e.value for e in Entity)
        raise InvalidArgument(field, raw, f"an entity plexus knows: {names}") from None


def _to_ports(field: str, raw: Any) -> tuple[PortMatch, ...]:
    out: list[PortMatch] = []
    for i, entry in enumerate(fields.listof(field, raw)):
        here = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(here, entry, "a toPorts entry is a mapping (ports, rules)")
        if entry.get("rules"):
            raise InvalidArgument(f"{here}.rules", "...", "L7 rules are not supported yet: "
                                  "plexus enforces L3/L4 (drop the rules block)")
        for j, p in enumerate(fields.listof(f"{here}.ports", entry.get("ports"))):
            out.append(_port(f"{here}.ports[{j}]", p))
    return tuple(out)


def _port(field: str, raw: Any) -> PortMatch:
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "a port is a mapping (port, endPort, protocol)")
    proto = fields.protocol(f"{field}.protocol", raw.get("protocol"), "ANY", allow_any=True)
    port, end = raw.get("port"), raw.get("endPort")
    # Cilium writes "every port" as no port or "0", and no range as no endPort or 0.
    every = port is None or str(port) == "0"
    return fields.port_match(field, proto, None if every else port, end or None)


def endpoint_selector(field: str, raw: Any, namespace: str) -> EndpointSelector:
    """A Cilium endpoint selector, its namespace pseudo-labels turned into a selector on the
    namespace (and a selector that names none kept to ``namespace``)."""
    sel = selectors.parse(field, raw, _SOURCES)
    pod_labels: list[tuple[str, str]] = []
    ns_labels: list[tuple[str, str]] = []
    pod_reqs: list[Requirement] = []
    ns_reqs: list[Requirement] = []
    for key, value in sel.labels:
        target, bare = _split(key)
        (ns_labels if target else pod_labels).append((bare, value))
    for req in sel.requirements:
        target, bare = _split(req.key)
        (ns_reqs if target else pod_reqs).append(Requirement(bare, req.operator, req.values))
    pods = LabelSelector(tuple(sorted(pod_labels)), tuple(pod_reqs))
    if not ns_labels and not ns_reqs:
        return EndpointSelector(pods, namespace=namespace)
    return EndpointSelector(pods, LabelSelector(tuple(sorted(ns_labels)), tuple(ns_reqs)))


def _split(key: str) -> tuple[bool, str]:
    """(whether the key is about the namespace, the key on the namespace's or pod's labels)."""
    for source in _SOURCES:
        key = key.removeprefix(source)
    if key == POD_NAMESPACE:
        return True, NS_NAME_LABEL
    if key.startswith(NAMESPACE_LABELS):
        return True, key[len(NAMESPACE_LABELS):]
    return False, key


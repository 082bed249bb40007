"""The policy model's meaning, as truth tables over the upstream suites' model: namespaces x, y, z
(labelled ns=NAME), pods a, b, c in each (labelled pod=NAME, serving 80 and 81 on TCP and UDP
with ports named serve-PORT-PROTO). Each case writes its expectation by hand, as the upstream e2e
suite does: "everything allowed" with the pairs it changes listed; loopback is never checked."""

from __future__ import annotations

import ipaddress
import textwrap
from collections.abc import Callable, Iterable

import pytest

from plexus.policy import documents
from plexus.policy.evaluate import Evaluator, Flow, Party, Workload
from plexus.policy.model import Action

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
OUTSIDE = ipaddress.ip_address("192.0.2.9")
HOST = ipaddress.ip_address("10.9.0.1")


def _address(ns: str, pod: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.0.{NAMESPACES.index(ns) + 1}.{PODS.index(pod) + 10}")


def _party(name: str) -> Party:
    if name == "outside":
        return Party(OUTSIDE)
    if name == "host":
        return Party(HOST, host=True, local_host=True)
    ns, pod = name.split("/")
    ports = {(f"serve-{p}-{proto}", proto): p for p in (80, 81) for proto in ("tcp", "udp")}
    return Party(_address(ns, pod), Workload(pod, ns, {"pod": pod}, ports))


ALL = [f"{ns}/{pod}" for ns in NAMESPACES for pod in PODS]
Expect = Callable[[str, str, int, str], bool]


def _check(yaml_text: str, expect: Expect, ports: Iterable[int] = (80, 81),
           protocols: Iterable[str] = ("tcp", "udp"), peers: list[str] | None = None) -> None:
    policies = documents.load(textwrap.dedent(yaml_text))
    ev = Evaluator(policies, {ns: {"ns": ns} for ns in NAMESPACES})
    names = peers or ALL
    wrong = []
    for src in names:
        for dst in names:
            if src == dst:
                continue
            for port in ports:
                for proto in protocols:
                    got = ev.verdict(Flow(_party(src), _party(dst), proto, port)).allowed
                    if got != expect(src, dst, port, proto):
                        wrong.append(f"{src} -> {dst} {port}/{proto}: got {got}")
    assert not wrong, "\n".join(wrong)


def test_no_policy_allows_everything() -> None:
    _check("", lambda s, d, p, pr: True)


def test_deny_all_ingress_isolates_only_its_namespace() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {}}
        """, lambda s, d, p, pr: not d.startswith("x/"))


def test_pod_selector_alone_selects_in_the_policys_namespace() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        """, lambda s, d, p, pr: d != "x/a" or s == "x/b")


def test_namespace_selector_with_not_in_matches_namespaces_lacking_the_value() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: not-y, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector:
                matchExpressions: [{key: ns, operator: NotIn, values: ["y"]}]
        """, lambda s, d, p, pr: d != "x/a" or not s.startswith("y/"))


def test_pod_and_namespace_selector_in_one_peer_are_anded() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: y-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
              podSelector: {matchLabels: {pod: b}}
        """, lambda s, d, p, pr: d != "x/a" or s == "y/b")


def test_separate_peers_are_ored_and_ports_apply_to_every_peer_of_the_rule() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: two-peers, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {ns: y}}
            - podSelector: {matchLabels: {pod: c}}
            ports: [{port: 81}]
        """, lambda s, d, p, pr: d != "x/a" or (
            p == 81 and pr == "tcp" and (s.startswith("y/") or s == "x/c")))


def test_named_port_resolves_on_the_destination_with_its_protocol() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: named, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{ports: [{port: serve-80-udp, protocol: UDP}, {port: serve-81-udp}]}]
        """, lambda s, d, p, pr: d != "x/a" or (p, pr) == (80, "udp"))


def test_end_port_is_an_inclusive_range() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: range, namespace: x}
        spec:
          podSelector: {}
          ingress: [{ports: [{port: 79, endPort: 80, protocol: UDP}]}]
        """, lambda s, d, p, pr: not d.startswith("x/") or (p, pr) == (80, "udp"))


def test_egress_rules_without_policy_types_isolate_both_ways() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-to-y, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        """, lambda s, d, p, pr: d != "x/a" and (s != "x/a" or d.startswith("y/")))


def test_ip_block_except_removes_only_from_that_block_and_matches_endpoints() -> None:
    yb = _address("y", "b")
    _check(f"""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: cidr, namespace: x}}
        spec:
          podSelector: {{matchLabels: {{pod: a}}}}
          policyTypes: [Egress]
          egress:
          - to: [{{ipBlock: {{cidr: 10.0.0.0/16, except: ["{yb}/32", "10.0.3.0/24"]}}}}]
          - to: [{{podSelector: {{}}, namespaceSelector: {{matchLabels: {{ns: z}}}}}}]
            ports: [{{port: 80}}]
        """, lambda s, d, p, pr: s != "x/a" or (d != "y/b" and not d.startswith("z/"))
        or (d.startswith("z/") and (p, pr) == (80, "tcp")))


def test_policies_add_up_and_a_policy_for_another_direction_does_not_isolate() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: from-c, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-only, namespace: y}
        spec:
          podSelector: {}
          policyTypes: [Egress]
          egress: [{}]
        """, lambda s, d, p, pr: d != "x/a" or s in ("x/b", "x/c"))


def test_cilium_deny_wins_over_allows_and_an_empty_rule_allows_nothing() -> None:
    _check("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-b-80, namespace: x}
        spec:
          endpointSelector: {matchLabels: {pod: a}}
          ingress: [{fromEntities: [cluster]}]
          ingressDeny:
          - fromEndpoints: [{matchLabels: {pod: b, k8s:io.kubernetes.pod.namespace: y}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: default-deny, namespace: z}
        spec:
          endpointSelector: {matchLabels: {pod: c}}
          ingress: [{}]
        """, lambda s, d, p, pr: d != "z/c" and not (d == "x/a" and s == "y/b"
                                                      and (p, pr) == (80, "tcp")))


def test_cilium_ports_without_peers_allow_everyone_and_cidrs_skip_endpoints() -> None:
    policy = """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web, namespace: x}
        spec:
          endpointSelector: {}
          ingress:
          - toPorts: [{ports: [{port: "81"}]}]
          - fromCIDR: [10.0.0.0/8, 192.0.2.0/24]
        """
    _check(policy, lambda s, d, p, pr: not d.startswith("x/") or p == 81 or s == "outside",
           peers=[*ALL, "outside"])


def test_admin_tiers_decide_before_and_after_namespaced_policies() -> None:
    _check("""
        apiVersion: policy.networking.k8s.io/v1alpha1
        kind: AdminNetworkPolicy
        metadata: {name: z-first}
        spec:
          priority: 10
          subject: {namespaces: {matchLabels: {ns: x}}}
          ingress:
          - {name: pass-y, action: Pass, from: [{namespaces: {matchLabels: {ns: y}}}]}
          - {name: allow-z, action: Allow, from: [{namespaces: {matchLabels: {ns: z}}}]}
          - name: deny-rest
            action: Deny
            from: [{namespaces: {}}]
            ports: [{portNumber: {protocol: TCP, port: 81}}]
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {matchLabels: {pod: a}}}
        ---
        apiVersion: policy.networking.k8s.io/v1alpha1
        kind: BaselineAdminNetworkPolicy
        metadata: {name: default}
        spec:
          subject: {namespaces: {}}
          ingress: [{name: no-y, action: Deny, from: [{namespaces: {matchLabels: {ns: y}}}]}]
        """, lambda s, d, p, pr: _tiers(s, d, p, pr))


def _tiers(s: str, d: str, p: int, pr: str) -> bool:
    if d.startswith("x/") and s.startswith("z/"):
        return True  # admin Allow, whatever the namespaced deny-all says
    if d.startswith("x/") and not s.startswith("y/") and (p, pr) == (81, "tcp"):
        return False  # admin Deny
    if d == "x/a":
        return False  # Pass (from y) or no admin match, then the namespaced deny-all
    return not s.startswith("y/")  # baseline Deny for what nothing else decided


def test_audit_policies_drop_nothing_and_say_what_they_would_have_dropped() -> None:
    policies = documents.load(textwrap.dedent("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: deny-all
          namespace: x
          annotations: {plexus.io/audit: "true"}
        spec: {podSelector: {}}
        """))
    ev = Evaluator(policies, {})
    verdict = ev.verdict(Flow(_party("y/a"), _party("x/b"), "tcp", 80))
    assert verdict.allowed
    assert [(s.policy, s.effect, s.audit) for s in verdict.audit_drops] == [
        ("NetworkPolicy x/deny-all", Action.DENY, True)]


def test_the_hosts_own_traffic_to_its_endpoints_is_always_allowed() -> None:
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
        """, lambda s, d, p, pr: s == "host" or not (s.startswith("x/") or d.startswith("x/")),
        peers=[*ALL, "host"])


@pytest.mark.parametrize("port", [80, 81])
def test_explain_names_the_rule_that_allowed(port: int) -> None:
    policies = documents.load(textwrap.dedent("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: web, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{ports: [{port: 80}]}]
        """))
    verdict = Evaluator(policies, {}).verdict(Flow(_party("x/b"), _party("x/a"), "tcp", port))
    assert verdict.allowed == (port == 80)
    assert [(s.policy, s.rule) for s in verdict.steps] == [
        ("NetworkPolicy x/web", "ingress[0]" if port == 80 else "isolated, no rule allows")]

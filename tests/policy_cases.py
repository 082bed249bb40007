"""Policy truth tables shared by the unit tests (evaluator and compiled form, no kernel) and
the integration tests (real traffic): the upstream suites' model, namespaces x, y, z (labelled
ns=NAME) with pods a, b, c (labelled pod=NAME) serving 80 and 81 on TCP and UDP, their ports
named serve-PORT-PROTO. Each case's expectation is written by hand, as the upstream e2e suite
writes it: "everything allowed" with what the policy changes; loopback is never checked.

Addresses that depend on the world (``$subnet``: one block holding every pod; ``$yb`` and so on:
one pod's address; ``$outside``: a block holding the outside's address) are filled in by the
caller (``Case.text``).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from string import Template

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL = [f"{ns}/{pod}" for ns in NAMESPACES for pod in PODS]
Expect = Callable[[str, str, int, str], bool]


@dataclass(frozen=True)
class Case:
    name: str
    yaml: str
    expect: Expect
    outside: bool = False  # the outside is a peer too

    def text(self, addresses: Mapping[str, str]) -> str:
        return Template(textwrap.dedent(self.yaml)).substitute(addresses)


def _tiers(s: str, d: str, p: int, pr: str) -> bool:
    if d.startswith("x/") and s.startswith("z/"):
        return True  # admin Allow, whatever the namespaced deny-all says
    if d.startswith("x/") and not s.startswith("y/") and (p, pr) == (81, "tcp"):
        return False  # admin Deny
    if d == "x/a":
        return False  # Pass (from y) or no admin match, then the namespaced deny-all
    return not s.startswith("y/")  # baseline Deny for what nothing else decided


CASES = [
    # deny all ingress isolates only its namespace
    Case("deny_all_ingress", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: deny-all, namespace: x}
        spec: {podSelector: {}}
        """,
         lambda s, d, p, pr: not d.startswith("x/")),
    # pod selector alone selects in the policys namespace
    Case("pod_selector", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: allow-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
        """,
         lambda s, d, p, pr: d != "x/a" or s == "x/b"),
    # namespace selector with not in matches namespaces lacking the value
    Case("namespace_not_in", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: not-y, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector:
                matchExpressions: [{key: ns, operator: NotIn, values: ["y"]}]
        """,
         lambda s, d, p, pr: d != "x/a" or not s.startswith("y/")),
    # pod and namespace selector in one peer are anded
    Case("selectors_anded", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: y-b, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
              podSelector: {matchLabels: {pod: b}}
        """,
         lambda s, d, p, pr: d != "x/a" or s == "y/b"),
    # separate peers are ored and ports apply to every peer of the rule
    Case("peers_ored", """
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
        """,
         lambda s, d, p, pr: d != "x/a"
         or (p == 81 and pr == "tcp" and (s.startswith("y/") or s == "x/c"))),
    # named port resolves on the destination with its protocol
    Case("named_port", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: named, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{ports: [{port: serve-80-udp, protocol: UDP}, {port: serve-81-udp}]}]
        """,
         lambda s, d, p, pr: d != "x/a" or (p, pr) == (80, "udp")),
    # end port is an inclusive range
    Case("end_port", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: range, namespace: x}
        spec:
          podSelector: {}
          ingress: [{ports: [{port: 79, endPort: 80, protocol: UDP}]}]
        """,
         lambda s, d, p, pr: not d.startswith("x/") or (p, pr) == (80, "udp")),
    # egress rules without policy types isolate both ways
    Case("egress_default_types", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: egress-to-y, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]
        """,
         lambda s, d, p, pr: d != "x/a" and (s != "x/a" or d.startswith("y/"))),
    # policies add up and a policy for another direction does not isolate
    Case("policies_add_up", """
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
        """,
         lambda s, d, p, pr: d != "x/a" or s in ("x/b", "x/c")),
    # cilium deny wins over allows and an empty rule allows nothing
    Case("cilium_deny", """
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
        """,
         lambda s, d, p, pr: d != "z/c"
         and not (d == "x/a" and s == "y/b" and (p, pr) == (80, "tcp"))),
    # admin tiers decide before and after namespaced policies
    Case("admin_tiers", """
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
        """,
         lambda s, d, p, pr: _tiers(s, d, p, pr)),
    # ip block except removes only from that block and matches endpoints
    Case("ip_block_except", """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: cidr, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          policyTypes: [Egress]
          egress:
          - to: [{ipBlock: {cidr: $subnet, except: [$yb/32, $za/32, $zb/32, $zc/32]}}]
          - to: [{podSelector: {}, namespaceSelector: {matchLabels: {ns: z}}}]
            ports: [{port: 80}]
        """, lambda s, d, p, pr: s != "x/a" or (d != "y/b" and not d.startswith("z/"))
         or (d.startswith("z/") and (p, pr) == (80, "tcp"))),
    # cilium ports without peers allow everyone, and CIDRs skip endpoints
    Case("cilium_ports_and_cidrs", """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: web, namespace: x}
        spec:
          endpointSelector: {}
          ingress:
          - toPorts: [{ports: [{port: "81"}]}]
          - fromCIDR: [$subnet, $outside]
        """, lambda s, d, p, pr: not d.startswith("x/") or p == 81 or s == "outside",
         outside=True),
]
BY_NAME = {c.name: c for c in CASES}

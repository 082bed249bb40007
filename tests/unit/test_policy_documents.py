"""Policy files: every kind parses to the model, and bad input is one line naming the document,
the field and the value, with nothing of the file accepted."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from plexus.errors import InvalidArgument
from plexus.policy import documents
from plexus.policy.model import Action, CidrPeer, Direction, EndpointSelector, PortMatch, Tier

GOOD = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: ok, namespace: x}
spec: {podSelector: {}}
"""


def _np(spec: str, name: str = "bad") -> str:
    return GOOD + textwrap.dedent(f"""\
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: {name}, namespace: x}}
        spec:
        """) + textwrap.indent(textwrap.dedent(spec), "  ")


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("NetworkPolicy", "NetPol"), "invalid kind 'NetPol'"),
    (GOOD.replace("networking.k8s.io/v1", "networking.k8s.io/v2"),
     "invalid apiVersion 'networking.k8s.io/v2'"),
    (_np("podSelector: {matchExpressions: [{key: a, operator: Equals, values: [b]}]}"),
     "spec.podSelector.matchExpressions[0].operator 'Equals'"),
    (_np("podSelector: {matchExpressions: [{key: a, operator: In}]}"),
     "spec.podSelector.matchExpressions[0].values None: operator In needs at least one value"),
    (_np("podSelector: {}\ningress: [{ports: [{port: 70000}]}]"),
     "spec.ingress[0].ports[0].port 70000: a port number, 1 to 65535"),
    (_np("podSelector: {}\ningress: [{ports: [{endPort: 90}]}]"),
     "spec.ingress[0].ports[0].endPort 90: needs a numeric port"),
    (_np("podSelector: {}\ningress: [{ports: [{port: 80, endPort: 79}]}]"),
     "spec.ingress[0].ports[0].endPort 79: below port 80"),
    (_np("podSelector: {}\ningress: [{ports: [{port: web, endPort: 90}]}]"),
     "spec.ingress[0].ports[0].endPort 90: not allowed with a named port"),
    (_np("podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]"),
     "spec.egress[0].to[0].ipBlock.cidr '10.0.0.0/33': not a CIDR"),
    (_np("podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]"),
     "spec.egress[0].to[0].ipBlock.except[0] '11.0.0.0/16': not strictly inside 10.0.0.0/8"),
    (_np("podSelector: {}\ningress: [{ports: [{port: 80, protocol: tcp}]}]"),
     "spec.ingress[0].ports[0].protocol 'tcp'"),
    (_np("podSelector: {}\ningress: [{from: [{}]}]"), "spec.ingress[0].from[0] {}"),
    (_np("podSelector: {}\negres: [{}]"), "spec.egres [{}]: unknown field"),
])
def test_bad_input_names_the_document_the_field_and_the_value(text: str, expected: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        documents.load(text, "policy.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert expected in message, message
    if "document 2" in message:
        assert message.startswith("policy.yaml document 2 (NetworkPolicy x/bad): "), message


def test_cilium_l7_rules_are_refused_with_what_to_do() -> None:
    text = textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7, namespace: x}
        spec:
          endpointSelector: {}
          ingress:
          - toPorts: [{ports: [{port: "80"}], rules: {http: [{method: GET}]}}]
        """)
    with pytest.raises(InvalidArgument, match=r"spec.ingress\[0\].toPorts\[0\].rules .*L7"):
        documents.load(text)


def test_a_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(InvalidArgument, match="invalid file 'p.yaml line 3'"):
        documents.load("a: 1\nb: [\nc: }", "p.yaml")


def test_a_policy_twice_in_one_file_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="NetworkPolicy x/ok appears twice"):
        documents.load(GOOD + "---" + GOOD)


def test_policy_types_default_as_the_api_server_does() -> None:
    [ingress_only, both, explicit] = documents.load(textwrap.dedent("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: a}
        spec: {podSelector: {}, egress: []}
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: b}
        spec: {podSelector: {}, egress: [{}]}
        ---
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: c}
        spec: {podSelector: {}, policyTypes: [Egress], ingress: [{}]}
        """))
    assert ingress_only.isolates == {Direction.INGRESS}
    assert ingress_only.namespace == "default"
    assert both.isolates == {Direction.INGRESS, Direction.EGRESS}
    assert explicit.isolates == {Direction.EGRESS} and explicit.ingress == ()


def test_json_and_lists_parse_to_the_same_model() -> None:
    as_yaml = documents.load(GOOD)
    as_json = documents.load('{"kind": "List", "items": [{"apiVersion": "networking.k8s.io/v1",'
                             ' "kind": "NetworkPolicy", "metadata": {"name": "ok", "namespace":'
                             ' "x"}, "spec": {"podSelector": {}}}]}')
    assert as_yaml == as_json


def test_cilium_selectors_naming_a_namespace_select_by_its_name_label() -> None:
    [policy] = documents.load(textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: c, namespace: x}
        spec:
          endpointSelector: {matchLabels: {app: db}}
          egress:
          - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: y, app: web}}]
            toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
          - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}]
        """))
    assert policy.subject == EndpointSelector(policy.subject.pods, None, "x")
    first, second = policy.egress
    [peer] = first.peers
    assert isinstance(peer, EndpointSelector) and peer.namespaces is not None
    assert peer.namespaces.describe() == "kubernetes.io/metadata.name=y"
    assert peer.pods.describe() == "app=web"
    assert first.ports == (PortMatch("tcp", 5432),)
    assert second.peers == (CidrPeer(ipaddress.ip_network("0.0.0.0/0"),
                                     (ipaddress.ip_network("10.0.0.0/8"),), endpoints=False),)


def test_admin_policies_keep_rule_order_names_and_priority() -> None:
    [anp] = documents.load(textwrap.dedent("""
        apiVersion: policy.networking.k8s.io/v1alpha1
        kind: AdminNetworkPolicy
        metadata: {name: sec}
        spec:
          priority: 5
          subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}
          egress:
          - {name: out, action: Deny, to: [{networks: [0.0.0.0/0]}]}
          - {name: in, action: Pass, to: [{namespaces: {}}], ports: [{namedPort: web}]}
        """))
    assert (anp.tier, anp.priority, anp.ref) == (Tier.ADMIN, 5, "sec")
    assert [(r.name, r.action) for r in anp.egress] == [("out", Action.DENY), ("in", Action.PASS)]
    with pytest.raises(InvalidArgument, match="spec.priority 1001"):
        documents.load(textwrap.dedent("""
            apiVersion: policy.networking.k8s.io/v1alpha1
            kind: AdminNetworkPolicy
            metadata: {name: sec}
            spec: {priority: 1001, subject: {namespaces: {}}}
            """))

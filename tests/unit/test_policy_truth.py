"""The policy model's meaning and its compiled form, held against the hand-written truth tables
of tests/policy_cases.py (and a few of their own): the evaluator directly, and the compiled
elements of both hosts looked up as the kernel looks them up (tests/unit/policy_sim.py); pods of
x and y live on host n1, those of z on n2."""

from __future__ import annotations

import ipaddress
import textwrap
from collections.abc import Iterable

import pytest

from plexus.model.types import Endpoint, ExposedPort
from plexus.policy import documents
from plexus.policy.compile import Compiler, Inputs
from plexus.policy.evaluate import Evaluator, Flow, Party, Workload
from plexus.policy.journal import Sets
from plexus.policy.model import Action
from tests.policy_cases import ALL, CASES, NAMESPACES, PODS, Case, Expect
from tests.unit import policy_sim

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




def _endpoint(name: str) -> Endpoint:
    ns, pod = name.split("/")
    ports = tuple(ExposedPort(p, proto, f"serve-{p}-{proto}") for p in (80, 81)
                  for proto in ("tcp", "udp"))
    return Endpoint(container_id=name.replace("/", "-"), ifname="eth0", network="net",
                    node=NODES[ns], netns="", namespace=ns, labels={"pod": pod},
                    addresses=(ipaddress.ip_interface(f"{_address(ns, pod)}/16"),),
                    exposes=ports)


NODES = {"x": "n1", "y": "n1", "z": "n2"}  # z lives on another host


def _compiled_verdict(compiled: dict[str, Sets], src: str, dst: str, port: int,
                      proto: str) -> bool:
    """The compiled form on each host: the source's egress where it lives, the destination's
    ingress where it lives (the host's own traffic leaves through output: not filtered)."""
    if src == "host":
        return True
    a, b = _party(src).address, _party(dst).address
    hosts = {NODES[n.split("/")[0]] for n in (src, dst) if "/" in n}
    return all(policy_sim.passes(compiled[h], a, b, proto, port) for h in hosts)


def _compiled(inputs: Inputs) -> Sets:
    compiler = Compiler()
    compiler.compile(inputs)
    return compiler.sets


def _check(yaml_text: str, expect: Expect, ports: Iterable[int] = (80, 81),
           protocols: Iterable[str] = ("tcp", "udp"), peers: list[str] | None = None) -> None:
    """The evaluator and the compiled form of both hosts, against the hand-written truth."""
    policies = documents.load(textwrap.dedent(yaml_text))
    namespaces = {ns: {"ns": ns} for ns in NAMESPACES}
    ev = Evaluator(policies, namespaces)
    endpoints = {n: _endpoint(n) for n in ALL}
    compiled = {node: _compiled(Inputs(policies, namespaces, endpoints, node))
                for node in ("n1", "n2")}
    names = peers or ALL
    wrong = []
    for src in names:
        for dst in names:
            if src == dst:
                continue
            for port in ports:
                for proto in protocols:
                    want = expect(src, dst, port, proto)
                    got = ev.verdict(Flow(_party(src), _party(dst), proto, port)).allowed
                    if got != want:
                        wrong.append(f"evaluator {src} -> {dst} {port}/{proto}: got {got}")
                    if _compiled_verdict(compiled, src, dst, port, proto) != want:
                        wrong.append(f"compiled {src} -> {dst} {port}/{proto}: got {not want}")
    assert not wrong, "\n".join(wrong)


def _addresses() -> dict[str, str]:
    pods = {f"{ns}{pod}": str(_address(ns, pod)) for ns in NAMESPACES for pod in PODS}
    return {**pods, "subnet": "10.0.0.0/16", "outside": "192.0.2.0/24"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_shared_truth_tables(case: Case) -> None:
    _check(case.text(_addresses()), case.expect,
           peers=[*ALL, "outside"] if case.outside else None)


def test_no_policy_allows_everything() -> None:
    _check("", lambda s, d, p, pr: True)


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


def test_sctp_rules_never_open_tcp_or_udp() -> None:
    """This kernel has no SCTP sockets: SCTP is checked on the evaluator and the compiled
    elements only. A policy allowing only SCTP still isolates the pod for TCP and UDP."""
    _check("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: sctp-only, namespace: x}
        spec:
          podSelector: {matchLabels: {pod: a}}
          ingress: [{ports: [{port: 80, protocol: SCTP}]}]
        """, lambda s, d, p, pr: d != "x/a" or (p, pr) == (80, "sctp"),
        protocols=("tcp", "udp", "sctp"))

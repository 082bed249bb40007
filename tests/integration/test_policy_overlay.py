"""A policy that spans two hosts of an overlay network: two agents on one etcd, containers in
namespaces on both hosts, echo servers on ports 80 and 81. Ingress is enforced on the
destination's host for traffic from the other host's containers (it knows their identities from
the store), egress on the source's host toward the other host's containers; each host's
per-policy counters show where a packet was judged. Every expectation is checked against real
TCP after a control without policies, and against ``plexus policy explain`` on both hosts."""

from __future__ import annotations

import tempfile
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, DROPPED, Probe, tcp_probe
from tests.harness.world import Agent, World

from .helpers import wait_until

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 1.0
# name -> (host, namespace, app label)
CONTAINERS = {
    "web1": ("host1", "x", "web"), "cli1": ("host1", "y", "cli"),
    "web2": ("host2", "x", "web"), "cli2": ("host2", "y", "cli"), "other2": ("host2", "y", "other"),
}  # fmt: skip
POLICIES = """
    # x/app=web: ingress only from namespace y's app=cli (any port)
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: web-from-cli, namespace: x}
    spec:
      podSelector: {matchLabels: {app: web}}
      ingress:
      - from:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
          podSelector: {matchLabels: {app: cli}}
    ---
    # y/app=cli: egress only to namespace x's app=web, port 80
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: cli-to-web-80, namespace: y}
    spec:
      podSelector: {matchLabels: {app: cli}}
      policyTypes: [Egress]
      egress:
      - to:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}
          podSelector: {matchLabels: {app: web}}
        ports: [{port: 80}]
    """
# (source, destination, port): allowed? Every pair crosses the hosts except the last two.
EXPECT = {
    ("cli2", "web1", 80): True,  # egress allowed at host2, ingress allowed at host1
    ("other2", "web1", 80): False,  # ingress, judged at host1 (other2 is not selected there)
    ("cli2", "web1", 81): False,  # egress, judged at host2 (web1's ingress would allow it)
    ("cli2", "cli1", 80): False,  # egress at host2: cli1 is isolated by nothing
    ("other2", "cli1", 80): True,  # the control for the line above
    ("cli1", "web2", 80): True,  # the other way round
    ("cli1", "web2", 81): False,  # egress at host1
    ("other2", "web2", 80): False,  # on one host, for comparison
}


@dataclass
class Two:
    agents: dict[str, Agent]
    addresses: dict[str, str]
    tmp: Path

    def probe(self, src: str, dst: str, port: int) -> Probe:
        host = CONTAINERS[src][0]
        return tcp_probe(self.agents[host].netns(src), self.addresses[dst], port, TIMEOUT)

    def observed(self) -> dict[tuple[str, str, int], bool]:
        def one(case: tuple[str, str, int]) -> bool:
            got = self.probe(*case)
            assert got.outcome in (ANSWERED, DROPPED), (case, got)
            return got.outcome is ANSWERED

        with ThreadPoolExecutor(max_workers=len(EXPECT)) as pool:
            return dict(zip(EXPECT, pool.map(one, EXPECT), strict=True))


@pytest.fixture(scope="module")
def two() -> Iterator[Two]:
    with tempfile.TemporaryDirectory(prefix="plexus-policy-overlay-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2"]) as (_, agents):
                by_host = {a.host: a for a in agents}
                by_host["host1"].cli("network", "create", "ov", "--driver", "overlay",
                                     "--subnet", "10.79.0.0/24", "--block-size", "28")
                assert wait_until(lambda: all("ov" in {n["name"] for n in a.json("network", "ls")}
                                              for a in agents), timeout=20)
                for name, (host, ns, app) in CONTAINERS.items():
                    by_host[host].run_echo(name, "ov", "--namespace", ns, "--label", f"app={app}",
                                           ports=(80, 81))
                for name, (host, _, _) in CONTAINERS.items():
                    by_host[host].wait_listening(name, 81)
                addresses = {n: by_host[h].address(n, "ov") for n, (h, _, _) in CONTAINERS.items()}
                yield Two(by_host, addresses, Path(tmp))
        finally:
            w.close()


def _counters(agent: Agent) -> dict[str, dict[str, int]]:
    return {p["ref"]: p["packets"] for p in agent.json("policy", "ls")}


def test_ingress_and_egress_hold_across_hosts(two: Two) -> None:
    # The control: without policies everything connects (another host's routes follow within
    # moments of its containers starting).
    assert wait_until(lambda: all(two.observed().values()), timeout=20), two.observed()
    path = two.tmp / "policy.yaml"
    path.write_text(textwrap.dedent(POLICIES))
    two.agents["host1"].cli("policy", "apply", "-f", str(path))
    try:
        # The policy reaches host2 through the store: wait for its first effect there.
        deadline = time.monotonic() + 10
        while two.probe("cli2", "web1", 81).outcome is ANSWERED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert two.observed() == EXPECT
        _check_where_judged(two)
        _check_explain(two)
    finally:
        two.agents["host1"].cli("policy", "delete", "--all")


def _check_where_judged(two: Two) -> None:
    """Drops are counted on the host that judged them: host1 for other2 -> web1 (ingress);
    host2 for cli2's egress drops, which host1 never sees."""
    one, two_ = _counters(two.agents["host1"]), _counters(two.agents["host2"])
    assert one["x/web-from-cli"]["deny"] >= 1, one
    assert two_["y/cli-to-web-80"]["deny"] >= 2, two_  # cli2 -> web1:81, cli2 -> cli1:80
    assert one["y/cli-to-web-80"]["deny"] >= 1, one  # cli1 -> web2:81, judged at host1
    assert two_["x/web-from-cli"]["deny"] >= 1, two_  # other2 -> web2 on host2 itself


def _check_explain(two: Two) -> None:
    for agent in two.agents.values():  # both hosts see the same policies and endpoints
        for (src, dst, port), allowed in EXPECT.items():
            out = agent.json("policy", "explain", "--from", src, "--to", dst,
                             "--port", f"{port}/tcp")
            assert (out["verdict"] == "allowed") == allowed, (agent.host, src, dst, port, out)

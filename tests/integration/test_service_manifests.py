"""Kubernetes ``v1 Service`` manifests give what the CLI gives: each kind of service is made
twice on one agent, once by ``plexus service create`` and once by ``plexus apply -f``, and the
two agree on what ``service inspect`` shows (network, ports, selector, affinity, endpoints with
their resolved target ports; only names, VIPs, host ports and origin differ) and on what their
clients observe: connections spread over the same backends through a named ``targetPort``, a
NodePort reached from outside the host, a headless name answering the same endpoint
addresses, ``sessionAffinity: ClientIP`` keeping a client on one backend."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.world import Agent, World, sh

from .service_probes import backends

pytestmark = pytest.mark.privileged
BACKENDS = ("web1", "web2", "web3")
HEAD = ("apiVersion: v1\nkind: Service\n"
        "metadata: {{name: {name}-k8s, annotations: {{plexus.io/network: net}}}}\n")
# kind → (the CLI's words, the manifest's spec)
KINDS: dict[str, tuple[list[str], str]] = {
    "named": (["--port", "http:80:http"],
              "spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}"),
    "node": (["--port", "http:80:http", "--publish", "30080:80"],
             "spec: {type: NodePort, selector: {app: web}, ports: [{name: http, port: 80, "
             "targetPort: http, nodePort: 30081}]}"),
    "peers": (["--port", "http:80:http", "--headless"],
              "spec: {clusterIP: None, selector: {app: web}, ports: [{name: http, port: 80, "
              "targetPort: http}]}"),
    "sticky": (["--port", "http:80:http", "--affinity", "client-ip", "--affinity-timeout",
                "600"],
               "spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}],"
               " sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: "
               "{timeoutSeconds: 600}}}"),
}


@dataclass
class Lab:
    world: World
    agent: Agent

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.agent.cli("service", "inspect", name).stdout))

    def vip(self, name: str) -> str:
        return str(self.inspect(name)["vips"][0])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="plexus-svc-k8s-") as tmp:
        world = World(Path(tmp) / "world")
        try:
            agent = world.add_host("host1")
            agent.cli("network", "create", "net", "--subnet", "10.82.0.0/24")
            for name in BACKENDS:  # serving 8080, exposed as "http": targetPort http
                agent.run_echo(name, "net", "--label", "app=web", "--expose", "http=8080",
                               ports=(8080,))
            agent.run_echo("client", "net", "--label", "app=client")
            for name in (*BACKENDS, "client"):
                agent.wait_listening(name, 8080 if name != "client" else 80)
            docs = "---\n".join(HEAD.format(name=k) + body + "\n"
                                 for k, (_, body) in KINDS.items())
            path = Path(tmp) / "services.yaml"
            path.write_text(docs)
            assert sorted(agent.cli("apply", "-f", str(path)).stdout.splitlines()) == [
                f"Service default/{k}-k8s created" for k in sorted(KINDS)]
            for kind, (words, _) in KINDS.items():
                agent.cli("service", "create", f"{kind}-cli", "--network", "net",
                          "--selector", "app=web", *words)
            yield Lab(world, agent)
        finally:
            world.close()


def essentials(seen: dict[str, Any]) -> dict[str, Any]:
    """What must agree: all but the name, the VIPs (their number must), the host ports (their
    container side must), the origin and the creation time."""
    return {
        **{k: seen[k] for k in ("namespace", "network", "headless", "ports", "selector",
                                "affinity", "affinity_timeout", "health", "unresolved")},
        "vips": len(seen["vips"]),
        "publish": [p.split(":", 1)[1] for p in seen["publish"]],
        "endpoints": sorted((e["container"], e["ready"], json.dumps(e["targets"]))
                            for e in seen["endpoints"]),
    }


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_inspect_shows_the_same_service(lab: Lab, kind: str) -> None:
    cli, k8s = lab.inspect(f"{kind}-cli"), lab.inspect(f"{kind}-k8s")
    assert essentials(cli) == essentials(k8s)
    assert (cli["origin"], k8s["origin"]) == ("cli", "manifest")
    assert [t for e in k8s["endpoints"] for t in e["targets"].values()] == [8080] * 3


@pytest.mark.parametrize("kind", ["named", "node"])
def test_connections_spread_over_the_same_backends_through_the_named_target_port(
        lab: Lab, kind: str) -> None:
    ns = lab.agent.netns("client")
    for name in (f"{kind}-cli", f"{kind}-k8s"):
        seen = backends(ns, lab.vip(name), 60)
        assert set(seen) == set(BACKENDS), (name, seen)


def test_a_node_port_is_reached_from_outside_like_a_published_port(lab: Lab) -> None:
    host = lab.world.host_addr("host1")
    for port in (30080, 30081):  # --publish 30080:80 and nodePort: 30081
        seen = backends("outside", host, 30, port)
        assert set(seen) == set(BACKENDS), (port, seen)


def test_session_affinity_keeps_a_client_on_one_backend_either_way(lab: Lab) -> None:
    ns = lab.agent.netns("client")
    for name in ("sticky-cli", "sticky-k8s"):
        seen = backends(ns, lab.vip(name), 30)
        assert len(seen) == 1 and sum(seen.values()) == 30, (name, seen)
        assert set(seen) <= set(BACKENDS), (name, seen)


def test_a_headless_name_answers_the_same_endpoint_addresses(lab: Lab) -> None:
    ns = lab.agent.container("client")["netns_name"]
    pods = {lab.agent.address(n) for n in BACKENDS}

    def resolve(name: str) -> set[str]:
        out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4",
                 f"{name}.default.svc.plexus.internal", check=False).stdout
        return {line.split()[0] for line in out.splitlines()}

    assert resolve("peers-cli") == resolve("peers-k8s") == pods
    assert resolve("named-cli") == {lab.vip("named-cli")}  # the control: a VIP, not endpoints

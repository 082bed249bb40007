"""Docker and Podman containers under the same network policies as plexus's own, on one
network of one host: a real dockerd (plexus as its network and IPAM driver) and a real Podman
(plexus as its CNI plugin) next to the agent. A Docker container's namespace and labels come
from its container labels (``plexus.namespace``), which the agent asks dockerd for during Join;
a Podman container's namespace from ``K8S_POD_NAMESPACE`` in the ``CNI_ARGS`` Podman passes on
from its environment, its labels from ``args.cni.labels`` of the network configuration it was
started with. Proven with real TCP (the allowed peer connects, the other is dropped, after a
control without the policy) and ``plexus policy explain`` agreeing."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plexus.cni.install import install
from tests.harness.docker import INDEX_HTML, Dockerd
from tests.harness.podman import Podman
from tests.harness.probes import ANSWERED, DROPPED, Probe, http_probe
from tests.harness.world import Agent, World

pytestmark = [
    pytest.mark.skipif(
        shutil.which("dockerd") is None or shutil.which("podman") is None
        or not Path("/bin/busybox").exists(),
        reason="needs docker.io, podman, runc and busybox-static (make deps)",
    ),
    pytest.mark.timeout(300),
]

NET = "shared"
SUBNET = "10.111.0.0/24"
CLIENT_CONF = "shared-client"  # a second CNI config for the same plexus network, with labels
TIMEOUT = 1.5


@dataclass
class Lab:
    agent: Agent
    docker: Dockerd
    podman: Podman
    tmp: Path

    def netns(self, name: str) -> str:
        """Every container by its name: db (Docker), client (Podman), native (plexus)."""
        if name == "db":
            return self.docker.netns_path(name)
        if name == "client":
            return self.podman.netns_path(name)
        return self.agent.netns(name)

    def ip(self, name: str) -> str:
        if name == "db":
            return self.docker.ip(name, NET)
        if name == "client":
            return self.podman.ip(name, CLIENT_CONF)
        return self.agent.address(name)

    def probe(self, src: str, dst: str) -> Probe:
        return http_probe(self.netns(src), self.ip(dst), 80, TIMEOUT)

    def apply(self, text: str) -> None:
        path = self.tmp / "policy.yaml"
        path.write_text(textwrap.dedent(text))
        self.agent.cli("policy", "apply", "-f", str(path))

    def explain(self, src: str, dst: str) -> str:
        out = self.agent.json("policy", "explain", "--from", src, "--to", dst, "--port", "80/tcp")
        return str(out["verdict"])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="plexus-runtimes-") as name:
        tmp = Path(name)
        world = World(tmp / "world")
        docker = None
        try:
            agent = world.add_host("host1", start_agent=False)
            docker = Dockerd(tmp / "docker", netns="host1",
                             plugins={"plexus": agent.docker_socket})
            agent.start(extra=["--docker-api", str(docker.socket)])
            docker.start()
            docker.import_busybox()
            docker.network_create(NET, driver="plexus", ipam_driver="plexus", subnet=SUBNET,
                                  options={"plexus.name": NET})
            # db: a Docker container in namespace prod, labelled app=db (and with a label no
            # policy can select, which plexus leaves out)
            docker.run_http("db", NET, extra=["--label", "plexus.namespace=prod", "--label",
                                              "app=db", "--label", "note=not a k8s label"])
            with Podman(tmp / "podman", netns="host1") as podman:
                _podman_client(podman, agent, tmp)
                # native: a plexus container in the client's namespace, with another label
                agent.run_echo("native", NET, "--namespace", "frontend", "--label", "app=web")
                agent.wait_listening("native")
                yield Lab(agent, docker, podman, tmp)
        finally:
            if docker is not None:
                docker.stop(check=False)  # before the agent: a dead plugin slows Docker down
            world.close()


def _podman_client(podman: Podman, agent: Agent, tmp: Path) -> None:
    """client: a Podman container in namespace frontend (CNI_ARGS) labelled app=client (the
    network configuration's ``args.cni.labels``)."""
    bindir = tmp / "plexus-cni"
    install([str(bindir)])
    podman.add_plugin(bindir / "plexus")
    podman.write_conflist(CLIENT_CONF, [{
        "type": "plexus", "socket": str(agent.socket), "network": NET,
        "args": {"cni": {"labels": [{"key": "app", "value": "client"}]}},
    }], cni_version="1.0.0")
    podman.run_http("client", CLIENT_CONF, env={"CNI_ARGS": "K8S_POD_NAMESPACE=frontend"})


def test_plexus_knows_each_runtimes_namespace_and_labels(lab: Lab) -> None:
    found = {c["name"]: (c["endpoints"][0]["namespace"], c["endpoints"][0]["labels"])
             for c in lab.agent.json("ps")}
    assert found == {
        "db": ("prod", {"app": "db"}),  # plexus.namespace is the namespace, not a label
        "client": ("frontend", {"app": "client"}),
        "native": ("frontend", {"app": "web"}),
    }, found
    spaces = {n["name"] for n in lab.agent.json("namespace", "ls")}
    assert {"prod", "frontend"} <= spaces  # created with their first container


def test_a_policy_selects_a_docker_container_by_its_labels(lab: Lab) -> None:
    for src in ("client", "native"):  # the control: without policy, both reach db
        got = lab.probe(src, "db")
        assert got.outcome is ANSWERED and INDEX_HTML.strip() in got.answer, (src, got)
    lab.apply("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: db-from-client, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: frontend}}
              podSelector: {matchLabels: {app: client}}
            ports: [{port: 80}]
        """)
    try:
        assert lab.probe("client", "db").outcome is ANSWERED  # the Podman container
        assert lab.probe("native", "db").outcome is DROPPED  # the plexus container
        assert (lab.explain("client", "db"), lab.explain("native", "db")) == (
            "allowed", "denied")
    finally:
        lab.agent.cli("policy", "delete", "--all")


def test_a_policy_selects_a_podman_container_by_its_cni_labels(lab: Lab) -> None:
    for src in ("db", "native"):
        assert lab.probe(src, "client").outcome is ANSWERED, src
    lab.apply("""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: client-from-db, namespace: frontend}
        spec:
          podSelector: {matchLabels: {app: client}}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}
              podSelector: {matchLabels: {app: db}}
        """)
    try:
        assert lab.probe("db", "client").outcome is ANSWERED  # the Docker container
        assert lab.probe("native", "client").outcome is DROPPED  # same namespace, other label
        # native itself is not selected: the Docker container still reaches it
        assert lab.probe("db", "native").outcome is ANSWERED
        assert (lab.explain("db", "client"), lab.explain("native", "client"),
                lab.explain("db", "native")) == ("allowed", "denied", "allowed")
    finally:
        lab.agent.cli("policy", "delete", "--all")

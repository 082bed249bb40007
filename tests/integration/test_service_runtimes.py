"""A Docker and a Podman container as a service's backends, next to the agent on one host: a
real dockerd (plexus as its network and IPAM driver; the container's labels asked from dockerd
during Join) and a real Podman (plexus as its CNI plugin; labels from the network
configuration's ``args.cni.labels``). A service selecting ``app=web`` has both as endpoints and
spreads a plexus container's connections to its VIP over them; when the Docker container goes,
every connection lands on the Podman one. Each busybox httpd serves its own name, so the page
says which backend answered."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plexus.cni.install import install
from tests.harness.docker import Dockerd
from tests.harness.podman import Podman
from tests.harness.world import Agent, World

from .helpers import wait_until
from .service_probes import http_backends

pytestmark = [
    pytest.mark.skipif(
        shutil.which("dockerd") is None or shutil.which("podman") is None
        or not Path("/bin/busybox").exists(),
        reason="needs docker.io, podman, runc and busybox-static (make deps)",
    ),
    pytest.mark.timeout(300),
]

NET, SUBNET, WEB_CONF = "shared", "10.113.0.0/24", "shared-web"


def serve_own_name(name: str) -> list[str]:
    """A busybox httpd whose page is ``name``."""
    return ["sh", "-c", f"mkdir -p /tmp/w && echo {name} > /tmp/w/index.html && "
            "exec httpd -f -p 80 -h /tmp/w"]


@dataclass
class Lab:
    agent: Agent
    docker: Dockerd
    podman: Podman
    vip: str


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with tempfile.TemporaryDirectory(prefix="plexus-svc-runtimes-") as name:
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
            docker.run("dweb", NET, *serve_own_name("dweb"), extra=["--label", "app=web"])
            with Podman(tmp / "podman", netns="host1") as podman:
                _podman_web(podman, agent, tmp)
                agent.run_echo("cli", NET, "--label", "app=client")
                agent.wait_listening("cli")
                vip = agent.cli("service", "create", "web", "--network", NET, "--selector",
                                "app=web", "--port", "80").stdout.split()[1]
                yield Lab(agent, docker, podman, vip)
        finally:
            if docker is not None:
                docker.stop(check=False)  # before the agent: a dead plugin slows Docker down
            world.close()


def _podman_web(podman: Podman, agent: Agent, tmp: Path) -> None:
    """pweb: a Podman container labelled app=web through its network configuration."""
    bindir = tmp / "plexus-cni"
    install([str(bindir)])
    podman.add_plugin(bindir / "plexus")
    podman.write_conflist(WEB_CONF, [{
        "type": "plexus", "socket": str(agent.socket), "network": NET,
        "args": {"cni": {"labels": [{"key": "app", "value": "web"}]}},
    }], cni_version="1.0.0")
    podman.run("pweb", WEB_CONF, *serve_own_name("pweb"))


def test_both_runtimes_containers_are_the_services_endpoints(lab: Lab) -> None:
    seen = json.loads(lab.agent.cli("service", "inspect", "web").stdout)
    assert sorted((e["container"], e["ready"]) for e in seen["endpoints"]) == [
        ("dweb", True), ("pweb", True)], seen["endpoints"]


def test_connections_to_the_vip_spread_over_the_docker_and_the_podman_container(
        lab: Lab) -> None:
    ns = lab.agent.netns("cli")
    assert wait_until(lambda: set(http_backends(ns, lab.vip, 8)) == {"dweb", "pweb"},
                      timeout=15)  # both httpds up
    seen = http_backends(ns, lab.vip, 100)
    assert set(seen) == {"dweb", "pweb"}, seen
    assert all(25 <= n <= 75 for n in seen.values()), seen  # 50 each, give or take


def test_when_the_docker_container_goes_the_podman_one_takes_every_connection(
        lab: Lab) -> None:
    lab.docker.rm("dweb")
    assert wait_until(lambda: [s["endpoints"] for s in lab.agent.json("service", "ls")] == [1],
                      timeout=20)
    seen = http_backends(lab.agent.netns("cli"), lab.vip, 30)
    assert seen == {"pweb": 30}, seen

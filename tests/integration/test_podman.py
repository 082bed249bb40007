"""plexus as Podman's CNI plugin: real `podman run` (Debian's 4.3, CNI backend, runc), containers
from a locally imported busybox image, on a plexus network shared with `plexus run` containers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexus.cni.install import install
from tests.harness.podman import INDEX_HTML, Podman
from tests.harness.probes import REFUSED, tcp_probe
from tests.harness.world import Agent, World, http_get, ping

from .helpers import links, nft_elements, store_rows, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or not Path("/bin/busybox").exists(),
    reason="needs podman, runc and busybox-static (make deps)",
)

NET = "pxnet"


@pytest.fixture
def podman(world: World, agent: Agent, tmp_path: Path) -> Iterator[Podman]:
    bindir = tmp_path / "plexus-cni"
    install([str(bindir)])
    # Podman runs in the simulated host's namespace, next to the agent, as on a real host.
    with Podman(tmp_path / "podman", netns="host1") as p:
        p.add_plugin(bindir / "plexus")
        # Podman 4.3 refuses 1.1.0 results, so the conflist says 1.0.0 (plexus answers in the
        # version it is asked in).
        p.write_conflist(NET, [{
            "type": "plexus", "socket": str(agent.socket), "subnets": ["10.70.0.0/24"],
            "capabilities": {"portMappings": True, "aliases": True},
        }], cni_version="1.0.0")
        yield p


def test_podman_containers_on_a_plexus_network(podman: Podman, agent: Agent,
                                               world: World) -> None:
    podman.run_http("web", NET, publish=["8080:80", "127.0.0.1:8083:80"])
    podman.run_http("api", NET, extra=["--network-alias", "backend"])
    web, api = podman.ip("web", NET), podman.ip("api", NET)
    assert web.startswith("10.70.0.") and api.startswith("10.70.0.") and web != api
    # two podman containers reach each other
    assert INDEX_HTML.strip() in podman.fetch("web", f"http://{api}/")
    # a plexus run container on the same network reaches them, and they reach it
    agent.run_echo("native", NET)
    agent.wait_listening("native")
    assert ping(agent.netns("native"), web)
    assert podman.exec("web", "sh", "-c",
                       f"echo | timeout 5 nc {agent.address('native')} 80").stdout.startswith(
                           "native")
    # the published port, from another host; Podman's hostIP (127.0.0.1) is kept: the port is
    # there on the host's loopback, and not on its address
    host = world.host_addr("host1")
    assert INDEX_HTML.strip() in http_get("outside", host, 8080)
    assert INDEX_HTML.strip() in http_get("host1", "127.0.0.1", 8083)
    assert tcp_probe("outside", host, 8083, 1).outcome is REFUSED
    # plexus sees podman's containers, by name, with their aliases
    ps = {c["name"]: c for c in agent.json("ps")}
    assert ps["web"]["owner"] == "cni"
    assert sorted(ps["web"]["ports"]) == ["127.0.0.1:8083:80/tcp", "8080:80/tcp"]
    assert "backend" in ps["api"]["endpoints"][0]["aliases"]


def test_stop_and_rm_leave_nothing_behind(podman: Podman, agent: Agent) -> None:
    podman.run_http("a", NET, publish=["8081:80"])
    podman.run_http("b", NET)
    assert len(store_rows(agent.state_dir, "/plexus/endpoints/")) == 2
    podman.stop("a")
    podman.start("a")  # DEL then ADD: never "already exists"
    assert INDEX_HTML.strip() in podman.fetch("b", f"http://{podman.ip('a', NET)}/")
    podman.rm("a", "b")
    assert store_rows(agent.state_dir, "/plexus/endpoints/") == {}
    assert store_rows(agent.state_dir, "/plexus/ipam/") == {}
    assert store_rows(agent.state_dir, "/plexus/ports/") == {}
    assert wait_until(lambda: not [l for l in links("host1") if l["ifname"].startswith("pxv")])
    assert all(not v for k, v in nft_elements("host1").items() if k.startswith("pub"))

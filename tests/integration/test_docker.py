"""plexus as Docker's network and IPAM driver, with a real dockerd (Debian's docker.io) started in
the simulated host next to the agent, containers from a locally imported busybox image."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plexus.cni.install import install
from tests.harness.cni import exec_plugin
from tests.harness.docker import INDEX_HTML, Dockerd
from tests.harness.world import Agent, World, http_get, ping

from .helpers import BUILTIN_NETWORKS, links, nft_elements, store_rows, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("dockerd") is None or not Path("/bin/busybox").exists(),
    reason="needs docker.io and busybox-static (make deps)",
)


class Env:
    def __init__(self, world: World, agent: Agent, docker: Dockerd, tmp: Path) -> None:
        self.world, self.agent, self.docker, self.tmp = world, agent, docker, tmp

    def net(self, name: str, subnet: str, *extra: str, **kw: Any) -> str:
        return self.docker.network_create(name, driver="plexus", ipam_driver="plexus",
                                          subnet=subnet, extra=extra, **kw)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="plexus-docker-") as tmp:
        world = World(Path(tmp) / "world")
        docker = None
        try:
            agent = world.add_host("host1", start_agent=False)
            docker = Dockerd(Path(tmp) / "docker", netns="host1",
                             plugins={"plexus": agent.docker_socket})
            agent.start(extra=["--docker-api", str(docker.socket)])
            docker.start()
            docker.import_busybox()
            yield Env(world, agent, docker, Path(tmp))
        finally:
            if docker is not None:
                docker.stop(check=False)  # before the agent: a dead plugin slows Docker down
            for agent_log in Path(tmp).glob("world/*/agent-*.log"):
                shutil.copy(agent_log, Path(tempfile.gettempdir()) / "plexus-docker-agent.log")
            world.close()


def test_docker_containers_on_plexus_networks(env: Env) -> None:
    d, a = env.docker, env.agent
    env.net("front", "10.100.0.0/24")
    env.net("back", "10.101.0.0/24")
    d.run_http("web", "front", publish=["8080:80", "127.0.0.1:8081:80"])
    d.run_http("app", "front", extra=["--network-alias", "api", "--ip", "10.100.0.50"])
    d.run_http("db", "back")
    web, app, db = d.ip("web", "front"), d.ip("app", "front"), d.ip("db", "back")
    assert app == "10.100.0.50" and web.startswith("10.100.0.")
    # same network: connects; another plexus network: isolated, both ways
    assert INDEX_HTML.strip() in d.fetch("web", f"http://{app}/")
    assert d.fetch("web", f"http://{db}/", timeout=2) == ""
    assert d.fetch("db", f"http://{web}/", timeout=2) == ""
    # published ports: from another host (source kept), from the host, hairpin; 127.0.0.1 only
    host = env.world.host_addr("host1")
    assert INDEX_HTML.strip() in http_get("outside", host, 8080)
    assert INDEX_HTML.strip() in http_get("host1", "127.0.0.1", 8081)
    assert http_get("outside", host, 8081) == ""
    assert INDEX_HTML.strip() in d.fetch("app", f"http://{host}:8080/")
    # the plexus network is a plexus network: plexus sees Docker's containers with their names
    nets = {n["name"]: n for n in a.json("network", "ls")}
    docker_ids = {n: d.docker("network", "inspect", "-f", "{{.Id}}", n).stdout.strip()
                  for n in ("front", "back")}
    served = {i for n in nets.values() for i in n["docker_networks"]}
    assert set(docker_ids.values()) <= served, (docker_ids, nets)
    assert "docker-" in a.cli("network", "ls").stdout  # named after the Docker network
    # connect / disconnect a running container to a second plexus network
    d.docker("network", "connect", "--alias", "db-client", "back", "web")
    assert INDEX_HTML.strip() in d.fetch("web", f"http://{db}/")
    d.docker("network", "disconnect", "back", "web")
    assert d.fetch("web", f"http://{db}/", timeout=2) == ""
    # names and aliases come from dockerd's API, learned in the background after Join
    def learned() -> bool:
        ps = {c["name"]: c for c in a.json("ps")}
        return "web" in ps and "api" in ps.get("app", {}).get("endpoints", [{}])[0].get(
            "aliases", [])

    assert wait_until(learned), a.json("ps")
    assert {c["name"]: c["owner"] for c in a.json("ps")}["web"] == "docker"


def test_docker_plexus_and_cni_containers_share_a_network(env: Env) -> None:
    d, a = env.docker, env.agent
    env.net("shared", "10.102.0.0/24", options={"plexus.name": "shared"})
    d.run_http("dk", "shared")
    a.run_echo("native", "shared")
    a.wait_listening("native")
    bindir = env.tmp / "cni-bin"
    install([str(bindir)])
    env.world.add_ns("pod")
    add = exec_plugin(bindir / "plexus", "ADD",
                      {"cniVersion": "1.0.0", "name": "shared", "type": "plexus",
                       "socket": str(a.socket)},
                      container_id="pod1", netns="/run/netns/pod", in_netns="/run/netns/host1",
                      path=str(bindir))
    assert add.ok, add.stdout
    pod = add.out["ips"][0]["address"].split("/")[0]
    dk = d.ip("dk", "shared")
    assert d.exec("dk", "sh", "-c", f"echo | timeout 5 nc {a.address('native')} 80",
                  check=False).stdout.startswith("native")
    assert d.exec("dk", "ping", "-c1", "-W2", pod, check=False).returncode == 0
    assert ping(a.netns("native"), dk)
    # a plexus container finds the Docker container by name (plexus DNS) ...
    assert _resolve(a, "native", "dk") == dk
    # ... and a Docker container started with --dns GATEWAY finds plexus and CNI containers:
    # Docker's embedded resolver answers Docker's names and forwards the rest to plexus.
    d.run("asker", "shared", extra=["--dns", "10.102.0.1"])
    out = d.exec("asker", "nslookup", "native", check=False).stdout
    assert a.address("native") in out, out
    exec_plugin(bindir / "plexus", "DEL", {"cniVersion": "1.0.0", "name": "shared",
                                            "type": "plexus", "socket": str(a.socket)},
                container_id="pod1", netns="/run/netns/pod", in_netns="/run/netns/host1",
                path=str(bindir))


def test_internal_network_stays_internal(env: Env) -> None:
    d = env.docker
    env.net("vault", "10.103.0.0/24", internal=True)
    d.run("locked", "vault")
    d.run("locked2", "vault")
    assert d.exec("locked", "ping", "-c1", "-W2", d.ip("locked2", "vault"),
                  check=False).returncode == 0
    from tests.harness.world import INTERNET_ADDR
    assert d.exec("locked", "ping", "-c1", "-W2", INTERNET_ADDR, check=False).returncode != 0


def test_restarts_keep_connectivity(env: Env) -> None:
    d, a = env.docker, env.agent
    env.net("steady", "10.104.0.0/24")
    d.run_http("s1", "steady")
    d.run_http("s2", "steady")
    target = d.ip("s2", "steady")
    a.kill(signal.SIGKILL)
    a.start(extra=["--docker-api", str(d.socket)])
    assert INDEX_HTML.strip() in d.fetch("s1", f"http://{target}/")
    d.stop(check=False, keep_data=True, remove=False)
    d.start()
    for name in ("s1", "s2"):  # a stopped container starts again on the same network
        d.docker("start", name)
    assert INDEX_HTML.strip() in d.fetch("s1", f"http://{d.ip('s2', 'steady')}/")
    inspect = d.docker("network", "inspect", "steady").stdout
    assert "plexus" in inspect


def test_removing_containers_and_networks_leaves_nothing(env: Env) -> None:
    d, a = env.docker, env.agent
    for name in d.containers():
        d.rm(name)
    for net in ("front", "back", "shared", "vault", "steady"):
        d.docker("network", "rm", net, check=False)
    a.cli("rm", "-f", "native", check=False)
    a.cli("network", "rm", "shared", check=False)
    assert store_rows(a.state_dir, "/plexus/endpoints/") == {}
    assert store_rows(a.state_dir, "/plexus/ipam/") == {}
    assert store_rows(a.state_dir, "/plexus/ports/") == {}
    assert set(store_rows(a.state_dir, "/plexus/networks/")) == {
        f"/plexus/networks/{n}" for n in BUILTIN_NETWORKS}
    assert store_rows(a.state_dir, "/plexus/subnets/") == {}
    assert [l["ifname"] for l in links("host1") if l["ifname"].startswith("px")] == []
    assert all(not v for v in nft_elements("host1").values())


def _resolve(agent: Agent, container: str, name: str) -> str:
    from tests.harness.world import sh

    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False).stdout
    return out.split()[0] if out else ""


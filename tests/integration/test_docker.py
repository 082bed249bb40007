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
from tests.harness.probes import ANSWERED, DROPPED, REFUSED, UNREACHABLE, tcp_probe
from tests.harness.world import INTERNET_ADDR, Agent, World, http_get, nsexec, ping, sh

from .helpers import (
    BUILTIN_NETWORKS,
    links,
    nft_elements,
    store_rows,
    user_networks,
    wait_until,
)

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

    def clear(self) -> None:
        """Remove every container and network a test made, Docker's and plexus's: the next
        test starts from the same empty state whatever ran before it."""
        d, a = self.docker, self.agent
        if containers := d.containers():
            d.rm(*containers)
        for net in set(d.networks_list()) - DOCKER_BUILTIN:
            d.docker("network", "rm", net, check=False)
        for c in a.json("ps", "-a"):
            a.cli("rm", "-f", c["name"], check=False)
        for n in user_networks(a):
            a.cli("network", "rm", n["name"], check=False)


DOCKER_BUILTIN = {"bridge", "host", "none"}


@pytest.fixture(scope="module")
def docker_env() -> Iterator[Env]:
    """One dockerd and one agent for the module (starting them costs seconds); each test gets
    them through ``env``, which clears what the test made."""
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


@pytest.fixture
def env(docker_env: Env) -> Iterator[Env]:
    yield docker_env
    docker_env.clear()


def test_docker_containers_on_plexus_networks(env: Env) -> None:
    d, a = env.docker, env.agent
    env.net("front", "10.100.0.0/24")
    env.net("back", "10.101.0.0/24")
    d.run_http("web", "front", publish=["8080:80", "127.0.0.1:8081:80"])
    d.run_http("app", "front", extra=["--network-alias", "api", "--ip", "10.100.0.50"])
    d.run_http("db", "back")
    web, app, db = d.ip("web", "front"), d.ip("app", "front"), d.ip("db", "back")
    assert app == "10.100.0.50" and web.startswith("10.100.0.")
    # same network: connects; another plexus network: dropped, both ways, while each server
    # answers the host (the control: a server that is down cannot pass for isolation)
    assert INDEX_HTML.strip() in d.fetch("web", f"http://{app}/")
    assert tcp_probe(d.netns_path("web"), db, 80, 1).outcome is DROPPED
    assert INDEX_HTML.strip() in http_get("host1", db, 80)
    assert tcp_probe(d.netns_path("db"), web, 80, 1).outcome is DROPPED
    assert INDEX_HTML.strip() in http_get("host1", web, 80)
    # published ports: from another host (source kept), from the host, hairpin; 127.0.0.1 only
    host = env.world.host_addr("host1")
    assert INDEX_HTML.strip() in http_get("outside", host, 8080)
    assert INDEX_HTML.strip() in http_get("host1", "127.0.0.1", 8081)
    assert tcp_probe("outside", host, 8081, 1).outcome is REFUSED  # not published there
    assert INDEX_HTML.strip() in d.fetch("app", f"http://{host}:8080/")
    # the plexus network is a plexus network: plexus sees Docker's containers with their names
    docker_ids = {n: d.network_inspect(n)["Id"] for n in ("front", "back")}
    served = {n["name"]: n["docker_networks"] for n in user_networks(a)}
    # named after the Docker network's ID, and serving it
    assert served == {f"docker-{i[:12]}": [i] for i in docker_ids.values()}, served
    # connect / disconnect a running container to a second plexus network
    d.docker("network", "connect", "--alias", "db-client", "back", "web")
    assert INDEX_HTML.strip() in d.fetch("web", f"http://{db}/")
    d.docker("network", "disconnect", "back", "web")
    assert tcp_probe(d.netns_path("web"), db, 80, 1).outcome is DROPPED
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
    # No default route out of an internal network; and with one of its own, the firewall drops
    # what it sends (the control: the host does reach the "internet", and it refuses port 80).
    locked = d.netns_path("locked")
    assert tcp_probe(locked, "10.103.0.1", 53, 1).outcome is ANSWERED  # the gateway, for DNS
    assert tcp_probe(locked, INTERNET_ADDR, 80, 1).outcome is UNREACHABLE
    nsexec(locked, "ip", "route", "add", "default", "via", "10.103.0.1")
    assert tcp_probe(locked, INTERNET_ADDR, 80, 1).outcome is DROPPED
    assert tcp_probe("host1", INTERNET_ADDR, 80, 1).outcome is REFUSED


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
    assert d.network_inspect("steady")["Driver"] == "plexus"


def test_removing_containers_and_networks_leaves_nothing(env: Env) -> None:
    d, a = env.docker, env.agent
    env.net("gone", "10.105.0.0/24")
    env.net("gone2", "10.106.0.0/24")
    d.run_http("g1", "gone", publish=["8090:80"])
    d.run("g2", "gone")
    d.connect("gone2", "g2")
    # what the removal must take back (so that this test cannot pass having removed nothing)
    assert len(store_rows(a.state_dir, "/plexus/endpoints/")) == 3
    assert len(store_rows(a.state_dir, "/plexus/ports/")) == 1
    assert len([l for l in links("host1") if l["ifname"].startswith("px")]) == 5
    assert any(nft_elements("host1").values())
    d.rm("g1", "g2")
    d.network_rm("gone", "gone2")
    assert store_rows(a.state_dir, "/plexus/endpoints/") == {}
    assert store_rows(a.state_dir, "/plexus/ipam/") == {}
    assert store_rows(a.state_dir, "/plexus/ports/") == {}
    assert set(store_rows(a.state_dir, "/plexus/networks/")) == {
        f"/plexus/networks/{n}" for n in BUILTIN_NETWORKS}
    assert store_rows(a.state_dir, "/plexus/subnets/") == {}
    assert wait_until(lambda: not [l for l in links("host1") if l["ifname"].startswith("px")])
    assert all(not v for v in nft_elements("host1").values())


def _resolve(agent: Agent, container: str, name: str) -> str:
    ns = agent.container(container)["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False).stdout
    return out.split()[0] if out else ""


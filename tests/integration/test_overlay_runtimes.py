"""One overlay network, several container runtimes, three hosts: a Docker container on host1 (a
dockerd in host1's namespaces, its network created with ``docker network create -d plexus
--ipam-driver plexus --subnet SUBNET -o plexus.name=ov``), a Podman container on host2 (the
plexus CNI plugin), a ``plexus run`` container on host3 and a ``plexus attach``-ed namespace on
host2 (and, in one test, a second dockerd on host3), the three agents sharing one real etcd.
Proven with TCP between every pair, each container's address read from its runtime and checked
against the blocks etcd (and every agent's ``network inspect``) says its own host holds, names
answered by the plexus DNS of the asking container's host, the links' MTU (the overlay's), and
removal by each runtime's own command taking the address back in etcd, on every agent and in
DNS.

``--subnet`` is needed: dockerd asks the IPAM driver for its pool before the network driver
sees ``-o plexus.name``, so without it Docker would pick another subnet (refused by name)."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from plexus.cni.install import install
from plexus.model import keys
from tests.harness.cluster import cluster
from tests.harness.docker import INDEX_HTML, Dockerd, DockerError
from tests.harness.etcd import EtcdCluster
from tests.harness.podman import Podman
from tests.harness.probes import (
    ANSWERED,
    DROPPED,
    UNREACHABLE,
    http_probe,
    tcp_probe,
    wait_for_answer,
)
from tests.harness.world import ECHO, Agent, World, nsexec

from .helpers import wait_until

pytestmark = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("dockerd", "podman", "etcd"))
    or not Path("/bin/busybox").exists(),
    reason="needs docker.io, podman, etcd-server and busybox-static (make deps)",
)

SUBNET = "10.78.0.0/24"
GATEWAY = "10.78.0.1"
BLOCK = 28  # /28 blocks: 16 addresses a host
NET = "ov"
OVERLAY_MTU = 1450  # the hosts' up0 (1500) less VXLAN's 50 bytes


@dataclass
class Env:
    world: World
    etcd: EtcdCluster
    agents: list[Agent]
    docker: Dockerd
    podman: Podman

    def at(self, host: str) -> Agent:
        return next(a for a in self.agents if a.host == host)


def _start_docker(env_tmp: Path, agent: Agent, etcd: EtcdCluster) -> Dockerd:
    docker = Dockerd(env_tmp / "docker", netns=agent.host,
                     plugins={"plexus": agent.docker_socket}, start_timeout=120)
    agent.start(extra=["--store", etcd.url, "--docker-api", str(docker.socket)])
    docker.start()
    docker.import_busybox()
    docker.network_create(NET, driver="plexus", ipam_driver="plexus", subnet=SUBNET,
                          options={"plexus.name": NET}, timeout=120)
    return docker


def _start_podman(env_tmp: Path, agent: Agent) -> Podman:
    bindir = env_tmp / "plexus-cni"
    install([str(bindir)])
    podman = Podman(env_tmp / "podman", netns=agent.host).setup()
    podman.add_plugin(bindir / "plexus")
    # The existing overlay by name only: the config describes no network to create.
    podman.write_conflist(NET, [{"type": "plexus", "socket": str(agent.socket)}],
                          cni_version="1.0.0")
    return podman


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="plexus-ovrt-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2", "host3"],
                         start=["host2", "host3"]) as (etcd, agents):
                yield from _runtimes(w, etcd, agents, Path(tmp))
        finally:
            w.close()


def _runtimes(w: World, etcd: EtcdCluster, agents: list[Agent], tmp: Path) -> Iterator[Env]:
    """The overlay and a container of each runtime; the runtimes stop while the agents still
    run (dockerd retries a plugin that is gone for ~15 s a call)."""
    docker: Dockerd | None = None
    podman: Podman | None = None
    try:
        agents[2].cli("network", "create", NET, "--driver", "overlay", "--subnet", SUBNET,
                      "--block-size", str(BLOCK))
        # host3's container first: it holds the subnet's first block, so an address that were
        # not taken from its own host's block would land there.
        agents[2].run_echo("p3", NET)
        docker = _start_docker(tmp, agents[0], etcd)
        docker.run_http("d1", NET)
        podman = _start_podman(tmp, agents[1])
        podman.run_http("m2", NET)
        yield Env(w, etcd, agents, docker, podman)
    finally:
        if docker is not None:
            docker.stop(check=False)
        if podman is not None:
            podman.close()


# -- what etcd and the runtimes say ------------------------------------------------------------


def _blocks(etcd: EtcdCluster) -> dict[str, list[ipaddress.IPv4Network]]:
    """host -> the blocks of the overlay it holds, read from etcd."""
    out = etcd.etcdctl("get", "--prefix", keys.host_blocks(SUBNET)).split()
    held: dict[str, list[ipaddress.IPv4Network]] = {}
    for key, node in zip(out[::2], out[1::2], strict=True):
        held.setdefault(node, []).append(
            ipaddress.IPv4Network(keys.segment_cidr(key.rsplit("/", 1)[1])))
    return held


def _claimed(etcd: EtcdCluster, ip: str) -> str:
    """Who holds ``ip`` in etcd ("" if nobody)."""
    return etcd.etcdctl("get", "--print-value-only", keys.ipam_addr(SUBNET, ip)).strip()


def _addresses(env: Env) -> dict[str, str]:
    """Each container's address as its own runtime reports it."""
    return {"d1": env.docker.ip("d1", NET), "m2": env.podman.ip("m2", NET),
            "p3": env.at("host3").address("p3", NET)}


def _inspect(agent: Agent) -> dict[str, Any]:
    return dict(json.loads(agent.cli("network", "inspect", NET).stdout))


def _ns(env: Env, name: str) -> str:
    """A path to the container's network namespace, usable from anywhere in the sandbox."""
    if name.startswith("d"):
        return env.docker.netns_path(name)
    if name.startswith("m"):
        return env.podman.netns_path(name)
    return env.at(f"host{name[-1]}").netns(name)


def _counted(agent: Agent, want: int) -> bool:
    return int(_inspect(agent)["endpoints"]) == want


def _count(env: Env, want: int) -> None:
    for agent in env.agents:
        assert wait_until(partial(_counted, agent, want), timeout=20), (
            agent.host, _inspect(agent))


def test_each_container_has_an_address_of_its_own_hosts_block(env: Env) -> None:
    held = _blocks(env.etcd)
    assert sorted(held) == ["host1", "host2", "host3"], held
    for name, ip in _addresses(env).items():
        host = f"host{name[-1]}"
        assert any(ipaddress.ip_address(ip) in b for b in held[host]), (name, ip, held)
        assert _claimed(env.etcd, ip), (name, ip)  # and etcd has it claimed
    _count(env, 3)  # every agent sees the three endpoints of the one network
    by_block = {str(b): host for host, blocks in held.items() for b in blocks}
    for agent in env.agents:  # and the blocks as etcd has them
        assert _inspect(agent)["blocks"] == by_block, agent.host


def test_every_container_reaches_every_other_over_tcp(env: Env) -> None:
    ips = _addresses(env)
    # plexus run's echo server names the client address it saw: no NAT between the hosts
    for client in ("d1", "m2"):
        runtime = env.docker if client == "d1" else env.podman
        got = runtime.exec(client, "sh", "-c", f"echo | timeout 5 nc {ips['p3']} 80",
                           check=False).stdout
        assert got.splitlines()[:1] == [f"p3 {ips[client]}"], (client, got)
    # busybox httpd in the Docker and Podman containers, fetched from the other two
    assert INDEX_HTML.strip() in env.docker.fetch("d1", f"http://{ips['m2']}/")
    assert INDEX_HTML.strip() in env.podman.fetch("m2", f"http://{ips['d1']}/")
    p3 = _ns(env, "p3")
    for server in ("d1", "m2"):
        got = wait_for_answer(partial(http_probe, p3, ips[server], 80), timeout=15)
        assert INDEX_HTML.strip() in got, (server, got)


def test_links_have_the_overlay_mtu_and_route_via_the_anycast_gateway(env: Env) -> None:
    for name in ("d1", "m2", "p3"):
        ns = _ns(env, name)
        [eth0] = json.loads(nsexec(ns, "ip", "-j", "link", "show", "dev", "eth0").stdout)
        assert eth0["mtu"] == OVERLAY_MTU, name
        [route] = json.loads(nsexec(ns, "ip", "-j", "route", "show", "default").stdout)
        assert route["gateway"] == GATEWAY, name


def _lookup(env: Env, client: str, name: str) -> str:
    """``nslookup NAME GATEWAY`` in a Docker or Podman container: the plexus DNS server of the
    container's own host (the anycast gateway is on every host's bridge)."""
    runtime = env.docker if client.startswith("d") else env.podman
    out = runtime.exec(client, "nslookup", name, GATEWAY, check=False).stdout
    return out.split("Name:", 1)[1] if "Name:" in out else ""


def _getent(env: Env, client: str, name: str) -> str:
    """glibc's resolver in a plexus container, with the resolv.conf plexus wrote for it."""
    ns = env.at("host3").container(client)["netns_name"]
    out = nsexec("host3", "ip", "netns", "exec", ns, "getent", "ahostsv4", name,
                 check=False).stdout
    return " ".join(sorted({line.split()[0] for line in out.splitlines()}))


def test_names_resolve_across_hosts(env: Env) -> None:
    ips = _addresses(env)
    # Docker's container name reaches plexus through dockerd's API, in the background
    assert wait_until(lambda: _getent(env, "p3", "d1") == ips["d1"], timeout=20), (
        _getent(env, "p3", "d1"))
    assert _getent(env, "p3", "m2") == ips["m2"]
    assert ips["p3"] in _lookup(env, "d1", "p3")
    assert ips["m2"] in _lookup(env, "d1", "m2")
    assert ips["d1"] in _lookup(env, "m2", "d1")
    assert ips["p3"] in _lookup(env, "m2", "p3")
    assert _getent(env, "p3", "nobody") == ""  # the control


def test_a_docker_network_for_the_overlay_needs_its_subnet(env: Env) -> None:
    """Without ``--subnet`` Docker's IPAM picks another subnet first: refused, naming the
    overlay's, and nothing of it is left in etcd."""
    before = env.etcd.etcdctl("get", "--prefix", "--keys-only", keys.SUBNETS).split()
    with pytest.raises(DockerError) as refused:
        env.docker.docker("network", "create", "-d", "plexus", "--ipam-driver", "plexus",
                          "-o", f"plexus.name={NET}", "ov-auto")
    assert SUBNET in str(refused.value), refused.value
    assert "ov-auto" not in env.docker.networks_list()
    after = env.etcd.etcdctl("get", "--prefix", "--keys-only", keys.SUBNETS).split()
    assert after == before
    pools = env.etcd.etcdctl("get", "--prefix", "--keys-only", keys.POOLS).split()
    assert pools == [keys.pool(SUBNET)], pools


def _gone_everywhere(env: Env, ip: str, clients: list[str]) -> None:
    """``ip`` is claimed by nobody in etcd, and unreachable from the other containers."""
    assert wait_until(lambda: _claimed(env.etcd, ip) == "", timeout=15), _claimed(env.etcd, ip)
    for client in clients:
        p = tcp_probe(_ns(env, client), ip, 80, timeout=1)
        assert p.outcome in (DROPPED, UNREACHABLE), (client, p)


def test_plexus_attach_joins_the_same_overlay_on_the_podman_host(env: Env) -> None:
    """A bare namespace wired with ``plexus attach`` on host2 (Podman's host), serving the echo
    server: the Docker container of host1 finds it by name and reaches it; detach frees it."""
    a2, d = env.at("host2"), env.docker
    ns = env.world.add_ns("att2")
    a2.cli("attach", "--netns", f"/run/netns/{ns}", "--id", "att2", "--network", NET,
           "--name", "att2")
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, ECHO, "att2", "80"],
                              start_new_session=True)
    try:
        ip = a2.address("att2", NET)
        assert any(ipaddress.ip_address(ip) in b for b in _blocks(env.etcd)["host2"]), ip
        assert wait_until(lambda: ip in _lookup(env, "d1", "att2"), timeout=20)
        mine = d.ip("d1", NET)
        assert wait_until(lambda: d.exec("d1", "sh", "-c", f"echo | timeout 5 nc {ip} 80",
                                         check=False).stdout.startswith(f"att2 {mine}"))
        a2.cli("detach", "--id", "att2", "--network", NET)
        _gone_everywhere(env, ip, ["d1", "p3"])
    finally:
        a2.cli("detach", "--id", "att2", "--network", NET, check=False)
        server.kill()
        server.wait(timeout=10)


def _pool_refs(env: Env) -> int:
    """How many Docker networks hold the overlay's IPAM pool, read from etcd."""
    value = env.etcd.etcdctl("get", "--print-value-only", keys.pool(SUBNET))
    return int(json.loads(value)["refs"])


def _in_own_block(env: Env, host: str, ip: str) -> bool:
    return any(ipaddress.ip_address(ip) in b for b in _blocks(env.etcd)[host])


def test_docker_on_a_second_host_shares_the_overlay_and_its_pool(
    env: Env, tmp_path: Path,
) -> None:
    """A second dockerd, on host3, with the same docker network create: its container gets an
    address of host3's block and talks to host1's Docker container; removing its container and
    its Docker network leaves host1's Docker network (the same IPAM pool, counted twice) as it
    was."""
    a3, d1 = env.at("host3"), env.docker
    with Dockerd(tmp_path / "docker3", netns="host3", plugins={"plexus": a3.docker_socket},
                 start_timeout=120) as d3:
        d3.import_busybox()
        d3.network_create(NET, driver="plexus", ipam_driver="plexus", subnet=SUBNET,
                          options={"plexus.name": NET}, timeout=120)
        assert _pool_refs(env) == 2  # one pool in etcd, held by both dockerds
        d3.run_http("e3", NET)
        ip, first = d3.ip("e3", NET), d1.ip("d1", NET)
        assert _in_own_block(env, "host3", ip), ip
        assert INDEX_HTML.strip() in d3.fetch("e3", f"http://{first}/")
        assert INDEX_HTML.strip() in d1.fetch("d1", f"http://{ip}/")
        d3.rm("e3")
        d3.network_rm(NET)
        _gone_everywhere(env, ip, ["d1", "p3"])
        assert _pool_refs(env) == 1
    d1.run_http("d1c", NET)  # host1's Docker network still hands out host1's addresses
    try:
        again = d1.ip("d1c", NET)
        assert _in_own_block(env, "host1", again), again
        assert INDEX_HTML.strip() in env.podman.fetch("m2", f"http://{again}/")
    finally:
        d1.rm("d1c")


def test_each_runtime_removing_its_container_releases_the_address_cluster_wide(
    env: Env,
) -> None:
    """Last in this module: it removes the containers (each after a second one, its
    replacement, to show the address is not reused while held and is released after)."""
    d, pm, a3 = env.docker, env.podman, env.at("host3")
    d.run_http("d1b", NET)
    pm.run_http("m2b", NET)
    a3.run_echo("p3b", NET)
    _count(env, 6)
    ips = _addresses(env)
    d.rm("d1")
    _gone_everywhere(env, ips["d1"], ["m2", "p3"])
    assert wait_until(lambda: _getent(env, "p3", "d1") == "")  # nor named on another host
    pm.rm("m2")
    _gone_everywhere(env, ips["m2"], ["d1b", "p3"])
    assert wait_until(lambda: _getent(env, "p3", "m2") == "")
    a3.cli("rm", "-f", "p3")
    _gone_everywhere(env, ips["p3"], ["d1b", "m2b"])
    assert wait_until(lambda: ips["p3"] not in _lookup(env, "m2b", "p3"))
    _count(env, 3)
    # the survivors still talk (the control for the probes above)
    survivor = a3.address("p3b", NET)
    assert tcp_probe(_ns(env, "m2b"), survivor, 80).outcome is ANSWERED
    assert INDEX_HTML.strip() in d.fetch("d1b", f"http://{pm.ip('m2b', NET)}/")

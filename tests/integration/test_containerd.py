"""plexus as containerd's CNI plugin: real `ctr run --cni` (Debian's containerd 1.6, runc),
containers from a locally imported busybox image, on a plexus network shared with Podman and
`plexus run` containers, all on one simulated host next to its agent."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.containerd import INDEX_HTML, Containerd, wait_listening
from tests.harness.podman import Podman
from tests.harness.probes import REFUSED, tcp_probe
from tests.harness.world import Agent, World, http_get, tcp_request

from .helpers import links, nft_elements, store_rows, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("ctr") is None
    or shutil.which("podman") is None
    or not Path("/bin/busybox").exists(),
    reason="needs containerd, podman, runc and busybox-static (make deps)",
)

NET = "pxnet"
SUBNET = "10.70.0.0/24"
STORE_PREFIXES = ("/plexus/endpoints/", "/plexus/ipam/", "/plexus/ports/")


def plexus_conf(agent: Agent, ports: dict[int, int] | None = None) -> dict[str, Any]:
    """The plexus plugin's entry of a conflist. ctr passes no capability arguments, so a port
    can only be published by a static ``runtimeConfig`` in the config itself."""
    conf: dict[str, Any] = {"type": "plexus", "socket": str(agent.socket)}
    if ports:
        conf["runtimeConfig"] = {"portMappings": [
            {"hostPort": h, "containerPort": c, "protocol": "tcp"} for h, c in ports.items()
        ]}  # fmt: skip
    return conf


@pytest.fixture
def agent(world: World) -> Agent:
    """host1's agent with a 1 s reconcile pass: ctr 1.6 never sends DEL for a detached
    container, and the reconciler is what releases it once its netns is gone."""
    a = world.add_host("host1", start_agent=False)
    a.start(extra=["--reconcile-interval", "1"])
    a.cli("network", "create", NET, "--subnet", SUBNET)
    return a


@pytest.fixture
def cd(agent: Agent, tmp_path: Path) -> Iterator[Containerd]:
    # containerd and ctr (hence the CNI plugin) in the simulated host's netns, with its agent
    with Containerd(tmp_path / "containerd", netns="host1") as c:
        subprocess.run(
            [sys.executable, "-m", "plexus.cni.install", str(c.cni_bin_dir)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        c.write_conflist(NET, [plexus_conf(agent)])
        yield c


def host_veths() -> set[str]:
    return {l["ifname"] for l in links("host1")
            if l.get("linkinfo", {}).get("info_kind") == "veth"}  # fmt: skip


def plexus_entry(agent: Agent, name: str) -> dict[str, Any] | None:
    return next((c for c in agent.json("ps") if c["name"] == name), None)


def store_claims(agent: Agent, cid: str, ip: str) -> dict[str, str]:
    """Every endpoint, address and port row of the store that names container ``cid`` or its
    address (read with sqlite3, not through plexus)."""
    rows: dict[str, str] = {}
    for prefix in STORE_PREFIXES:
        rows.update(store_rows(agent.state_dir, prefix))
    return {k: v for k, v in rows.items() if cid in k or cid in v or k.endswith(f"/{ip}")}


def nft_mentions(ip: str) -> list[str]:
    return [name for name, elems in nft_elements("host1").items() if ip in json.dumps(elems)]


def test_a_ctr_container_on_a_plexus_network(cd: Containerd, agent: Agent,
                                             tmp_path: Path) -> None:  # fmt: skip
    pid = cd.run("ctr1", "nc", "-ll", "-p", "80", "-e", "echo", "ctr1")
    cd.wait_listening("ctr1", 80)
    ip = cd.ip("ctr1")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET)
    # plexus lists it under the id ctr gives CNI (<namespace>-<id>), with that address
    entry = plexus_entry(agent, cd.cni_container_id("ctr1"))
    assert entry is not None and entry["owner"] == "cni"
    assert entry["netns"] == f"/proc/{pid}/ns/net"
    assert [(e["network"], e["addresses"]) for e in entry["endpoints"]] == [(NET, [f"{ip}/24"])]
    # the container's netns, read with ip -j, and busybox's ip inside the container agree
    assert cd.addresses("ctr1") == [f"{ip}/24"]
    assert f"inet {ip}/24" in cd.exec("ctr1", "ip", "-o", "-4", "addr", "show", "eth0").stdout

    # neighbours on the same plexus network: a Podman container and a `plexus run` one
    with Podman(tmp_path / "podman", netns="host1") as pm:
        pm.add_plugin(cd.cni_bin_dir / "plexus")
        pm.write_conflist(NET, [plexus_conf(agent)], cni_version="1.0.0")
        pm.run("pm1", NET, "nc", "-ll", "-p", "80", "-e", "echo", "pm1")
        assert wait_listening(pm.pid("pm1"), 80)
        agent.run_echo("native", NET)
        agent.wait_listening("native")
        pm1, native = pm.ip("pm1", NET), agent.address("native")

        def from_ctr(target: str) -> str:
            cmd = f"echo | timeout 10 nc {target} 80"
            return cd.exec("ctr1", "sh", "-c", cmd, check=False).stdout.strip()

        # real TCP, each way, each pair
        assert from_ctr(pm1) == "pm1"
        assert from_ctr(native).startswith("native")
        assert pm.exec("pm1", "sh", "-c", f"echo | timeout 10 nc {ip} 80").stdout.strip() == "ctr1"
        assert tcp_request(agent.netns("native"), ip, 80, timeout=10) == "ctr1"
        assert {pm1, native, ip} <= {
            e["addresses"][0].split("/")[0] for c in agent.json("ps") for e in c["endpoints"]
        }


def test_removal_releases_everything(cd: Containerd, agent: Agent, world: World) -> None:
    """``ctr run --rm`` (ctr sends DEL when the task ends) and ``ctr run -d`` + ``ctr task
    kill`` + ``ctr container rm`` (no DEL from ctr 1.6: the agent's reconciler releases the
    endpoint once /proc/PID/ns/net is gone). Each publishes a port, so it has nft elements."""
    before = host_veths()
    cd.write_conflist(NET, [plexus_conf(agent, ports={8081: 80})])
    cd.run_attached("att", "httpd", "-f", "-p", "80", "-h", "/www")
    cd.wait_listening("att", 80)
    cd.write_conflist(NET, [plexus_conf(agent, ports={8082: 80})])
    cd.run_http("det")
    made = {}
    for name, port in (("att", 8081), ("det", 8082)):
        cid, ip = cd.cni_container_id(name), cd.ip(name)
        entry = plexus_entry(agent, cid)
        assert entry is not None and entry["ports"] == [f"{port}:80/tcp"]
        veth = entry["endpoints"][0]["host_ifname"]
        assert veth in host_veths()
        assert len(store_claims(agent, cid, ip)) == 3  # endpoint, address, port
        assert nft_mentions(ip)
        assert INDEX_HTML in http_get("outside", world.host_addr("host1"), port, timeout=10)
        made[name] = (cid, ip, veth)

    assert cd.stop_attached("att") == 137
    cid, ip, veth = made["att"]
    assert plexus_entry(agent, cid) is None  # released by the DEL, before ctr returned
    assert store_claims(agent, cid, ip) == {} and nft_mentions(ip) == []
    assert wait_until(lambda: veth not in host_veths())

    cd.rm("det")
    cid, ip, veth = made["det"]
    assert wait_until(lambda: plexus_entry(agent, cid) is None, timeout=15)
    # Nobody waits on this release (the agent noticed the namespace was gone): the firewall
    # follows the store a moment later.
    assert store_claims(agent, cid, ip) == {} and wait_until(lambda: nft_mentions(ip) == [])
    assert wait_until(lambda: veth not in host_veths())

    assert cd.containers() == [] and agent.json("ps") == []
    assert host_veths() == before
    for prefix in STORE_PREFIXES:
        assert store_rows(agent.state_dir, prefix) == {}
    assert all(not v for k, v in nft_elements("host1").items() if k.startswith("pub"))
    # refused by the host (no DNAT left), where the same port answered before the removal
    assert tcp_probe("outside", world.host_addr("host1"), 8082, 1).outcome is REFUSED

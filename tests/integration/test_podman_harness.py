"""The real-Podman harness (tests.harness.podman), proven with the reference CNI plugins.

Podman 4.3 (Debian) + runc + the CNI backend, a conflist of ``bridge``/``host-local``/``portmap``
in our own config dir, containers from a locally imported busybox image. Oracles are the kernel
(``ip -j``, ``iptables-save``) and the files host-local keeps, never Podman's own view alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.podman import (
    CGROUP_PREFIX,
    CGROUP_ROOT,
    INDEX_HTML,
    REFERENCE_PLUGIN_DIR,
    Podman,
    bridge_plugins,
)

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or not Path("/bin/busybox").exists(),
    reason="needs podman, runc, netavark and busybox-static (make deps)",
)

NET = "refnet"
BRIDGE = "cni-ref0"
SUBNET = "10.89.77.0/24"
GATEWAY = "10.89.77.1"
# Default paths of Podman, libcni, host-local, runc and netavark: the harness writes none.
HOST_PATHS = (
    "/etc/cni",
    "/var/lib/cni",
    "/var/lib/containers",
    "/run/containers",
    "/run/libpod",
    "/run/runc",
    "/run/cni",
    "/etc/containers/networks",
    "/dev/shm/libpod_lock",
    "/var/tmp/containers",
)


def sh(*argv: str, timeout: float = 20) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True).stdout


def links() -> list[dict[str, Any]]:
    return list(json.loads(sh("ip", "-j", "-d", "link")))


def veths() -> set[str]:
    return {l["ifname"] for l in links() if l.get("linkinfo", {}).get("info_kind") == "veth"}


def reservations(pm: Podman, network: str = NET) -> list[str]:
    """host-local's per-address reservation files (it also keeps ``lock``/``last_reserved_ip``)."""
    d = pm.ipam_dir / network
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit())


def http_get(ip: str, port: int, timeout: float = 3) -> str:
    """GET / from this (the sandbox's) netns; the response body, "" on failure."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return ""
    return data.decode(errors="replace").partition("\r\n\r\n")[2]


def cgroups_left() -> list[Path]:
    """Our cgroup parents, and podman's default one (which the harness must never use)."""
    found = []
    for name in (f"{CGROUP_PREFIX}*", "libpod_parent"):
        found += [*CGROUP_ROOT.glob(name), *CGROUP_ROOT.glob(f"*/{name}")]
    return found


@pytest.fixture
def pm(tmp_path: Path) -> Iterator[Podman]:
    with Podman(tmp_path / "podman") as p:
        p.write_conflist(NET, bridge_plugins(NET, BRIDGE, SUBNET, ipam_dir=p.ipam_dir))
        yield p


def test_image_is_built_locally_and_nothing_is_pulled(pm: Podman) -> None:
    images = json.loads(pm.podman("images", "--format", "json").stdout)
    assert [n for i in images for n in i.get("Names", [])] == [pm.image]
    out = pm.podman("run", "--rm", "--network", "none", pm.image, "ls", "/bin").stdout.split()
    assert {"sh", "nc", "wget", "ping", "ip", "httpd", "sleep"} <= set(out)
    r = pm.podman("run", "--rm", "--pull", "never", "docker.io/library/alpine", check=False)
    assert r.returncode != 0  # no registry is contacted: the image simply is not there


def test_two_containers_reach_each_other_and_a_published_port(pm: Podman) -> None:
    pm.run("a", NET)
    pm.run_http("b", NET, publish=["8080:80"])
    a, b = pm.ip("a", NET), pm.ip("b", NET)
    assert a != b and a.startswith("10.89.77.") and b.startswith("10.89.77.")
    assert pm.sandbox_key("a").startswith("/run/netns/")
    assert os.path.exists(pm.sandbox_key("a"))

    assert pm.exec("a", "ping", "-c", "1", "-W", "2", b, check=False).returncode == 0
    assert pm.exec("b", "ping", "-c", "1", "-W", "2", a, check=False).returncode == 0
    assert pm.fetch("a", f"http://{b}/") == INDEX_HTML
    # the kernel agrees with podman inspect
    addr = json.loads(
        sh("nsenter", f"--net={pm.sandbox_key('a')}", "ip", "-j", "addr", "show", "eth0")
    )
    assert [i["local"] for i in addr[0]["addr_info"] if i["family"] == "inet"] == [a]

    # the published port, from the sandbox's own netns: localhost, the bridge address, direct
    assert http_get("127.0.0.1", 8080) == INDEX_HTML
    assert http_get(GATEWAY, 8080) == INDEX_HTML
    assert http_get(b, 80) == INDEX_HTML
    # and hairpin: a container reaching b through the host port
    assert pm.fetch("a", f"http://{GATEWAY}:8080/") == INDEX_HTML

    # a plain TCP echo with busybox nc, container to container (busybox: -ll, not -lk)
    pm.run("e", NET, "nc", "-ll", "-p", "7", "-e", "cat")
    e = pm.ip("e", NET)
    r = pm.exec("a", "sh", "-c", f"echo hello | timeout 5 nc {e} 7", check=False)
    assert r.stdout.strip() == "hello"


def test_removing_containers_leaves_nothing_behind(pm: Podman) -> None:
    before_veths = veths()
    pm.run("a", NET)
    pm.run_http("b", NET, publish=["8080:80"])
    ids = [pm.inspect(n)["Id"] for n in ("a", "b")]
    keys = [pm.sandbox_key(n) for n in ("a", "b")]
    assert len(veths() - before_veths) == 2
    assert len(reservations(pm)) == 2
    rules = sh("iptables-save")
    assert all(i in rules for i in ids) and "--dport 8080" in rules

    pm.rm("a", "b")
    assert pm.containers() == []
    assert veths() == before_veths
    assert reservations(pm) == []
    rules = sh("iptables-save")
    assert not any(i in rules for i in ids) and "--dport 8080" not in rules
    assert not any(os.path.exists(k) for k in keys)
    assert http_get("127.0.0.1", 8080, timeout=1) == ""
    # what stays is the reference bridge itself (the bridge plugin never deletes it)
    assert {l["ifname"] for l in links()} <= {"lo", BRIDGE}


def test_a_container_that_exits_is_cleaned_up_by_podmans_exit_command(tmp_path: Path) -> None:
    """conmon runs ``podman container cleanup``: it must see our containers.conf and env."""
    with Podman(tmp_path / "podman", env={"PLEXUS_MARK": "from-harness"}) as pm:
        log = pm.workdir / "mark.log"
        spy = pm.workdir / "refbridge"  # a plugin type only our plugin dir has
        spy.write_text(
            f'#!/bin/sh\necho "$CNI_COMMAND $PLEXUS_MARK" >> {log}\n'
            f"exec {REFERENCE_PLUGIN_DIR / 'bridge'}\n"
        )
        spy.chmod(0o755)
        pm.add_plugin(spy)
        plugins = bridge_plugins("only", "cni-only0", "10.89.78.0/24", ipam_dir=pm.ipam_dir)
        plugins[0]["type"] = "refbridge"
        pm.write_conflist("only", plugins)
        before = veths()
        pm.run("brief", "only", "sleep", "1")
        assert len(reservations(pm, "only")) == 1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (reservations(pm, "only") or veths() != before):
            time.sleep(0.2)
        assert reservations(pm, "only") == [] and veths() == before
        assert pm.inspect("brief")["State"]["Status"] == "exited"
        calls = [line for line in log.read_text().splitlines() if not line.startswith("VERSION")]
        assert calls == ["ADD from-harness", "DEL from-harness"]
        assert not Path("/dev/shm/libpod_lock").exists()  # cleanup used our file locks


def test_what_podman_sends_to_cni_plugins(pm: Podman) -> None:
    """Records Podman 4.3's side of the CNI protocol (what the plexus plugin will see)."""
    log = pm.workdir / "spy.jsonl"
    for name in ("bridge", "portmap"):
        spy = pm.workdir / f"spy-{name}"
        spy.write_text(
            "#!/bin/sh\nin=$(cat)\n"
            f'printf \'{{"plugin":"{name}","cmd":"%s","args":"%s","ifname":"%s","netns":"%s",'
            f'"path":"%s","stdin":%s}}\\n\' "$CNI_COMMAND" "$CNI_ARGS" "$CNI_IFNAME" '
            f'"$CNI_NETNS" "$CNI_PATH" "$in" >> {log}\n'
            f'printf "%s" "$in" | exec {REFERENCE_PLUGIN_DIR / name}\n'
        )
        spy.chmod(0o755)
        pm.add_plugin(spy, name)
    pm.run("a", NET, publish=["127.0.0.1:8080:80", "5353:53/udp"], extra=["--network-alias", "web"])
    pm.rm("a")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    cmds = [(c["plugin"], c["cmd"]) for c in calls if c["cmd"] != "VERSION"]
    assert cmds == [("bridge", "ADD"), ("portmap", "ADD"), ("portmap", "DEL"), ("bridge", "DEL")]
    assert {c["cmd"] for c in calls} == {"VERSION", "ADD", "DEL"}  # no CHECK, GC or STATUS
    version = next(c for c in calls if c["cmd"] == "VERSION")
    assert version["stdin"] == {"cniVersion": "1.0.0"} and version["netns"] == "dummy"
    add = next(c for c in calls if c["plugin"] == "portmap" and c["cmd"] == "ADD")
    assert add["args"] == "IgnoreUnknown=1;K8S_POD_NAME=a"
    assert add["ifname"] == "eth0" and add["netns"].startswith("/run/netns/netns-")
    assert add["path"] == str(pm.cni_plugin_dir)
    assert add["stdin"]["cniVersion"] == "1.0.0" and add["stdin"]["name"] == NET
    assert list(add["stdin"]["runtimeConfig"]) == ["portMappings"]  # order is not stable:
    assert sorted(add["stdin"]["runtimeConfig"]["portMappings"], key=lambda m: m["hostPort"]) == [
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"},
    ]
    assert "prevResult" in add["stdin"]
    bridge_add = next(c for c in calls if c["plugin"] == "bridge" and c["cmd"] == "ADD")
    assert "runtimeConfig" not in bridge_add["stdin"]  # only for declared capabilities
    dele = next(c for c in calls if c["plugin"] == "bridge" and c["cmd"] == "DEL")
    assert dele["stdin"]["prevResult"]["ips"][0]["address"].startswith("10.89.77.")


def test_podman_in_another_netns(tmp_path: Path) -> None:
    """``netns=``: bridge, veths and published ports live there, not in the caller's netns."""
    sh("ip", "netns", "add", "pmhost")
    try:
        sh("ip", "-n", "pmhost", "link", "set", "lo", "up")
        before = veths()
        with Podman(tmp_path / "podman", netns="pmhost") as p:
            p.write_conflist(NET, bridge_plugins(NET, BRIDGE, SUBNET, ipam_dir=p.ipam_dir))
            p.run_http("w", NET, publish=["8080:80"])
            inside = json.loads(sh("ip", "-n", "pmhost", "-j", "link"))
            assert BRIDGE in {l["ifname"] for l in inside}
            assert veths() == before
            r = subprocess.run(
                ["ip", "netns", "exec", "pmhost", "busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            assert r.stdout == INDEX_HTML
        inside = json.loads(sh("ip", "-n", "pmhost", "-j", "link"))
        assert {l["ifname"] for l in inside} == {"lo"}
    finally:
        subprocess.run(["ip", "netns", "del", "pmhost"], capture_output=True, timeout=10)


def test_netavark_and_no_network(tmp_path: Path) -> None:
    with Podman(tmp_path / "netavark", backend="netavark") as p:
        p.run("x", None)
        p.run_http("y", None)
        assert p.ip("x").startswith("10.88.")
        assert p.exec("x", "ping", "-c", "1", "-W", "2", p.ip("y"), check=False).returncode == 0
        assert p.fetch("x", f"http://{p.ip('y')}/") == INDEX_HTML
        # netns files live in the harness's private mount ns; /proc/PID/ns/net works anywhere
        netns = p.netns_path("x")
        addr = json.loads(sh("nsenter", f"--net={netns}", "ip", "-j", "-4", "addr"))
        assert p.ip("x") in {i["local"] for l in addr for i in l["addr_info"]}
        p.run("n", "none")
        assert p.networks("n") == {}
        out = p.exec("n", "ip", "-o", "link").stdout
        assert [line.split(":")[1].strip() for line in out.splitlines()] == ["lo"]
        p.rm("x", "y", "n")
        assert p.containers() == []


def test_nothing_is_written_outside_the_work_dir(tmp_path: Path) -> None:
    before = {p for p in HOST_PATHS if os.path.lexists(p)}
    cgroups_before = cgroups_left()
    for backend in ("cni", "netavark"):
        with Podman(tmp_path / backend, backend=backend) as p:
            net = None
            if backend == "cni":
                net = NET
                p.write_conflist(NET, bridge_plugins(NET, BRIDGE, SUBNET, ipam_dir=p.ipam_dir))
            p.run("a", net, publish=["8080:80"])
            p.run_rm(net)
            assert p.varlib_upper is not None and (p.varlib_upper / "cni").exists() == (
                backend == "cni"
            )
            p.podman("run", "--rm", "--network", "none", p.image, "true")  # raw run, too
            in_use = {c for c in cgroups_left() if c.name == p.cgroup_parent.lstrip("/")}
            assert in_use and not any(c.name == "libpod_parent" for c in cgroups_left())
        assert cgroups_left() == cgroups_before
        assert not (tmp_path / backend).exists() and not p.rundir.exists()
    after = {p for p in HOST_PATHS if os.path.lexists(p)}
    assert after == before, f"written on the host: {sorted(after - before)}"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "plexus-varlib" not in mounts and str(tmp_path) not in mounts


def test_run_rm_wall_time(pm: Podman, tmp_path: Path) -> None:
    """Smoke test for the bench helper: ``podman run --rm IMAGE true`` per network mode."""
    with Podman(tmp_path / "netavark", backend="netavark") as nv:
        times: dict[str, list[float]] = {"cni": [], "netavark": [], "none": []}
        for _ in range(3):
            times["cni"].append(pm.run_rm(NET))
            times["netavark"].append(nv.run_rm(None))
            times["none"].append(pm.run_rm("none"))
    medians = {k: statistics.median(v) for k, v in times.items()}
    print("podman run --rm true, median s:", {k: round(v, 3) for k, v in medians.items()})
    assert all(0 < m < 10 for m in medians.values())
    assert reservations(pm) == []

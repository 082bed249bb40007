"""The real-containerd harness (tests.harness.containerd), proven with the reference CNI plugins.

containerd 1.6 (Debian) + runc + ``ctr run --cni``, a conflist of ``bridge``/``host-local`` in
the harness's own config dir (bound over /etc/cni/net.d in its private mount namespace), a
busybox image imported from a locally built OCI archive. Oracles are the kernel (``ip -j``) and
the files host-local keeps, never ctr's own view alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.containerd import (
    CGROUP_PREFIX,
    CGROUP_ROOT,
    INDEX_HTML,
    REFERENCE_PLUGIN_DIR,
    Containerd,
    bridge_plugins,
    wait_listening,
)
from tests.harness.world import http_get, nsexec

from .helpers import wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("ctr") is None or not Path("/bin/busybox").exists(),
    reason="needs containerd, runc and busybox-static (make deps)",
)

NS = "ctrhost"
NET = "refnet"
BRIDGE = "cni-ref0"
SUBNET = "10.89.77.0/24"
GATEWAY = "10.89.77.1"
# Default paths of containerd, ctr, go-cni/libcni and host-local: the harness writes none.
HOST_PATHS = (
    "/etc/cni/net.d",
    "/opt/cni",
    "/opt/containerd",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/run/containerd",
)


def veths(ns: str = NS) -> set[str]:
    out = json.loads(nsexec(ns, "ip", "-j", "-d", "link").stdout)
    return {l["ifname"] for l in out if l.get("linkinfo", {}).get("info_kind") == "veth"}


def reservations(cd: Containerd, network: str = NET) -> list[str]:
    """host-local's per-address reservation files (it also keeps ``lock``/``last_reserved_ip``)."""
    d = cd.ipam_dir / network
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.is_dir() else []


def host_state() -> dict[str, list[str]]:
    """What the default paths hold, as seen from the sandbox (it shares the host's files)."""
    return {p: sorted(os.listdir(p)) if os.path.isdir(p) else [] for p in HOST_PATHS
            if os.path.lexists(p)}  # fmt: skip


def cgroups_left() -> list[Path]:
    return [*CGROUP_ROOT.glob(f"{CGROUP_PREFIX}*"), *CGROUP_ROOT.glob(f"*/{CGROUP_PREFIX}*")]


@pytest.fixture(scope="module")
def cd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """One containerd for the module, in a network namespace of its own."""
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=10)
    try:
        nsexec(NS, "ip", "link", "set", "lo", "up")
        with Containerd(tmp_path_factory.mktemp("ctr") / "containerd", netns=NS) as c:
            yield c
    finally:
        subprocess.run(["ip", "netns", "del", NS], timeout=10)


@pytest.fixture
def ref(cd: Containerd) -> Iterator[Containerd]:
    """``cd`` with the reference conflist; every container is gone afterwards."""
    cd.write_conflist(NET, bridge_plugins(NET, BRIDGE, SUBNET, ipam_dir=cd.ipam_dir))
    yield cd
    cd.rm(*cd.containers())


def test_the_image_is_built_locally_and_nothing_is_pulled(ref: Containerd) -> None:
    assert ref.images() == [ref.image]
    # unpacked by the snapshotter the harness picked (overlayfs where it works, else native)
    snapshots = ref.root / f"io.containerd.snapshotter.v1.{ref.snapshotter}" / "snapshots"
    assert list(snapshots.iterdir())
    out = ref.ctr(*ref.run_args("ls", "ls", "/bin", cni=False, extra=["--rm"])).stdout.split()
    assert {"sh", "nc", "wget", "ping", "ip", "httpd", "sleep"} <= set(out)
    r = ref.ctr("run", "--rm", "docker.io/library/alpine:latest", "pull", "true", check=False)
    assert r.returncode != 0 and "not found" in r.stderr  # no registry is contacted
    # without --cni a container has a network namespace of its own with only lo
    ref.run("lonely", cni=False)
    links = json.loads(nsexec(ref.netns_path("lonely"), "ip", "-j", "link").stdout)
    assert [l["ifname"] for l in links] == ["lo"]


def test_containers_get_addresses_and_answer_traffic(ref: Containerd) -> None:
    reserved = reservations(ref)
    ref.run_http("web")
    ref.run_attached("cli")
    web, cli = ref.ip("web"), ref.ip("cli")
    assert web != cli and web.startswith("10.89.77.") and cli.startswith("10.89.77.")
    assert set(reservations(ref)) - set(reserved) == {web, cli}
    # the kernel, read independently, agrees: eth0 of each container's netns
    assert ref.addresses("web") == [f"{web}/24"]
    # the reference bridge is in the harness's netns, not the caller's
    assert BRIDGE in {l["ifname"] for l in json.loads(nsexec(NS, "ip", "-j", "link").stdout)}
    # traffic: container to container, and from the host (the bridge's netns) to a container
    assert ref.exec("cli", "ping", "-c", "1", "-W", "5", web, check=False).returncode == 0
    assert ref.fetch("cli", f"http://{web}/") == INDEX_HTML
    assert INDEX_HTML in http_get(NS, web, 80, timeout=10)
    # a TCP echo with busybox nc (-ll: keep listening), answered by the other container
    ref.run("echo", "nc", "-ll", "-p", "7", "-e", "cat")
    ref.wait_listening("echo", 7)  # /proc/PID/net/tcp: a server that does not listen fails
    assert not wait_listening(ref.pid("cli"), 7, timeout=0.2)
    r = ref.exec("cli", "sh", "-c", f"echo hello | timeout 10 nc {ref.ip('echo')} 7", check=False)
    assert r.stdout.strip() == "hello"


def test_ctr_run_rm_sends_del_and_leaves_nothing(ref: Containerd) -> None:
    before, reserved = veths(), reservations(ref)  # detached containers leak (no DEL)
    ref.run_attached("brief")
    pid = ref.pid("brief")
    cgroup = ref.cgroups()[0] / "brief"
    veth = veths() - before
    assert len(veth) == 1 and cgroup.is_dir()
    assert set(reservations(ref)) - set(reserved) == {ref.ip("brief")}
    cache = ref.varlib_upper / "cni" / "results" / f"{NET}-{ref.cni_container_id('brief')}-eth0"
    assert cache.exists()  # libcni's cache landed in the overlay, not in /var/lib
    assert ref.stop_attached("brief") == 137  # SIGKILL: ctr exits with the task's status
    assert "brief" not in ref.containers() and "brief" not in ref.tasks()
    # the kernel deletes the veth with the netns, a moment after the task is gone
    assert wait_until(lambda: not veths() & veth)
    assert reservations(ref) == reserved
    assert not cache.exists() and not Path(f"/proc/{pid}").exists() and not cgroup.exists()


def test_what_ctr_sends_to_cni_plugins(cd: Containerd) -> None:
    """Records ctr 1.6's side of the CNI protocol (what the plexus plugin will see): ADD on
    ``ctr run``, DEL only when a foreground ``ctr run --rm`` ends, nothing for ``ctr task
    kill`` / ``container rm``."""
    log = cd.workdir / "spy.jsonl"
    spy = cd.workdir / "spy-bridge"
    spy.write_text(
        "#!/bin/sh\nin=$(cat)\n"
        '[ "$CNI_COMMAND" = VERSION ] || printf \'{"cmd":"%s","id":"%s","args":"%s",'
        '"ifname":"%s","netns":"%s","path":"%s","stdin":%s}\\n\' "$CNI_COMMAND" '
        '"$CNI_CONTAINERID" "$CNI_ARGS" "$CNI_IFNAME" "$CNI_NETNS" "$CNI_PATH" "$in" '
        f">> {log}\n"
        f'printf "%s" "$in" | exec {REFERENCE_PLUGIN_DIR / "bridge"}\n'
    )
    spy.chmod(0o755)
    cd.add_plugin(spy, "spybridge")
    plugins = bridge_plugins("spynet", "cni-spy0", "10.89.78.0/24", ipam_dir=cd.ipam_dir)
    plugins[0]["type"] = "spybridge"
    cd.write_conflist("spynet", plugins)
    try:
        cd.run("det")
        det_pid = cd.pid("det")
        cd.rm("det")
        cd.run_attached("att")
        att_pid = cd.pid("att")
        cd.stop_attached("att")
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(c["cmd"], c["id"]) for c in calls] == [
            ("ADD", "plexus-det"), ("ADD", "plexus-att"), ("DEL", "plexus-att"),
        ]  # fmt: skip
        add, dele = calls[1], calls[2]
        assert add["netns"] == f"/proc/{att_pid}/ns/net" and calls[0]["netns"].endswith(
            f"/{det_pid}/ns/net")
        assert dele["netns"] == ""  # ctr's DEL comes after the task (and its netns) is gone
        assert add["ifname"] == dele["ifname"] == "eth0"
        # Debian's containerd adds its plugin dir after go-cni's default
        assert add["path"] == "/opt/cni/bin:/usr/lib/cni" and add["args"] == ""
        stdin: dict[str, Any] = add["stdin"]
        assert stdin["cniVersion"] == "1.0.0" and stdin["name"] == "spynet"
        assert "runtimeConfig" not in stdin  # ctr passes no capability arguments
        assert "prevResult" in dele["stdin"]  # from libcni's cache (/var/lib/cni in the overlay)
        # the detached container never got a DEL: host-local still holds its address
        assert len(reservations(cd, "spynet")) == 1
    finally:
        cd.rm(*cd.containers())
        cd._ip("link", "del", "cni-spy0", check=False)


def test_nothing_is_written_outside_the_work_dir(tmp_path: Path) -> None:
    """A second containerd, with the native snapshotter, next to the module's: its own state,
    and after close() no process, mount, cgroup or file of it is left."""
    before = host_state()
    with Containerd(tmp_path / "native", snapshotter="native") as c:
        c.write_conflist(NET, bridge_plugins(NET, "cni-nat0", "10.89.79.0/24",
                                             ipam_dir=c.ipam_dir))  # fmt: skip
        c.run_http("a")
        c.run_attached("b")
        assert c.fetch("b", f"http://{c.ip('a')}/") == INDEX_HTML
        assert (c.root / "io.containerd.snapshotter.v1.native" / "snapshots").is_dir()
        assert host_state() == before  # nothing shows through the private mount namespace
        procs = c.namespace_pids()  # containerd, the shims
        assert len(procs) >= 3
        workdir, rundir, cgroup = c.workdir, c.rundir, c.cgroup_parent.lstrip("/")
        assert cgroup in {p.name for p in cgroups_left()}
    assert not [p for p in procs if Path(f"/proc/{p}").exists()]
    assert sorted(p.name for p in workdir.iterdir()) == ["logs"]
    assert not rundir.exists()
    assert host_state() == before
    assert cgroup not in {p.name for p in cgroups_left()}
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts

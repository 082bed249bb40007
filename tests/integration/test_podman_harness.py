"""The Podman harness (tests.harness.podman) drives the real Podman: one smoke test, with the
reference CNI plugins (bridge, host-local, portmap) and with netavark (the benchmarks' backend).
Podman itself is not under test; plexus as Podman's CNI plugin is test_podman.py.

Podman runs in a network namespace of its own, as the plexus tests run it in a World host.
Oracles: the kernel (``ip -j`` in the container's and the host's namespaces) and real traffic.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.podman import BUSYBOX, INDEX_HTML, Podman, bridge_plugins
from tests.harness.world import nsexec, sh

from .helpers import global_addresses

pytestmark = pytest.mark.skipif(
    shutil.which("podman") is None or not BUSYBOX.exists(),
    reason="needs podman, runc, netavark and busybox-static (make deps)",
)

NS = "pmhost"
NET = "refnet"


@pytest.fixture
def netns() -> Iterator[str]:
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        yield NS
    finally:
        sh("ip", "netns", "del", NS, check=False)


def links(ns: str) -> set[str]:
    return {link["ifname"] for link in json.loads(nsexec(ns, "ip", "-j", "link").stdout)}


@pytest.mark.parametrize("backend", ["cni", "netavark"])
def test_the_harness_drives_podman(tmp_path: Path, netns: str, backend: str) -> None:
    with Podman(tmp_path / "podman", netns=netns, backend=backend) as pm:
        net = None
        if backend == "cni":
            net = NET
            pm.write_conflist(NET, bridge_plugins(NET, "cni-ref0", "10.89.77.0/24",
                                                  ipam_dir=pm.ipam_dir))
        pm.run("a", net)
        pm.run_http("b", net)
        b = pm.ip("b", net)
        assert f"{b}/{16 if net is None else 24}" in global_addresses(pm.netns_path("b"))
        assert pm.fetch("a", f"http://{b}/") == INDEX_HTML
        assert len(links(netns)) > 1  # the bridge and the veths are in pmhost
        pm.rm("a", "b")
        assert pm.containers() == []
    assert links(netns) == {"lo"}  # close() removed the bridge too

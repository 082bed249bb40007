"""The Docker harness (tests.harness.docker) drives a real dockerd: one smoke test with Docker's
own bridge driver. Docker itself is not under test; plexus as Docker's driver is test_docker.py.

A private dockerd (Debian's docker.io, its containerd, runc) in a network namespace of its own,
containers from the locally imported busybox image. Oracles: the kernel (``ip -j`` in the
container's namespace), real traffic, and the process, mount and cgroup tables afterwards.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.docker import BUSYBOX, INDEX_HTML, Dockerd
from tests.harness.world import http_get, sh

from .helpers import global_addresses

pytestmark = pytest.mark.skipif(
    shutil.which("dockerd") is None or not BUSYBOX.exists(),
    reason="needs docker.io and busybox-static (make deps)",
)

NS = "dkhost"


@pytest.fixture
def netns() -> Iterator[str]:
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        yield NS
    finally:
        sh("ip", "netns", "del", NS, check=False)


def test_the_harness_drives_a_real_dockerd(tmp_path: Path, netns: str) -> None:
    d = Dockerd(tmp_path / "docker", netns=netns)
    with d:
        d.import_busybox()
        d.network_create("refnet", subnet="10.91.7.0/24")
        d.run("ca", "refnet")
        d.run_http("cb", "refnet", publish=["8080:80"])
        cb = d.ip("cb", "refnet")
        assert f"{cb}/24" in global_addresses(d.netns_path("cb"))  # the kernel agrees
        assert d.fetch("ca", f"http://{cb}/") == INDEX_HTML
        assert INDEX_HTML in http_get(netns, "127.0.0.1", 8080)  # published on dkhost
        d.rm("ca", "cb")
        d.network_rm("refnet")
        assert d.containers() == []
    assert d.leftovers() == {}  # no process, mount, cgroup or run dir of it
    assert not d.data_root.exists()
    assert os.listdir("/run/docker/plugins") == []

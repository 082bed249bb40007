"""The containerd harness (tests.harness.containerd) drives the real containerd: one smoke test
of ``ctr run --cni`` with the reference CNI plugins (bridge, host-local). containerd itself is
not under test; plexus as containerd's CNI plugin is test_containerd.py.

containerd runs in a network namespace of its own, as the plexus tests run it in a World host.
Oracles: the kernel (``ip -j`` in the container's namespace), host-local's reservation files,
real traffic, and the process table afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.containerd import INDEX_HTML, Containerd, bridge_plugins
from tests.harness.image import BUSYBOX
from tests.harness.world import http_get, sh

pytestmark = pytest.mark.skipif(
    shutil.which("ctr") is None or not BUSYBOX.exists(),
    reason="needs containerd, runc and busybox-static (make deps)",
)

NS = "ctrhost"
NET = "refnet"


@pytest.fixture
def netns() -> Iterator[str]:
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        yield NS
    finally:
        sh("ip", "netns", "del", NS, check=False)


def reservations(cd: Containerd) -> list[str]:
    """host-local's per-address reservation files."""
    d = cd.ipam_dir / NET
    return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.is_dir() else []


def test_the_harness_drives_a_real_containerd(tmp_path: Path, netns: str) -> None:
    with Containerd(tmp_path / "containerd", netns=netns) as cd:
        cd.write_conflist(NET, bridge_plugins(NET, "cni-ref0", "10.89.77.0/24",
                                              ipam_dir=cd.ipam_dir))
        cd.run_http("web")
        cd.run_attached("cli")
        web, cli = cd.ip("web"), cd.ip("cli")
        assert cd.addresses("web") == [f"{web}/24"]  # the kernel, in the container's netns
        assert reservations(cd) == sorted([web, cli])
        assert cd.fetch("cli", f"http://{web}/") == INDEX_HTML
        assert INDEX_HTML in http_get(netns, web, 80, timeout=10)  # from the host's side
        assert cd.stop_attached("cli") == 137  # ctr run --rm: the DEL released its address
        assert reservations(cd) == [web]
        procs = cd.namespace_pids()
        assert procs
    assert not [p for p in procs if Path(f"/proc/{p}").exists()]

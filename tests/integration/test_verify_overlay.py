"""`plexus verify` across hosts: two hosts sharing etcd, an overlay network with a container on
each, and a bridge network on host1. host1's verify probes the pairs whose source is on host1
(host2's are host2's to verify). An overlay FDB entry, then a block route, deleted on host1
behind its agent's back: verify there names the pair to host2's container (exit 1), and after
`plexus reconcile` repairs the entry, verify is clean again."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, DROPPED, tcp_probe
from tests.harness.world import Agent, World, nsexec

from .helpers import disagreements, probe_of, verify, wait_until

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd-server")


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Agent, Agent]]:
    with tempfile.TemporaryDirectory(prefix="plexus-verify-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            with cluster(w, Path(tmp), ["host1", "host2"]) as (_, (a1, a2)):
                a1.cli("network", "create", "ov", "--driver", "overlay", "--subnet",
                       "10.78.0.0/24", "--block-size", "28")
                assert wait_until(lambda: "ov" in {n["name"] for n in a2.json("network", "ls")})
                a1.cli("network", "create", "br", "--subnet", "10.79.0.0/24")
                a1.run_echo("c1", "ov")
                a1.run_echo("d1", "br")
                a2.run_echo("c2", "ov")
                for agent, name in ((a1, "c1"), (a1, "d1"), (a2, "c2")):
                    agent.wait_listening(name)
                yield a1, a2
        finally:
            w.close()


def _json(host: str, *argv: str) -> list[dict[str, Any]]:
    return list(json.loads(nsexec(host, *argv).stdout or "[]"))


def _device(host: str) -> str:
    [link] = _json(host, "ip", "-j", "-d", "link", "show", "type", "vxlan")
    return str(link["ifname"])


def _fdb(host: str) -> list[tuple[str, str]]:
    return sorted((e["mac"], e["dst"]) for e in _json(host, "bridge", "-j", "fdb", "show",
                                                      "dev", _device(host)) if "dst" in e)


def _routes(host: str) -> list[str]:
    return sorted(r["dst"] for r in _json(host, "ip", "-j", "route", "show", "dev",
                                          _device(host)))


def _c2_from_c1(a1: Agent, a2: Agent) -> Any:
    return tcp_probe(a1.netns("c1"), a2.address("c2"), 80, 1).outcome


def test_each_host_verifies_the_pairs_whose_source_it_holds(hosts: tuple[Agent, Agent]) -> None:
    a1, a2 = hosts
    code, report = verify(a1)
    assert code == 0, report["mismatches"]
    assert {p["from"] for p in report["probes"]} == {"c1", "d1"}
    across = probe_of(report, "c1", "c2", 80)
    assert (across["expected"], across["observed"], across["to_node"]) == (
        "reachable", "reachable", "host2")
    assert probe_of(report, "d1", "c2", 80)["reason"] == "isolation: networks br and ov"
    assert any("another host" in n for n in report["notes"])
    code, report = verify(a2)
    assert code == 0 and {p["from"] for p in report["probes"]} == {"c2"}
    assert not [p for p in report["probes"] if p["to"] == "d1"]  # host1's bridge: not shared


@pytest.mark.parametrize("kind", ["fdb", "route"])
def test_a_deleted_overlay_entry_is_named_and_reconcile_repairs_it(
        hosts: tuple[Agent, Agent], kind: str) -> None:
    a1, a2 = hosts
    device, before = _device("host1"), (_fdb("host1"), _routes("host1"))
    assert before[0] and before[1]
    if kind == "fdb":
        mac, dst = before[0][0]
        nsexec("host1", "bridge", "fdb", "del", mac, "dev", device, "dst", dst)
    else:
        nsexec("host1", "ip", "route", "del", before[1][0], "dev", device)
    assert (_fdb("host1"), _routes("host1")) != before
    assert _c2_from_c1(a1, a2) is DROPPED  # our own traffic: host2's container is cut off
    code, report = verify(a1)
    assert code == 1 and disagreements(report) == {("c1", "c2", 80)}
    a1.cli("reconcile")
    assert wait_until(lambda: (_fdb("host1"), _routes("host1")) == before)
    assert _c2_from_c1(a1, a2) is ANSWERED
    assert verify(a1)[0] == 0

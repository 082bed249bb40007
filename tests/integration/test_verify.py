"""`plexus verify` on one host: a clean world verifies clean (exit 0), and a kernel broken on
purpose behind the agent's back (a published port's element deleted from `table inet plexus`)
is named pair by pair (exit 1), checked against traffic of our own; after `plexus reconcile`
repairs it, it is clean again. (test_verify_policy.py breaks `table inet plexus_policy`,
test_verify_overlay.py an overlay's FDB entry and route.)

    network a (10.71.0.0/24): a1 (-p 8080:80), a2, a3     network b: b1     internal i: i1
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.harness.probes import ANSWERED, DROPPED, REFUSED, tcp_probe
from tests.harness.world import Agent, World, nsexec

from .helpers import disagreements, elements_of, probe_of, verify, wait_until

GATEWAY_B = "10.72.0.1"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    world = World(tmp_path_factory.mktemp("verify") / "world")
    try:
        a = world.add_host("host1")
        a.cli("network", "create", "a", "--subnet", "10.71.0.0/24")
        a.cli("network", "create", "b", "--subnet", "10.72.0.0/24")
        a.cli("network", "create", "i", "--subnet", "10.73.0.0/24", "--internal")
        a.run_echo("a1", "a", "-p", "8080:80")
        a.run_echo("a2", "a", "--expose", "81/udp", ports=(80, 81))
        a.run_echo("a3", "a")
        a.run_echo("b1", "b")
        a.run_echo("i1", "i")
        for name in ("a1", "a2", "a3", "b1", "i1"):
            a.wait_listening(name)
        yield a
    finally:
        world.close()


def test_a_clean_world_verifies_clean_with_every_kind_of_expectation(agent: Agent) -> None:
    code, report = verify(agent)
    assert code == 0 and report["agrees"] and report["mismatches"] == []
    assert report["counts"]["disagree"] == 0 and report["counts"]["agree"] > 0
    same = probe_of(report, "a2", "a1", 80)
    assert (same["expected"], same["observed"], same["outcome"]) == (
        "reachable", "reachable", "connected")
    apart = probe_of(report, "a1", "b1", 80)
    assert (apart["expected"], apart["observed"]) == ("blocked", "blocked")
    assert apart["reason"] == "isolation: networks a and b"
    assert probe_of(report, "b1", "i1", 80)["reason"] == "internal network i"
    udp = probe_of(report, "a1", "a2", 81, "udp")  # the echo answers: reached, decided
    assert (udp["observed"], udp["agrees"]) == ("reachable", True)
    [pub] = [p for p in report["probes"] if p["port"] == 8080]
    assert pub["reason"].startswith("published port 8080 -> a1:80")
    assert pub["from_network"] == "b" and pub["agrees"] is True  # through the host, DNATed
    # The probes say what our own traffic sees.
    assert tcp_probe(agent.netns("a1"), agent.address("b1"), 80, 1).outcome is DROPPED
    assert tcp_probe(agent.netns("b1"), GATEWAY_B, 8080, 1).outcome is ANSWERED
    r = agent.cli("verify", "--network", "b", check=False)
    assert r.returncode == 0 and "the kernel agrees with the model" in r.stdout


def _neighbours(agent: Agent, name: str) -> set[str]:
    return {n["dst"] for n in json.loads(nsexec(agent.netns(name), "ip", "-j", "neigh").stdout)}


def test_verify_takes_back_the_neighbour_entries_its_probes_made(agent: Agent) -> None:
    """a2 and a3 talk only in verify's probes: neither keeps an entry for the other (the
    kernel's neighbour tables are shared by every namespace: observe/neigh.py)."""
    a2, a3 = agent.address("a2"), agent.address("a3")
    assert verify(agent)[0] == 0
    assert a3 not in _neighbours(agent, "a2") and a2 not in _neighbours(agent, "a3")
    assert tcp_probe(agent.netns("a2"), a3, 80, 1).outcome is ANSWERED  # what a probe leaves
    assert a3 in _neighbours(agent, "a2") and a2 in _neighbours(agent, "a3")


def _published() -> list[object]:
    return elements_of("host1", "map", "plexus", "pub4_any_addr")


def test_a_deleted_published_port_element_is_named_and_the_full_pass_repairs_it(
        agent: Agent) -> None:
    assert _published()
    nsexec("host1", "nft", "delete", "element", "inet", "plexus", "pub4_any_addr",
           "{ tcp . 8080 }")
    assert not _published()
    # Our own traffic: the host answers for the port now (refused), a1 does not.
    assert tcp_probe(agent.netns("b1"), GATEWAY_B, 8080, 1).outcome is REFUSED
    code, report = verify(agent)
    assert code == 1 and not report["agrees"]
    assert disagreements(report) == {("b1", "a1", 8080)}
    [bad] = report["mismatches"]
    assert (bad["expected"], bad["observed"], bad["outcome"]) == ("reachable", "blocked",
                                                                  "refused")
    assert "published port 8080 -> a1:80" in bad["reason"]
    text = agent.cli("verify", check=False)
    assert text.returncode == 1 and "FAIL b1 -> a1" in text.stdout
    assert "1 DISAGREE" in text.stdout
    agent.cli("reconcile")
    assert wait_until(lambda: bool(_published()), timeout=10)
    assert verify(agent)[0] == 0


def test_bad_input_is_one_line_and_an_unknown_network_is_not_verified(agent: Agent) -> None:
    r = agent.cli("verify", "--network", "nope", check=False)
    assert r.returncode == 3 and r.stderr.strip() == "plexus: network 'nope' not found"
    r = agent.cli("verify", "--timeout", "0", check=False)
    assert r.returncode == 2 and "invalid timeout" in r.stderr

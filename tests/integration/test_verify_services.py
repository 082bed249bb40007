"""`plexus verify` with services: a client on a service's network reaches its VIP, a client on
another network does not, a service without endpoints refuses; the VIP's elements deleted from
`table inet plexus_services` behind the agent's back are named as the broken pair (exit 1),
checked against traffic of our own; after the agent repairs the table, verify is clean again.

    network a (10.75.0.0/24): web1, web2 (app=web), cli     network b: stranger
    service web (app=web, 80/tcp), service nobody (app=none, 80/tcp)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.probes import ANSWERED, REFUSED, tcp_probe
from tests.harness.world import Agent, World, nsexec

from .helpers import disagreements, probe_of, verify

pytestmark = pytest.mark.privileged
# Seconds between the agent's periodic passes, which would repair the table too: long enough
# that the broken state lasts until the test asks `plexus reconcile` to repair it.
INTERVAL = 600.0
TABLE = ("inet", "plexus_services")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, str, str]]:
    world = World(tmp_path_factory.mktemp("verify-svc") / "world")
    try:
        a = world.add_host("host1", start_agent=False)
        a.start(extra=["--reconcile-interval", str(INTERVAL)])
        a.cli("network", "create", "a", "--subnet", "10.75.0.0/24")
        a.cli("network", "create", "b", "--subnet", "10.76.0.0/24")
        for name in ("web1", "web2"):
            a.run_echo(name, "a", "--label", "app=web")
        a.run_echo("cli", "a")
        a.run_echo("stranger", "b")
        for name in ("web1", "web2", "cli", "stranger"):
            a.wait_listening(name)
        vips = [_vip(a, name, selector) for name, selector in (("web", "app=web"),
                                                               ("nobody", "app=none"))]
        yield a, vips[0], vips[1]
    finally:
        world.close()


def _vip(agent: Agent, name: str, selector: str) -> str:
    out = agent.cli("service", "create", name, "--network", "a", "--selector", selector,
                    "--port", "80").stdout.split()
    return out[1].split(",")[0]


def _elements_with(address: str) -> list[tuple[str, Any]]:
    """(set or map name, key) of every element of the services table whose key holds
    ``address``, whatever the table's layout (any set or map, any concatenation); none while
    the table is gone."""
    out = nsexec("host1", "nft", "-j", "list", "table", *TABLE, check=False)
    if out.returncode != 0:
        return []
    listed = json.loads(out.stdout)
    found = []
    for obj in listed["nftables"]:
        body = obj.get("set") or obj.get("map")
        for elem in (body or {}).get("elem", []) or []:
            key = elem[0] if "map" in obj else elem  # a map lists [key, value]
            if isinstance(key, dict) and "elem" in key:  # an element with options
                key = key["elem"]["val"]
            if address in json.dumps(key):
                found.append((body["name"], key))
    return found


def _delete(elements: list[tuple[str, Any]]) -> None:
    """Delete elements the way someone would behind the agent's back: one nft batch."""
    batch = {"nftables": [{"delete": {"element": {"family": TABLE[0], "table": TABLE[1],
                                                  "name": name, "elem": [key]}}}
                          for name, key in elements]}
    subprocess.run(["ip", "netns", "exec", "host1", "nft", "-j", "-f", "-"],
                   input=json.dumps(batch), text=True, check=True, timeout=30)


def test_a_clean_world_verifies_clean_with_the_services(lab: tuple[Agent, str, str]) -> None:
    agent, vip, empty = lab
    code, report = verify(agent)
    assert code == 0, report["mismatches"]
    through = probe_of(report, "cli", "default/web", 80)
    assert (through["expected"], through["observed"], through["agrees"]) == (
        "reachable", "reachable", True)
    assert through["address"] == vip and through["service"] == "default/web"
    assert through["reason"].startswith("service default/web (2 ready)")
    apart = probe_of(report, "stranger", "default/web", 80)
    assert (apart["expected"], apart["observed"], apart["agrees"]) == ("blocked", "blocked",
                                                                      True)
    assert apart["reason"] == "isolation: networks b and a (service default/web's VIP)"
    refused = probe_of(report, "cli", "default/nobody", 80)
    assert (refused["expected"], refused["observed"], refused["agrees"]) == (
        "refused", "refused", True)
    assert refused["address"] == empty
    # The endpoints are no clients of their own service.
    assert not [p for p in report["probes"]
                if p["service"] == "default/web" and p["from"].startswith("web")]
    assert tcp_probe(agent.netns("cli"), vip, 80, 1).outcome is ANSWERED  # what it says


def test_a_deleted_vip_element_is_named_and_verify_is_clean_after_the_repair(
        lab: tuple[Agent, str, str]) -> None:
    agent, vip, _ = lab
    elements = _elements_with(vip)
    assert elements, "no element of the services table holds the VIP"
    _delete(elements)
    assert _elements_with(vip) == []
    assert tcp_probe(agent.netns("cli"), vip, 80, 1).outcome is not ANSWERED  # our own traffic
    code, report = verify(agent)
    assert code == 1 and not report["agrees"]
    assert disagreements(report) == {("cli", "default/web", 80)}
    [bad] = report["mismatches"]
    assert (bad["expected"], bad["observed"]) == ("reachable", "blocked")
    text = agent.cli("verify", check=False)
    assert text.returncode == 1 and "FAIL cli -> default/web" in text.stdout
    agent.cli("reconcile")  # checks the services table's elements before it answers
    assert _elements_with(vip)
    assert tcp_probe(agent.netns("cli"), vip, 80, 2).outcome is ANSWERED
    code, report = verify(agent)
    assert code == 0, report["mismatches"]


def test_an_empty_services_missing_reject_is_named(lab: tuple[Agent, str, str]) -> None:
    """The reset of a service without endpoints is itself an element: without it the VIP is
    silent (or unreachable), which verify reports as a disagreement."""
    agent, _, empty = lab
    elements = _elements_with(empty)
    assert elements
    assert tcp_probe(agent.netns("cli"), empty, 80, 1).outcome is REFUSED
    _delete(elements)
    try:
        code, report = verify(agent)
        # Both clients on its network (web1 backs another service, not this one).
        assert code == 1 and disagreements(report) == {("cli", "default/nobody", 80),
                                                       ("web1", "default/nobody", 80)}
        assert all(bad["expected"] == "refused" and bad["observed"] != "refused"
                   for bad in report["mismatches"])
    finally:
        agent.cli("reconcile")
    assert _elements_with(empty)
    assert verify(agent)[0] == 0

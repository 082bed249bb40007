"""`plexus host`: an agent lists its own host (alive, its underlay address from the default
route, its endpoints), refuses an --advertise-address the host lacks, and is the same agent,
alive again, after a restart."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tests.harness.world import VENV_BIN, Agent, World, netns_path


def hosts(agent: Agent) -> list[dict[str, Any]]:
    found = agent.json("host", "ls")
    assert isinstance(found, list)
    return found


def test_an_agent_lists_its_host_with_the_default_routes_address(agent: Agent) -> None:
    [me] = hosts(agent)
    assert (me["name"], me["alive"], me["endpoints"]) == ("host1", True, 0)
    assert me["address"] == "203.0.113.1"  # up0 holds host1's default route (the harness)
    agent.cli("network", "create", "web", "--subnet", "10.71.0.0/24")
    agent.run_echo("a", "web")
    assert hosts(agent)[0]["endpoints"] == 1
    table = agent.cli("host", "ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "ADDRESS", "ENDPOINTS", "BLOCKS", "SINCE"]
    assert table[1].split()[:5] == ["host1", "alive", "203.0.113.1", "1", "0/0"]


def test_an_agent_refuses_an_advertise_address_the_host_lacks(
    world: World, tmp_path: Path
) -> None:
    world.add_host("host1", start_agent=False)
    argv = ["nsenter", f"--net={netns_path('host1')}", "--", str(VENV_BIN / "plexus"),
            "--socket", str(tmp_path / "a.sock"), "agent", "--state-dir", str(tmp_path / "s"),
            "--advertise-address", "198.51.100.9", "--docker-plugin-socket", "",
            "--docker-api", ""]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "plexus: invalid advertise-address '198.51.100.9': not an address of this host"]


def test_a_restarted_agent_is_the_same_agent_alive_again(agent: Agent) -> None:
    first = hosts(agent)[0]
    agent.kill(15)
    agent.start()
    [me] = hosts(agent)
    assert me["alive"] and me["agent_id"] == first["agent_id"]
    assert me["started"] > first["started"]

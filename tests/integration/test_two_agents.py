"""A second agent never destroys the first: it refuses to start, with one line saying why, when
the first holds its network namespace, its socket or its state directory; and the first keeps
its links, its socket and its answers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness.world import VENV_BIN, Agent, netns_path

from .helpers import plexus_links


def second_agent(
    host: str, socket: Path, state: Path, plugin: Path
) -> subprocess.CompletedProcess[str]:
    argv = ["nsenter", f"--net={netns_path(host)}", "--", str(VENV_BIN / "plexus"),
            "--socket", str(socket), "agent", "--state-dir", str(state),
            "--docker-plugin-socket", str(plugin), "--docker-api", ""]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("share", ["netns", "socket", "state", "plugin-socket"])
def test_a_second_agent_refuses_and_the_first_keeps_everything(
    agent: Agent, tmp_path: Path, share: str
) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.58.0.0/24")
    agent.run_echo("a", "web")
    links_before = plexus_links("host1")
    world_ns = "host1"
    if share != "netns":
        subprocess.run(["ip", "netns", "add", "elsewhere"], check=True)
        world_ns = "elsewhere"
    socket = agent.socket if share == "socket" else tmp_path / "b.sock"
    state = agent.state_dir if share == "state" else tmp_path / "b-state"
    plugin = agent.docker_socket if share == "plugin-socket" else tmp_path / "b-plugin.sock"
    try:
        r = second_agent(world_ns, socket, state, plugin)
    finally:
        subprocess.run(["ip", "netns", "del", "elsewhere"], check=False)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plexus: "), r.stderr
    why = {"netns": "already manages this network namespace", "socket": "already serves",
           "state": "is running with state directory", "plugin-socket": "already serves"}
    assert why[share] in lines[0]
    # The first agent is untouched: same links, its socket answers, its plugin socket is there.
    assert plexus_links("host1") == links_before
    assert agent.json("network", "ls")
    assert agent.socket.is_socket() and agent.docker_socket.is_socket()
    assert not (tmp_path / "b.sock").exists()

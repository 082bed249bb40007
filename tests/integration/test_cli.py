"""The `plexus` command as a user types it, against a sandboxed agent: what it prints, its exit
code, and what the kernel (or the agent's process) holds afterwards, read independently."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from pathlib import Path
from typing import IO

import pytest

from tests.harness.world import VENV_BIN, Agent, World, nsexec, sh

from .helpers import plexus_links, wait_until

PLEXUS = str(VENV_BIN / "plexus")


def popen(agent: Agent, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PLEXUS, "--socket", str(agent.socket), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_line(stream: IO[bytes] | None, timeout: float = 20.0) -> bytes:
    """What a running command printed up to the end of its first line (b"" if no line comes
    within ``timeout``), read from the pipe itself so that communicate() gets the rest."""
    assert stream is not None
    got = b""
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([stream], [], [], timeout)
        chunk = os.read(stream.fileno(), 1) if ready else b""
        if not chunk:
            return got
        got += chunk
    return got


def global_addresses(ip_json: str) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for link in json.loads(ip_json)
            for a in link["addr_info"] if a.get("scope") == "global"}


def waiting_script(go: Path, before: str, after: str, code: int) -> str:
    """A container's shell script: print ``before``, wait (bounded: 20 s) until ``go`` exists,
    print ``after``, exit with ``code``."""
    return (f"{before}; i=0; while [ ! -e {go} ] && [ $i -lt 400 ]; do sleep 0.05; "
            f"i=$((i+1)); done; {after}; exit {code}")


# -- everything `ps` lists -----------------------------------------------------------------------


def test_everything_ps_lists_is_inspectable_and_execable_by_name_or_id(
    agent: Agent, world: World
) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.50.0.0/24")
    world.add_ns("foreign")
    agent.cli("attach", "--netns", "/run/netns/foreign", "--id", "ctr1", "--network", "web")
    agent.run_echo("api", "web")
    rows = [line.split()[:2] for line in agent.cli("ps").stdout.splitlines()[1:]]
    assert sorted(name for name, _ in rows) == ["api", "ctr1"]
    netns = {"api": agent.netns("api"), "ctr1": "/run/netns/foreign"}
    for name, short_id in rows:
        by_name, by_id = agent.container(name), agent.container(short_id)
        assert by_name == by_id and by_name["id"].startswith(short_id)
        for ref in (name, short_id):
            inside = agent.cli("exec", ref, "--", "ip", "-j", "addr").stdout
            assert global_addresses(inside) == global_addresses(
                nsexec(netns[name], "ip", "-j", "addr").stdout)
            assert {a.split("/")[0] for a in global_addresses(inside)} == {
                a.split("/")[0] for ep in by_name["endpoints"] for a in ep["addresses"]}
    r = agent.cli("inspect", "nosuch", check=False)
    assert (r.returncode, r.stderr) == (1, "plexus: container 'nosuch' not found\n")


def test_rm_of_an_attached_container_points_to_detach(agent: Agent, world: World) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.51.0.0/24")
    world.add_ns("foreign")
    agent.cli("attach", "--netns", "/run/netns/foreign", "--id", "ctr1", "--network", "web")
    r = agent.cli("rm", "ctr1", check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "`plexus detach --id ctr1` detaches it" in r.stderr
    assert "eth0" in {link["ifname"] for link in json.loads(
        nsexec("foreign", "ip", "-j", "link").stdout)}
    r = agent.cli("logs", "ctr1", check=False)
    assert r.returncode == 1 and "its runtime keeps its logs" in r.stderr


# -- run in the foreground, logs -----------------------------------------------------------------


def test_foreground_run_streams_the_output_and_exits_with_the_containers_code(
    agent: Agent, tmp_path: Path
) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.52.0.0/24")
    go = tmp_path / "go"
    script = waiting_script(go, "echo first; echo to-stderr >&2", "echo second", 3)
    run = popen(agent, "run", "--name", "fg", "--network", "web", "--", "sh", "-c", script)
    try:
        # The first line arrives while the container still runs (it waits for `go`).
        assert read_line(run.stdout) == b"first\n"
        assert run.poll() is None and agent.container("fg")["state"] == "running"
        go.touch()
        rest, err = run.communicate(timeout=30)
    finally:
        run.kill()
        run.wait()
    assert (run.returncode, b"first\n" + rest, err) == (3, b"first\nto-stderr\nsecond\n", b"")
    assert (agent.container("fg")["state"], agent.container("fg")["exit_code"]) == ("exited", 3)
    for follow in ([], ["-f"]):  # an exited container: -f ends at once too
        r = agent.cli("logs", *follow, "fg", timeout=20)
        assert (r.returncode, r.stdout) == (0, "first\nto-stderr\nsecond\n")
    log = agent.state_dir / "logs" / "fg.log"
    assert log.read_text() == "first\nto-stderr\nsecond\n"
    assert agent.cli("rm", "fg").stdout == "fg\n"
    assert not log.exists()
    r = agent.cli("logs", "fg", check=False)
    assert (r.returncode, r.stderr) == (1, "plexus: container 'fg' not found\n")


def test_quick_exits_keep_their_exit_codes(agent: Agent) -> None:
    """The process may exit before its start is recorded: the exit code must not be lost."""
    agent.cli("network", "create", "web", "--subnet", "10.53.0.0/24")
    for i, code in enumerate((0, 7, 1, 42)):
        r = agent.cli("run", "--name", f"q{i}", "--network", "web", "--",
                      "sh", "-c", f"echo q{i}; exit {code}", check=False)
        assert (r.returncode, r.stdout, r.stderr) == (code, f"q{i}\n", "")


def agent_holds(agent: Agent, path: Path) -> bool:
    """Does the agent's process hold ``path`` open (its /proc fd links, not plexus's word)?"""
    pid = agent.json("status")["pid"]
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd) == str(path) for fd in fds.iterdir() if fd.is_symlink())


def test_logs_follow_until_the_container_exits_or_ctrl_c(agent: Agent, tmp_path: Path) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.54.0.0/24")
    go = tmp_path / "go"
    agent.cli("run", "-d", "--name", "bg", "--network", "web", "--", "sh", "-c",
              waiting_script(go, "echo started", "echo done", 0))
    log = agent.state_dir / "logs" / "bg.log"
    interrupted = popen(agent, "logs", "-f", "bg")
    assert read_line(interrupted.stdout) == b"started\n"
    assert wait_until(lambda: agent_holds(agent, log))
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=10)
    assert (interrupted.returncode, err) == (130, b"")
    # The agent stops reading for a reader that left.
    assert wait_until(lambda: not agent_holds(agent, log), timeout=5)
    follower = popen(agent, "logs", "--follow", "bg")
    try:
        assert read_line(follower.stdout) == b"started\n"
        assert follower.poll() is None
        go.touch()
        rest, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
        follower.wait()
    assert (follower.returncode, rest, err) == (0, b"done\n", b"")
    assert agent.container("bg")["state"] == "exited"


def test_a_stopping_agent_ends_a_followed_log_and_says_so(agent: Agent) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.62.0.0/24")
    agent.cli("run", "-d", "--name", "bg", "--network", "web", "--", "sh", "-c",
              "echo started; exec sleep 60")
    follower = popen(agent, "logs", "-f", "bg")
    try:
        assert read_line(follower.stdout) == b"started\n"
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        # Bounded: a handler that kept following would hold the agent's shutdown for a minute.
        agent.proc.wait(timeout=30)
        _, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 1 and err.count(b"\n") == 1 and err.startswith(b"plexus: ")


# -- several names, forced removal ---------------------------------------------------------------


def test_rm_removes_every_name_it_can_and_reports_the_others(agent: Agent) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.55.0.0/24")
    for name in ("a", "b"):
        agent.run_echo(name, "web")
    r = agent.cli("rm", "-f", "a", "nosuch", "b", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (
        1, "a\nb\n", "plexus: container 'nosuch' not found\n")
    assert agent.json("ps", "-a") == []
    assert [n for n in sh("ip", "netns", "list").stdout.split() if n.startswith("plexus-")] == []
    agent.cli("network", "create", "db", "--subnet", "10.56.0.0/24")
    r = agent.cli("network", "rm", "web", "nosuch", "db", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (
        1, "web\ndb\n", "plexus: network 'nosuch' not found\n")
    assert plexus_links("host1") == set()


def test_network_rm_force_says_how_many_endpoints_it_detached(
    agent: Agent, world: World
) -> None:
    agent.cli("network", "create", "web", "--subnet", "10.57.0.0/24")
    agent.run_echo("a", "web")
    agent.run_echo("b", "web")
    world.add_ns("foreign")
    agent.cli("attach", "--netns", "/run/netns/foreign", "--id", "ctr1", "--network", "web")
    assert len([link for link in plexus_links("host1") if link.startswith("pxv")]) == 3
    r = agent.cli("network", "rm", "-f", "web")
    assert (r.returncode, r.stdout) == (0, "web (detached 3 endpoints)\n")
    assert plexus_links("host1") == set()


def test_detach_confirms_and_the_interface_is_gone(agent: Agent, world: World) -> None:
    agent.cli("network", "create", "db", "--subnet", "10.58.0.0/24")
    world.add_ns("foreign")
    agent.cli("attach", "--netns", "/run/netns/foreign", "--id", "ctr1", "--network", "db",
              "--ip", "10.58.0.50")
    r = agent.cli("detach", "--id", "ctr1", "--network", "db")
    assert r.stdout == "eth0 10.58.0.50/24 detached from db\n"
    # The kernel finishes a veth's deletion after the answer (as after a CNI DEL).
    assert wait_until(lambda: [link["ifname"] for link in json.loads(
        nsexec("foreign", "ip", "-j", "link").stdout)] == ["lo"])


# -- errors --------------------------------------------------------------------------------------


def test_a_client_without_root_gets_one_line(agent: Agent) -> None:
    agent.socket.parent.chmod(0o755)  # so that the socket's own mode (0600) is what refuses
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         PLEXUS, "--socket", str(agent.socket), "ps"],
        capture_output=True, text=True, timeout=30,
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"plexus: permission denied on {agent.socket}: the agent's socket "
                        "needs root (or membership in the socket's group)\n")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["network", "create", "x", "--subnet", "10.0.0.300/24"], 2,
         "invalid subnet '10.0.0.300/24': not an IPv4 or IPv6 network "
         "(expected ADDRESS/PREFIXLEN)"),
        (["network", "create", "x", "--subnet", "10.9.0.1/24"], 2,
         "invalid subnet '10.9.0.1/24': host bits set (the network is 10.9.0.0/24)"),
        (["network", "create", "x", "--subnet", "10.9.0.0/24", "--ip-range", "10.9.0.0/33"], 2,
         "invalid ip-range '10.9.0.0/33': not an IPv4 or IPv6 network "
         "(expected ADDRESS/PREFIXLEN)"),
        (["network", "create", "x", "--mtu", "many"], 2,
         "invalid value for '--mtu': 'many' is not a valid integer "
         "(see 'plexus network create --help')"),
        (["network", "create", "base"], 1, "network 'base' already exists"),
        (["rm", "c"], 1, "container 'c' is running: --force kills and removes it"),
        (["network", "rm", "base"], 1, None),
        (["exec", "nosuch", "true"], 1, "container 'nosuch' not found"),
    ],
)
def test_errors_are_one_line_with_one_prefix_and_the_value_once(
    agent: Agent, args: list[str], code: int, message: str | None
) -> None:
    agent.cli("network", "create", "base", "--subnet", "10.59.0.0/24")
    agent.run_echo("c", "base")
    r = agent.cli(*args, check=False)
    assert (r.returncode, r.stdout) == (code, "")
    assert r.stderr.count("\n") == 1 and r.stderr.count("plexus:") == 1, r.stderr
    assert r.stderr.startswith("plexus: ")
    if message is not None:
        assert r.stderr == f"plexus: {message}\n"


def test_dns_lookup_exits_1_when_refused_or_servfail(agent: Agent) -> None:
    agent.cli("network", "create", "vault", "--subnet", "10.60.0.0/24", "--internal")
    agent.cli("network", "create", "up", "--subnet", "10.61.0.0/24",
              "--dns-upstream", "127.0.0.1:9")  # nothing listens there
    agent.run_echo("c", ["vault", "up"])
    found = agent.cli("dns", "lookup", "c", "--network", "vault")
    assert "10.60.0.2" in found.stdout
    refused = agent.cli("dns", "lookup", "example.com", "--network", "vault", check=False)
    assert refused.returncode == 1 and "REFUSED" in refused.stdout and refused.stderr == ""
    answer = json.loads(agent.cli("dns", "lookup", "example.com", "--network", "vault",
                                  "--json", check=False).stdout)
    assert answer["rcode"] == "REFUSED"
    failed = agent.cli("dns", "lookup", "example.com", "--network", "up", check=False)
    assert failed.returncode == 1 and "no upstream answered" in failed.stdout


# -- the agent's options -------------------------------------------------------------------------


def test_agent_refuses_a_pool_it_cannot_cut_into_subnets(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    r = subprocess.run(
        [PLEXUS, "agent", "--state-dir", str(tmp_path / "state"), "--socket", str(sock),
         "--pool", "10.0.0.0/8:33", "--docker-plugin-socket", "", "--docker-api", ""],
        capture_output=True, text=True, timeout=30,
    )
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("plexus: invalid --pool '10.0.0.0/8:33': the subnets' prefix length "
                        "must be between /8 (the pool's) and /29 (8 addresses)\n")
    assert not sock.exists()


def test_the_longest_pool_prefix_still_holds_containers(world: World) -> None:
    agent = world.add_host("host1", start_agent=False)
    agent.start(extra=["--pool", "10.77.0.0/16:29"])
    net = agent.json("network", "create", "small")
    assert [s["cidr"] for s in net["subnets"]] == ["10.77.0.0/29"]
    for name in ("a", "b"):
        agent.cli("run", "-d", "--name", name, "--network", "small", "--", "sleep", "30")
    assert {a.split("/")[0] for name in ("a", "b") for ep in agent.container(name)["endpoints"]
            for a in ep["addresses"]} == {"10.77.0.2", "10.77.0.3"}


def test_version_and_help_of_logs(agent: Agent) -> None:
    from plexus import __version__

    assert agent.cli("--version").stdout == f"plexus {__version__}\n"
    assert "--follow" in agent.cli("logs", "--help").stdout

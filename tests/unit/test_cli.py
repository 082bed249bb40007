"""The `plexus` command as a user types it: what a command line sends to the agent, what it
executes and prints, its exit code, and which socket it uses. No agent: a fake API (a stdlib HTTP
server on a unix socket, in a thread) answers the calls these commands make and records them,
and `plexus agent` runs with the daemon's entry point replaced by one that records its
configuration."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from plexus import __version__
from plexus.agent import daemon
from plexus.api.client import DEFAULT_SOCKET
from plexus.cli import main
from plexus.config import AgentConfig

PLEXUS = str(Path(sys.executable).with_name("plexus"))
README_RUN = [
    *("run", "-d", "--name", "api", "--network", "web", "--network", "db"),
    *("-p", "8080:80", "-p", "127.0.0.1:9090:90/udp", "--label", "tier=api"),
    *("--namespace", "shop", "--", "python3", "-m", "http.server", "80"),
]


def container(name: str = "api", **fields: Any) -> dict[str, Any]:
    """A container as the API shows it: a running `plexus run` one on a host network, unless
    ``fields`` say otherwise."""
    return {"id": "c0ffee" + "0" * 58, "name": name, "state": "running", "exit_code": None,
            "netns": "", "netns_name": "", "host_network": True, **fields}


def not_found(what: str) -> tuple[int, Any]:
    return 404, {"kind": "not-found", "error": f"{what} not found"}


class FakeApi(socketserver.ThreadingUnixStreamServer):
    """The agent's API as a table of answers, (METHOD, PATH) -> (status, JSON or raw bytes);
    a test adds the answers it needs. Every request recorded."""

    daemon_threads = True

    def __init__(self, path: Path, netns_name: str = "") -> None:
        self.path = path
        self.requests: list[tuple[str, str, Any]] = []
        api = container(netns_name=netns_name, netns=f"/run/netns/{netns_name}" * bool(netns_name),
                        host_network=not netns_name)
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {
            ("GET", "/v1/status"): (200, {"ready": True, "node": "fake", "networks": 0,
                                          "endpoints": 0, "version": "0"}),
            ("POST", "/v1/containers"): (201, container(state="running")),
            ("GET", "/v1/containers/api"): (200, api),
        }
        super().__init__(str(path), _Handler)

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        return self.answers.get((method, path)) or not_found(f"{method} {path} in the fake")


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, self.path, body))
        status, payload = self.server.answer(self.command, self.path)
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        kind = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the default writes to stderr and reads a TCP peer address a unix socket lacks


def serve(path: Path, netns_name: str = "") -> Iterator[FakeApi]:
    api = FakeApi(path, netns_name)
    thread = threading.Thread(target=api.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield api
    finally:
        api.shutdown()
        api.server_close()
        thread.join(timeout=5)


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApi]:
    monkeypatch.setenv("PLEXUS_SOCKET", str(tmp_path / "api.sock"))
    yield from serve(tmp_path / "api.sock")


@pytest.fixture
def executed(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """argv of every exec the CLI makes (instead of replacing the test process)."""
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execvp", lambda file, argv: calls.append(list(argv)))
    return calls


def plexus(*args: str) -> Any:
    return CliRunner().invoke(main.cli, list(args), obj={}, prog_name="plexus")


# -- `--` ends plexus's options --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["api", "--", "ip", "addr"], ["ip", "addr"]),  # the README's line
        (["api", "ip", "addr"], ["ip", "addr"]),
        (["api", "--", "ip", "-4", "addr"], ["ip", "-4", "addr"]),
        (["api", "ip", "-4", "addr", "--help"], ["ip", "-4", "addr", "--help"]),
        (["api", "--", "sh", "-c", "echo $0", "--"], ["sh", "-c", "echo $0", "--"]),
        (["--", "api", "ip", "addr"], ["ip", "addr"]),
    ],
)
def test_exec_runs_the_words_after_name_and_an_optional_separator(
    api: FakeApi, executed: list[list[str]], args: list[str], command: list[str]
) -> None:
    result = plexus("exec", *args)
    assert result.exit_code == 0, result.output
    assert executed == [command]
    assert api.requests == [("GET", "/v1/containers/api", None)]


def test_exec_enters_the_containers_namespace_without_the_separator(
    tmp_path: Path, executed: list[list[str]]
) -> None:
    for fake in serve(tmp_path / "ns.sock", netns_name="plexus-0123456789ab"):
        result = plexus("--socket", str(fake.path), "exec", "api", "--", "ip", "addr")
        assert result.exit_code == 0, result.output
    assert executed == [["ip", "netns", "exec", "plexus-0123456789ab", "ip", "addr"]]


def test_exec_without_a_command_is_a_usage_error(api: FakeApi, executed: list[list[str]]) -> None:
    result = plexus("exec", "api", "--")
    assert result.exit_code == 2
    assert result.stderr == (
        "plexus: missing argument '[--] COMMAND...' (see 'plexus exec --help')\n"
    )
    assert executed == [] and api.requests == []


def test_exec_really_executes_the_command(api: FakeApi) -> None:
    """The real program, no patch: a container without a namespace of its own (driver host)
    runs the command directly, so its output is the command's."""
    out = subprocess.run(
        [PLEXUS, "exec", "api", "--", "echo", "-n", "hello"],
        capture_output=True, text=True, timeout=30, env=os.environ.copy(),
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, "hello", "")


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["--", "python3", "-m", "http.server", "80"], ["python3", "-m", "http.server", "80"]),
        (["python3", "-m", "http.server", "80"], ["python3", "-m", "http.server", "80"]),
        (["sh", "-c", "exit 3", "--name", "x"], ["sh", "-c", "exit 3", "--name", "x"]),
        (["--", "--", "true"], ["true"]),
    ],
)
def test_run_sends_the_words_after_its_options_as_the_command(
    api: FakeApi, args: list[str], command: list[str]
) -> None:
    result = plexus("run", "-d", "--name", "api", "--network", "web", *args)
    assert result.exit_code == 0, result.output
    (method, path, body), = api.requests
    assert (method, path, body["command"]) == ("POST", "/v1/containers", command)


def test_run_as_the_readme_writes_it(api: FakeApi) -> None:
    result = plexus(*README_RUN)
    assert (result.exit_code, result.output) == (0, container()["id"] + "\n")
    (_, _, body), = api.requests
    assert body == {
        "name": "api",
        "command": ["python3", "-m", "http.server", "80"],
        "networks": ["web", "db"],
        "ips": [],
        "publish": ["8080:80", "127.0.0.1:9090:90/udp"],
        "labels": {"tier": "api"},
        "namespace": "shop",
        "aliases": [],
        "expose": [],
    }


# -- which socket ------------------------------------------------------------------------------


@pytest.fixture
def agent_config(monkeypatch: pytest.MonkeyPatch) -> list[AgentConfig]:
    """The configuration `plexus agent` would run with."""
    configs: list[AgentConfig] = []
    monkeypatch.setattr(daemon, "main", lambda config, verbose: configs.append(config))
    monkeypatch.delenv("PLEXUS_SOCKET", raising=False)
    return configs


@pytest.mark.parametrize(
    ("args", "env", "socket"),
    [
        (["agent"], {}, DEFAULT_SOCKET),
        (["agent", "--socket", "/s/a.sock"], {}, "/s/a.sock"),
        (["--socket", "/g/a.sock", "agent"], {}, "/g/a.sock"),
        (["agent"], {"PLEXUS_SOCKET": "/e/a.sock"}, "/e/a.sock"),
        (["--socket", "/g/a.sock", "agent"], {"PLEXUS_SOCKET": "/e/a.sock"}, "/g/a.sock"),
        (["agent", "--socket", "/s/a.sock"], {"PLEXUS_SOCKET": "/e/a.sock"}, "/s/a.sock"),
        (["--socket", "/g/a.sock", "agent", "--socket", "/s/a.sock"], {}, "/s/a.sock"),
    ],
)
def test_agent_serves_where_the_nearest_socket_option_says(
    agent_config: list[AgentConfig], tmp_path: Path, args: list[str], env: dict[str, str],
    socket: str,
) -> None:
    state = ["--state-dir", str(tmp_path)]
    result = CliRunner().invoke(main.cli, [*args, *state], env=env, obj={})
    assert result.exit_code == 0, result.output
    assert [c.socket for c in agent_config] == [Path(socket)]


def test_agent_socket_is_documented_in_its_help() -> None:
    assert "--socket" in plexus("agent", "--help").output


@pytest.mark.parametrize("how", ["option", "env"])
def test_clients_reach_the_agent_through_the_global_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setenv("PLEXUS_SOCKET", str(tmp_path / "elsewhere.sock"))
    for fake in serve(tmp_path / "api.sock"):
        if how == "env":
            monkeypatch.setenv("PLEXUS_SOCKET", str(fake.path))
            result = plexus("status")
        else:
            result = plexus("--socket", str(fake.path), "status")
        assert result.exit_code == 0, result.output
        assert result.output.startswith("agent ready on node fake")
        assert fake.requests == [("GET", "/v1/status", None)]


# -- what `ps` lists, `exec` enters ------------------------------------------------------------


def test_exec_enters_an_attached_containers_namespace_by_its_path(
    api: FakeApi, executed: list[list[str]]
) -> None:
    """`plexus attach --netns P --id ctr1`: no `ip netns` name, a path; nsenter enters it."""
    api.answers[("GET", "/v1/containers/ctr1")] = (
        200, container("ctr1", id="ctr1", netns="/run/netns/foreign", host_network=False))
    result = plexus("exec", "ctr1", "--", "ip", "addr")
    assert result.exit_code == 0, result.output
    assert executed == [["nsenter", "--net=/run/netns/foreign", "--", "ip", "addr"]]


def test_exec_says_when_plexus_knows_no_namespace(api: FakeApi, executed: list[list[str]]) -> None:
    """A Docker endpoint before Join: plexus has no path to enter, and says so."""
    api.answers[("GET", "/v1/containers/d0cker")] = (
        200, container("d0cker", host_network=False))
    result = plexus("exec", "d0cker", "--", "ip", "addr")
    assert result.exit_code == 1 and executed == []
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("plexus: container 'd0cker' has no network namespace")


def test_exec_refuses_an_exited_container(api: FakeApi, executed: list[list[str]]) -> None:
    api.answers[("GET", "/v1/containers/once")] = (
        200, container("once", state="exited", exit_code=3))
    result = plexus("exec", "once", "true")
    assert (result.exit_code, result.stderr) == (
        1, "plexus: container 'once' is not running (it exited with 3)\n")
    assert executed == []


# -- run in the foreground, logs ---------------------------------------------------------------


def test_foreground_run_prints_the_output_and_exits_with_the_containers_code(
    api: FakeApi,
) -> None:
    cid = container()["id"]
    api.answers[("GET", f"/v1/containers/{cid}/logs?follow=1")] = (200, b"out\nerr\n")
    api.answers[("GET", f"/v1/containers/{cid}")] = (
        200, container(state="exited", exit_code=3))
    result = plexus("run", "--name", "api", "--network", "web", "--", "sh", "-c", "exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\nerr\n", "")
    assert [r[:2] for r in api.requests] == [
        ("POST", "/v1/containers"),
        ("GET", f"/v1/containers/{cid}/logs?follow=1"),
        ("GET", f"/v1/containers/{cid}"),
    ]


def test_foreground_run_of_a_container_whose_exit_nobody_saw_fails(api: FakeApi) -> None:
    cid = container()["id"]
    api.answers[("GET", f"/v1/containers/{cid}/logs?follow=1")] = (200, b"")
    api.answers[("GET", f"/v1/containers/{cid}")] = (200, container(state="exited"))
    result = plexus("run", "--name", "api", "--network", "web", "--", "true")
    assert result.exit_code == 1 and result.stderr.count("plexus:") == 1


@pytest.mark.parametrize(("args", "query"), [([], ""), (["-f"], "?follow=1"),
                                             (["--follow"], "?follow=1")])
def test_logs_prints_the_containers_output(api: FakeApi, args: list[str], query: str) -> None:
    api.answers[("GET", f"/v1/containers/api/logs{query}")] = (200, b"\x00binary\xff\n")
    api.answers[("GET", "/v1/containers/api")] = (200, container(state="exited", exit_code=0))
    result = plexus("logs", *args, "api")
    assert (result.exit_code, result.stdout_bytes) == (0, b"\x00binary\xff\n")


@pytest.mark.parametrize("args", [["logs", "-f", "api"],
                                  ["run", "--name", "api", "--network", "n", "true"]])
def test_a_followed_log_that_ends_while_the_container_runs_is_no_exit(
    api: FakeApi, args: list[str]
) -> None:
    """The agent ends the stream when it stops, too: that is said, not taken for an exit."""
    for ref in ("api", container()["id"]):
        api.answers[("GET", f"/v1/containers/{ref}/logs?follow=1")] = (200, b"so far\n")
        api.answers[("GET", f"/v1/containers/{ref}")] = (200, container())
    result = plexus(*args)
    assert (result.exit_code, result.stdout) == (1, "so far\n")
    assert result.stderr == ("plexus: the agent stopped while api runs: `plexus logs -f api` "
                             "follows it again\n")


def test_logs_of_a_missing_container_is_one_line(api: FakeApi) -> None:
    result = plexus("logs", "nosuch")
    assert result.exit_code == 1
    assert result.stderr == "plexus: GET /v1/containers/nosuch/logs in the fake not found\n"


# -- several names: every one is tried ---------------------------------------------------------


@pytest.mark.parametrize("command", [["rm"], ["network", "rm"]])
def test_rm_acts_on_every_name_and_reports_each_failure(api: FakeApi, command: list[str]) -> None:
    kind = "networks" if command[0] == "network" else "containers"
    for name in ("a", "b"):
        api.answers[("DELETE", f"/v1/{kind}/{name}")] = (200, {"detached": 0})
    api.answers[("DELETE", f"/v1/{kind}/bad%20name")] = (
        400, {"kind": "invalid", "error": "invalid name 'bad name': ..."})
    result = plexus(*command, "a", "nosuch", "b")
    assert (result.exit_code, result.stdout) == (1, "a\nb\n")
    assert result.stderr == f"plexus: DELETE /v1/{kind}/nosuch in the fake not found\n"
    assert [r[1] for r in api.requests] == [f"/v1/{kind}/{n}" for n in ("a", "nosuch", "b")]
    invalid = plexus(*command, "a", "bad name", "nosuch")
    assert invalid.exit_code == 2 and invalid.stderr.count("\n") == 2  # the worst code wins
    assert [r[1] for r in api.requests[3:]] == [f"/v1/{kind}/{n}" for n in
                                                ("a", "bad%20name", "nosuch")]


def test_network_rm_force_says_how_many_endpoints_it_detached(api: FakeApi) -> None:
    api.answers[("DELETE", "/v1/networks/web?force=1")] = (200, {"detached": 2})
    api.answers[("DELETE", "/v1/networks/db?force=1")] = (200, {"detached": 1})
    result = plexus("network", "rm", "-f", "web", "db")
    assert (result.exit_code, result.stdout) == (
        0, "web (detached 2 endpoints)\ndb (detached 1 endpoint)\n")


def test_detach_confirms_what_it_detached(api: FakeApi) -> None:
    api.answers[("POST", "/v1/endpoints/detach")] = (200, {
        "ifname": "eth0", "network": "db", "addresses": ["10.90.0.50/24"]})
    result = plexus("detach", "--id", "ctr1", "--network", "db")
    assert (result.exit_code, result.stdout) == (0, "eth0 10.90.0.50/24 detached from db\n")
    assert api.requests[0][2] == {"container_id": "ctr1", "network": "db", "ifname": ""}


# -- the agent's socket: missing, not ours -----------------------------------------------------


def test_a_missing_socket_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nosuch.sock"
    result = plexus("--socket", str(path), "ps")
    assert result.exit_code == 1
    assert result.stderr == (f"plexus: cannot reach the plexus agent at {path}: "
                             "No such file or directory (is the agent running?)\n")


def test_a_socket_without_permission_is_one_line_naming_it(tmp_path: Path) -> None:
    """The real program against a socket it may not open: as nobody when the test is root
    (root passes every permission check), else the socket's mode says no."""
    tmp_path.chmod(0o755)
    for fake in serve(tmp_path / "api.sock"):
        argv = [PLEXUS, "--socket", str(fake.path), "status"]
        if os.geteuid() == 0:
            fake.path.chmod(0o600)
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
        else:
            fake.path.chmod(0)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert (out.returncode, out.stdout) == (1, "")
        assert out.stderr == (f"plexus: permission denied on {fake.path}: the agent's socket "
                              "needs root (or membership in the socket's group)\n")
        assert fake.requests == []


# -- version, help, usage errors ---------------------------------------------------------------


def test_version() -> None:
    result = plexus("--version")
    assert (result.exit_code, result.stdout) == (0, f"plexus {__version__}\n")


def _commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_command_and_option_has_help() -> None:
    missing = [
        f"{' '.join(path)} {param.opts[0]}"
        for path, command in [((), main.cli), *_commands(main.cli)]
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert missing == []
    assert [p for p, c in _commands(main.cli) if not c.help] == []
    assert "logs" in main.cli.commands


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["network", "create", "x", "--mtu", "abc"],
         "plexus: invalid value for '--mtu': 'abc' is not a valid integer "
         "(see 'plexus network create --help')\n"),
        (["run", "--network", "web", "true"],
         "plexus: missing option '--name' (see 'plexus run --help')\n"),
        (["nosuch"], "plexus: no such command 'nosuch' (see 'plexus --help')\n"),
        (["network", "create", "x", "--label", "oops"],
         "plexus: invalid label 'oops': expected KEY=VALUE\n"),
        (["detach", "--id", "x"], "plexus: detach needs --network or --ifname\n"),
    ],
)
def test_usage_errors_are_one_plexus_line_and_exit_2(
    api: FakeApi, args: list[str], message: str
) -> None:
    result = plexus(*args)
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", message)
    assert api.requests == []


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [(400, "invalid", 2), (404, "not-found", 1), (409, "exists", 1), (409, "in-use", 1),
     (507, "exhausted", 1), (503, "not-ready", 1), (500, "internal", 1)],
)
@pytest.mark.parametrize(
    "args",
    [["network", "create", "x"], ["network", "inspect", "x"], ["network", "ls"],
     ["run", "-d", "--name", "x", "--network", "n", "true"], ["inspect", "x"], ["ps"],
     ["attach", "--netns", "/p", "--id", "x", "--network", "n"],
     ["detach", "--id", "x", "--network", "n"], ["status"], ["reconcile"],
     ["dns", "lookup", "x", "--network", "n"], ["dns", "stats"], ["exec", "x", "true"],
     ["logs", "x"], ["rm", "x"], ["network", "rm", "x"]],
)
def test_every_command_exits_2_for_invalid_input_and_1_for_other_refusals(
    tmp_path: Path, args: list[str], status: int, kind: str, code: int
) -> None:
    for fake in serve(tmp_path / "api.sock"):
        fake.answers.clear()
        fake.answer = lambda method, path: (  # type: ignore[method-assign]
            status, {"kind": kind, "error": f"plexus said {kind}"})
        result = plexus("--socket", str(fake.path), *args)
        assert (result.exit_code, result.stderr) == (code, f"plexus: plexus said {kind}\n")


@dataclass
class Lookup:
    outcome: str
    rcode: str
    response: tuple[str, ...] = ()
    error: str = ""


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (Lookup("answer", "NOERROR"), 0),
        (Lookup("nxdomain", "NXDOMAIN"), 0),  # an answer: the name does not exist
        (Lookup("refused", "REFUSED"), 1),
        (Lookup("servfail", "SERVFAIL"), 1),
        (Lookup("forward", "", ("rcode NOERROR", "example.com. 5 IN A 1.2.3.4")), 0),
        (Lookup("forward", "", ("rcode SERVFAIL",)), 1),
        (Lookup("forward", "", ("rcode REFUSED",)), 1),
        (Lookup("forward", "", (), "no upstream answered (1.1.1.1:53: timeout)"), 1),
    ],
)
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_dns_lookup_fails_when_the_answer_is_refused_or_servfail(
    api: FakeApi, answer: Lookup, code: int, json_flag: list[str]
) -> None:
    api.answers[("GET", "/v1/dns/lookup?name=x&network=n&type=A&client=")] = (200, {
        "outcome": answer.outcome, "rcode": answer.rcode, "response": list(answer.response),
        "error": answer.error, "text": f"x A on network n: {answer.outcome.upper()}"})
    result = plexus("dns", "lookup", "x", "--network", "n", *json_flag)
    assert result.exit_code == code and result.stderr == ""
    assert answer.outcome.upper() in result.stdout


# -- agent --pool ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("--pool", "10.0.0.0/8:33", "the subnets' prefix length must be between /8 (the pool's) "
                                    "and /29 (8 addresses)"),
        ("--pool", "10.0.0.0/16:8", "the subnets' prefix length must be between /16 (the "
                                    "pool's) and /29 (8 addresses)"),
        ("--pool", "10.0.0.0/8:31", "the subnets' prefix length must be between /8 (the pool's) "
                                    "and /29 (8 addresses)"),
        ("--pool", "10.0.0.0/8", "expected CIDR:PREFIXLEN, e.g. 10.89.0.0/16:24"),
        ("--pool", "10.0.0.0:24", "expected CIDR:PREFIXLEN, e.g. 10.89.0.0/16:24"),
        ("--pool", "10.0.0.1/8:24", "host bits set (the network is 10.0.0.0/8)"),
        ("--pool", "10.0.0.0/33:24", "not an IPv4 or IPv6 network (expected ADDRESS/PREFIXLEN)"),
        ("--pool", "fd00::/48:64", "expected an IPv4 network"),
        ("--pool6", "fd00::/48:129", "the subnets' prefix length must be between /48 (the "
                                     "pool's) and /125 (8 addresses)"),
        ("--pool6", "fd00::/48", "expected CIDR:PREFIXLEN, e.g. fd89:7c00::/48:64"),
        ("--pool6", "10.0.0.0/8:24", "expected an IPv6 network"),
    ],
)
def test_agent_refuses_a_pool_it_cannot_cut_into_subnets(
    agent_config: list[AgentConfig], tmp_path: Path, option: str, value: str, reason: str
) -> None:
    result = plexus("agent", "--state-dir", str(tmp_path), option, value)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"plexus: invalid {option} {value!r}: {reason}\n"
    assert agent_config == []


@pytest.mark.parametrize(
    ("args", "pool4", "pool6"),
    [
        ([], ("10.89.0.0/16", 24), ("fd89:7c00::/48", 64)),
        (["--pool", "10.0.0.0/8:29", "--pool6", "fd00::/64:125"],
         ("10.0.0.0/8", 29), ("fd00::/64", 125)),
        (["--pool", "10.0.0.0/24:24", "--pool6", "fd00::/64:64"],
         ("10.0.0.0/24", 24), ("fd00::/64", 64)),
    ],
)
def test_agent_takes_pools_that_leave_room_for_addresses(
    agent_config: list[AgentConfig], tmp_path: Path, args: list[str],
    pool4: tuple[str, int], pool6: tuple[str, int]
) -> None:
    result = plexus("agent", "--state-dir", str(tmp_path), *args)
    assert result.exit_code == 0, result.output
    (config,) = agent_config
    assert (str(config.pool4), config.pool4_prefix) == pool4
    assert (str(config.pool6), config.pool6_prefix) == pool6


def test_plexus_alone_shows_its_help() -> None:
    result = plexus()
    assert result.exit_code == 2 and "Commands:" in result.output
    assert "plexus:" not in result.output.split("\n", 1)[0]


def test_an_agent_without_root_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refused(config: AgentConfig, verbose: bool) -> None:
        raise PermissionError(13, "Permission denied", "/run/plexus")

    monkeypatch.setattr(daemon, "main", refused)
    result = plexus("agent", "--state-dir", str(tmp_path))
    assert (result.exit_code, result.stderr) == (
        1, "plexus: permission denied on /run/plexus: the agent needs root "
           "(CAP_NET_ADMIN and more)\n")

"""The `plexus` command's argument parsing: what a command line sends to the agent, what it
executes, and which socket it uses. No agent: a fake API (a stdlib HTTP server on a unix socket,
in a thread) answers the few calls these commands make and records them, and `plexus agent` runs
with the daemon's entry point replaced by one that records its configuration."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

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


class FakeApi(socketserver.ThreadingUnixStreamServer):
    """Just enough of the agent's API for status, run and exec; every request recorded."""

    daemon_threads = True

    def __init__(self, path: Path, netns_name: str = "") -> None:
        self.path = path
        self.netns_name = netns_name
        self.requests: list[tuple[str, str, Any]] = []
        super().__init__(str(path), _Handler)

    def answer(self, method: str, path: str) -> tuple[int, Any]:
        if (method, path) == ("GET", "/v1/status"):
            return 200, {"ready": True, "node": "fake", "networks": 0, "endpoints": 0,
                         "version": "0"}
        if (method, path) == ("POST", "/v1/containers"):
            return 200, {"id": "c0ffee"}
        if (method, path) == ("GET", "/v1/containers/api"):
            # Exited: `run` without -d returns at once.
            return 200, {"name": "api", "netns_name": self.netns_name, "state": "exited",
                         "exit_code": 0}
        return 404, {"kind": "not-found", "error": f"no {method} {path} in the fake"}


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, self.path, body))
        status, payload = self.server.answer(self.command, self.path)
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
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
    return CliRunner().invoke(main.cli, list(args), obj={})


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
    assert "Missing argument '[--] COMMAND...'" in result.output
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
    assert (result.exit_code, result.output) == (0, "c0ffee\n")
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

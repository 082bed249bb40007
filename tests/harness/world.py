"""A small world of simulated hosts, built of network namespaces, for tests, the demo and bench.

It must run inside ``tests/sandbox`` (fresh net, mount and pid namespaces with a private
/run/netns), so whatever it creates dies with the sandbox even if a test is killed. The world
itself also cleans up after itself in ``close()``.

Layout (addresses are documentation ranges, reachable only inside the sandbox):

    outside  (203.0.113.100, "internet" address 198.51.100.1 on lo)
       │ veth
    HOST     (203.0.113.N, default route via outside) ── agent, bridges, containers
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The probes live in tests.harness.probes; their old home keeps the old names working.
from tests.harness.probes import http_get as http_get
from tests.harness.probes import netns_path as netns_path
from tests.harness.probes import tcp_probe, wait_for_answer
from tests.harness.probes import tcp_request as tcp_request
from tests.harness.probes import udp_request as udp_request
from tests.harness.probes import wait_tcp as wait_tcp

VENV_BIN = Path(sys.executable).parent
# The traffic-check server that containers of tests, the demo and bench run (a file, so it runs
# without the repository on the path of the agent that starts it).
ECHO = str(Path(__file__).with_name("echo.py"))
OUTSIDE_ADDR = "203.0.113.100"
INTERNET_ADDR = "198.51.100.1"


def in_sandbox() -> bool:
    return os.environ.get("PLEXUS_SANDBOX") == "1" and os.geteuid() == 0


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def nsexec(
    ns: str,
    *argv: str,
    check: bool = True,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run argv in namespace ``ns``: a name under /run/netns or a path."""
    return sh("nsenter", f"--net={netns_path(ns)}", "--", *argv, check=check, timeout=timeout)


def ping(ns: str, ip: str, count: int = 1, timeout: float = 1) -> bool:
    argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout), ip]
    return nsexec(ns, *argv, check=False, timeout=count * timeout + 5).returncode == 0


def ping_rtt_ms(ns: str, ip: str, count: int = 5) -> float | None:
    out = nsexec(
        ns,
        "ping",
        "-n",
        "-q",
        "-c",
        str(count),
        "-i",
        "0.05",
        "-W",
        "1",
        ip,
        check=False,
        timeout=count + 10,
    ).stdout
    for line in out.splitlines():
        if "min/avg/max" in line:
            return float(line.split("=")[1].split("/")[1])
    return None


@dataclass
class Agent:
    host: str
    state_dir: Path
    socket: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def start(self, timeout: float = 20.0, extra: Sequence[str] = ()) -> None:
        self.spawn(extra)
        self.wait_ready(timeout)

    def spawn(self, extra: Sequence[str] = (), wrapper: Sequence[str] = ()) -> int:
        """Start the agent without waiting for it (a benchmark times its start-up itself);
        its pid, that of the agent's own process (nsenter execs it). ``wrapper``: a command
        the agent's script is handed to (``python -m cProfile -o FILE``, say)."""
        self.log = self.state_dir.parent / f"agent-{self.host}.log"
        argv = [
            "nsenter",
            f"--net={netns_path(self.host)}",
            "--",
            *wrapper,
            str(VENV_BIN / "plexus"),
            "--socket",
            str(self.socket),
            "agent",
            "--state-dir",
            str(self.state_dir),
            "--node",
            self.host,
            # Never the real /run/docker/plugins: each simulated host has its own plugin socket;
            # and never the host's dockerd API (a test that runs a dockerd passes its socket).
            "--docker-plugin-socket",
            str(self.docker_socket),
            "--docker-api",
            "",
            *extra,
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        return self.proc.pid

    @property
    def docker_socket(self) -> Path:
        return self.state_dir.parent / "docker-plugins" / "plexus.sock"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited early:\n{self.log.read_text()[-3000:]}")
            r = self.cli("status", "--json", check=False)
            if r.returncode == 0 and json.loads(r.stdout)["ready"]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"agent on {self.host} not ready after {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def cli(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(VENV_BIN / "plexus"), "--socket", str(self.socket), *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"plexus {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def container(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.cli("inspect", name).stdout))

    def address(self, name: str, network: str | None = None, version: int = 4) -> str:
        for ep in self.container(name)["endpoints"]:
            if network in (None, ep["network"]):
                for a in ep["addresses"]:
                    if (":" in a) == (version == 6):
                        return str(a.split("/")[0])
        raise KeyError(f"{name} has no IPv{version} address on {network}")

    def netns(self, name: str) -> str:
        return str(self.container(name)["netns"])

    def run_echo(
        self, name: str, network: str | Sequence[str], *opts: str, ports: Sequence[int] = (80,)
    ) -> None:
        nets = [network] if isinstance(network, str) else list(network)
        args = ["run", "-d", "--name", name]
        for n in nets:
            args += ["--network", n]
        self.cli(
            *args, *opts, "--", sys.executable, ECHO, name, *map(str, ports)
        )

    def wait_listening(self, name: str, port: int = 80, timeout: float = 10) -> None:
        ns = self.netns(name)
        if not wait_for_answer(lambda: tcp_probe(ns, "127.0.0.1", port, 0.5), timeout):
            raise TimeoutError(f"{name} is not listening on {port}")


class World:
    """Hosts and an outside namespace. Use as a context manager."""

    def __init__(self, workdir: Path) -> None:
        if not in_sandbox():
            raise RuntimeError("tests.harness.World must run inside tests/sandbox")
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.agents: dict[str, Agent] = {}
        self._hosts = 0
        self.add_ns("outside")
        nsexec("outside", "ip", "addr", "add", f"{INTERNET_ADDR}/32", "dev", "lo")

    def add_ns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        nsexec(name, "ip", "link", "set", "lo", "up")
        return name

    def add_host(self, name: str, start_agent: bool = True) -> Agent:
        """A simulated host on the outside's segment, with an agent of its own."""
        self._hosts += 1
        n = self._hosts
        self.add_ns(name)
        addr = f"203.0.113.{n}"
        sh(
            "ip",
            "link",
            "add",
            "up0",
            "netns",
            name,
            "type",
            "veth",
            "peer",
            "name",
            f"to-{name}",
            "netns",
            "outside",
        )
        nsexec(name, "ip", "addr", "add", f"{addr}/24", "dev", "up0")
        nsexec(name, "ip", "link", "set", "up0", "up")
        nsexec(name, "ip", "route", "add", "default", "via", OUTSIDE_ADDR)
        if n == 1:
            sh("ip", "link", "add", "br-out", "netns", "outside", "type", "bridge")
            nsexec("outside", "ip", "addr", "add", f"{OUTSIDE_ADDR}/24", "dev", "br-out")
            nsexec("outside", "ip", "link", "set", "br-out", "up")
        nsexec("outside", "ip", "link", "set", f"to-{name}", "master", "br-out", "up")
        state = self.workdir / name
        state.mkdir(parents=True, exist_ok=True)
        agent = Agent(name, state / "state", state / "plexus.sock")
        self.agents[name] = agent
        if start_agent:
            agent.start()
        return agent

    def host_addr(self, name: str) -> str:
        return f"203.0.113.{list(self.agents).index(name) + 1}"

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill(signal.SIGTERM)
        # Containers' processes were started in their own sessions by the agent.
        for ns in sh("ip", "netns", "list").stdout.split("\n"):
            name = ns.split(" ")[0]
            if name:
                for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def world(workdir: Path) -> Iterator[World]:
    w = World(workdir)
    try:
        yield w
    finally:
        w.close()

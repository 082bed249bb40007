"""Run a real Prometheus server (Debian's ``prometheus``) for tests: it scrapes targets in one
network namespace (a simulated host's, where the agents' metrics listen on loopback) and a
test reads values back through its HTTP API (``/api/v1/query``), as a user's dashboard would.

Every wait is bounded; ``close`` (or leaving the ``with`` block) stops it (SIGTERM, then
SIGKILL) so no Prometheus outlives the test. Run inside ``tests/sandbox``.

Typical use::

    with Prometheus(tmp_path / "prom", "host1", ["127.0.0.1:9100"]) as prom:
        prom.wait_for("up", lambda v: v == 1)
        prom.value('sum(plexus_endpoints)')
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plexus.dataplane.netns import run_in_netns
from tests.harness.probes import netns_path

PROMETHEUS = "/usr/bin/prometheus"
PORT = 9091  # inside the namespace given (a simulated host's own: nothing else listens)


class PrometheusError(RuntimeError):
    """Prometheus did not start, or a query failed."""


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` over HTTP/1.0 from a socket in namespace ``ns``: (status, body)."""

    def go() -> bytes:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            chunks = []
            for _ in range(16384):  # bounded: 64 MiB at most
                chunk = s.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    raw = run_in_netns(netns_path(ns), go)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


class Prometheus:
    def __init__(self, workdir: Path, ns: str, targets: list[str], interval: str = "1s") -> None:
        self.workdir, self.ns, self.targets, self.interval = workdir, ns, targets, interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    def _config(self) -> Path:
        # YAML is a superset of JSON: no YAML writer needed.
        config = {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": "1m"},
            "scrape_configs": [{"job_name": "plexus",
                                "static_configs": [{"targets": self.targets}]}],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = ["nsenter", f"--net={netns_path(self.ns)}", "--", PROMETHEUS,
                f"--config.file={self._config()}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{PORT}", "--log.level=warn"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if http_get(self.ns, "127.0.0.1", PORT, "/-/ready", 1.0)[0] == 200:
                    return
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout}s")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (its ``result`` list)."""
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(self.ns, "127.0.0.1", PORT, path)
        answer = json.loads(body) if body.startswith("{") else {}
        if status != 200 or answer.get("status") != "success":
            raise PrometheusError(f"query {expr!r}: {status} {body[:300]}")
        return list(answer["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The value of a one-element result, None when empty."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"query {expr!r} gave {len(result)} series, not one")
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, good: Callable[[float], bool], timeout: float = 30.0) -> float:
        """Query ``expr`` until its value is ``good`` (bounded); that value."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last is not None and good(last):
                return last
            time.sleep(0.25)
        raise PrometheusError(f"{expr!r} still {last} after {timeout}s")

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

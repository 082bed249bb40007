"""Run real etcd members (Debian's etcd-server, 3.4) for tests and benchmarks.

* :class:`EtcdCluster` starts ``size`` members on loopback (or any address of the caller's
  network namespace, e.g. a simulated host's), each with its own data dir under ``workdir``
  and free ports, and waits until every member reports a leader (``GET /health``). Members
  can be stopped (SIGTERM), killed (SIGKILL) and started again on the same ports and data, so
  a test can restart etcd under a client or take one member of three away.
* :func:`make_certs` makes a throw-away CA, a server certificate (for the given IP addresses)
  and a client certificate with ``openssl``; ``EtcdCluster(tls=...)`` serves HTTPS/gRPC-TLS
  and requires client certificates, as a production etcd should.

Every wait is bounded. ``close`` (or leaving the ``with`` block) SIGKILLs whatever is still
running and reaps it, so no etcd outlives the test even when the test fails half-way. Run
inside ``tests/sandbox``: the sandbox's network namespace holds the ports.

Timing flags: heartbeat 50 ms and election timeout 500 ms (etcd's defaults are 100/1000)
make a single member elect itself sooner, and bring etcd's minimum lease TTL
(``ceil(1.5 * election ticks * heartbeat)``) down to one second, so lease tests take seconds.

Typical use::

    with EtcdCluster(tmp_path / "etcd") as etcd:
        store = EtcdStore(etcd.endpoints)
        etcd.members[0].restart()
        etcd.etcdctl("compact", "42")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
HEARTBEAT_MS = 50
ELECTION_MS = 500


class EtcdError(RuntimeError):
    """A member did not start, did not become healthy, or etcdctl failed."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files made by :func:`make_certs`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick; the sandbox is ours alone)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _openssl(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise EtcdError(f"openssl {args[0]}: {result.stderr.strip()}")


def _signed(name: str, subject: str, ext: str, directory: Path) -> tuple[Path, Path]:
    key, csr, crt = (directory / f"{name}.{s}" for s in ("key", "csr", "crt"))
    (directory / f"{name}.ext").write_text(ext)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", subject, cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", csr, "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", crt, "-extfile", f"{name}.ext",
             cwd=directory)  # fmt: skip
    return crt, key


def make_certs(directory: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> TlsFiles:
    """A CA, a server certificate valid for ``ips`` and a client certificate, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=plexus test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    sans = ",".join(f"IP:{ip}" for ip in ips)
    server = _signed("server", "/CN=etcd",
                     f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n", directory)
    client = _signed("client", "/CN=plexus", "extendedKeyUsage=clientAuth\n", directory)
    return TlsFiles(directory / "ca.crt", *server, *client)


class Member:
    """One etcd process; its ports and data dir stay the same across restarts."""

    def __init__(self, name: str, workdir: Path, host: str, tls: TlsFiles | None) -> None:
        self.name = name
        self.host = host
        self.tls = tls
        self.client_port = free_port(host)
        self.peer_port = free_port(host)
        self.data_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.cluster = ""  # --initial-cluster, set by EtcdCluster before the first start
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        command = [
            ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "plexus-test",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.tls is not None:
            command += [
                "--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth",
            ]  # fmt: skip
        return command

    def start(self) -> None:
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (etcd closes its connections and syncs), SIGKILL if it takes too long."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._end(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10.0)

    def healthy(self) -> bool:
        """etcd's own ``/health``: true once the member has a leader and serves requests."""
        try:
            with urllib.request.urlopen(
                f"{self.client_url}/health", timeout=1.0, context=self._ssl_context()
            ) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return context

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class EtcdCluster:
    """``size`` members on ``host``; see the module docstring. Use as a context manager."""

    def __init__(
        self, workdir: Path, size: int = 1, *, host: str = "127.0.0.1", tls: TlsFiles | None = None
    ) -> None:
        if not os.access(ETCD, os.X_OK):
            raise EtcdError(f"{ETCD} is missing: install Debian's etcd-server (make deps)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.members = [Member(f"m{i}", self.workdir, host, tls) for i in range(size)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.cluster = cluster

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The ``--store`` URL for every member."""
        return f"{'etcds' if self.tls else 'etcd'}://{','.join(self.endpoints)}"

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            member.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0, members: list[Member] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for member in members or [m for m in self.members if m.running]:
            while not member.healthy():
                if not member.running:
                    raise EtcdError(f"etcd {member.name} exited:\n{member.log_tail()}")
                if time.monotonic() > deadline:
                    raise EtcdError(f"etcd {member.name} not healthy in {timeout}s")
                time.sleep(0.05)

    def restart(self, member: Member, timeout: float = 30.0) -> None:
        member.restart()
        self.wait_healthy(timeout, [member])

    def etcdctl(self, *args: str, timeout: float = 30.0,
                members: list[Member] | None = None) -> str:
        """Runs etcdctl against ``members`` (default: the running ones); returns its stdout."""
        chosen = members if members is not None else [m for m in self.members if m.running]
        endpoints = ",".join(m.client_url for m in chosen)
        command = [ETCDCTL, f"--endpoints={endpoints}", "--command-timeout=10s"]
        if self.tls is not None:
            command += [f"--cacert={self.tls.ca}", f"--cert={self.tls.client_cert}",
                        f"--key={self.tls.client_key}"]  # fmt: skip
        env = {**os.environ, "ETCDCTL_API": "3"}
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
        if result.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def close(self) -> None:
        for member in self.members:
            member.kill()

    def __enter__(self) -> EtcdCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

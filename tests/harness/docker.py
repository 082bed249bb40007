"""Drive a real Docker engine (Debian's docker.io 20.10, containerd 1.6, runc) from tests/bench.

Each :class:`Dockerd` is a private engine, started inside ``tests/sandbox`` and stopped again:

* its own state: ``--data-root`` (images, containers, volumes, libnetwork's store) and
  ``daemon.json`` under ``workdir``; ``--exec-root``, ``--pidfile`` and the API socket
  (``-H unix://...``) in a short ``/tmp/pxdk-XXXXXXXX`` (unix socket paths are limited to 108
  bytes, and containerd's sockets live under the exec root);
* containerd is the one dockerd supervises (no ``--containerd``): dockerd 20.10 starts it only if
  ``/run/containerd/containerd.sock`` does not exist, with root/state/socket under the data and
  exec roots; stopping dockerd stops it;
* its own network namespace: ``netns`` (a name under /run/netns or a path), e.g. a simulated
  host; docker0, user-defined bridges, iptables rules, docker-proxy and every container's host
  side end up there (``--iptables`` is on; nothing in the caller's namespace changes);
* its own mount namespace, a child of the sandbox's, in which (all under ``workdir`` or gone
  with the namespace) the paths dockerd/containerd hard-code are caught:

  - ``/run`` is a fresh tmpfs, with the sandbox's ``/run/docker`` bind-mounted back (so plugin
    sockets in ``/run/docker/plugins`` are found): containerd 1.6 puts its shim sockets in
    ``/run/containerd/s`` whatever its state dir, and dockerd would use a system containerd
    whose socket it finds at ``/run/containerd/containerd.sock``; host's /run/dbus and
    /run/systemd are hidden, so no firewalld or systemd cgroup driver is detected;
  - ``/etc/docker`` is ``workdir/etc-docker`` (dockerd 20.10 writes ``key.json`` there; plugin
    ``*.spec``/``*.json`` files go to its ``plugins/``, see :meth:`Dockerd.add_plugin`);
  - ``/opt`` is an overlay (upper ``workdir/mounts/opt``): containerd's "opt" plugin creates
    ``/opt/containerd/{bin,lib}``.

  ``<exec-root>/netns`` is a shared mount, so the network namespaces dockerd bind-mounts there
  (a container's ``SandboxKey``) are visible to the caller, e.g. a plugin.
* containers' cgroups go under ``--cgroup-parent /plexus-docker-<token>`` (cgroupfs driver);
  :meth:`Dockerd.stop` removes them.

Nothing is pulled: :meth:`Dockerd.import_busybox` ``docker import``-s a tarball built from
Debian's busybox-static (``plexus-busybox:latest``), :meth:`Dockerd.import_iperf3` adds
``/usr/bin/iperf3`` and the shared libraries ``ldd`` lists (``plexus-iperf3:latest``).

Plugin discovery: dockerd looks for ``/run/docker/plugins/<name>.sock`` (the sandbox's private
tmpfs, shared by every Dockerd in the sandbox) and ``/etc/docker/plugins/<name>.spec`` (per
Dockerd). ``Dockerd(..., plugins={"plexus": agent_socket})`` writes such a spec file.

A plugin in dockerd's netns must know: with ``--iptables`` dockerd sets the FORWARD policy to
DROP and ``net.bridge.bridge-nf-call-iptables=1`` there, so even traffic bridged between two
ports of a plugin's own bridge is dropped unless accepted (e.g. in ``DOCKER-USER``).

Typical use::

    with Dockerd(tmp_path / "docker", netns="host1") as d:
        d.import_busybox()
        d.network_create("net1", subnet="10.91.0.0/24")
        d.run("c1", "net1")                          # sleep 3600
        d.run_http("c2", "net1", publish=["8080:80"])
        d.exec("c1", "ping", "-c1", "-W2", d.ip("c2", "net1"))
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tests.harness.image import BUSYBOX as BUSYBOX  # re-exported for the tests
from tests.harness.image import INDEX_HTML as INDEX_HTML
from tests.harness.image import ContainerCommands, build_image_tar
from tests.harness.reap import reap_zombies

IMAGE = "plexus-busybox:latest"
IPERF_IMAGE = "plexus-iperf3:latest"
IPERF3 = Path("/usr/bin/iperf3")
DOCKERD = "dockerd"
# The CLI matching the engine (docker.io ships it); any CLI works (it negotiates the API).
DOCKER_CLI_CANDIDATES = ("/usr/bin/docker", "docker")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "plexus-docker-"
# What the harness needs from Debian: docker.io pulls containerd, runc, tini (docker-init) and
# iptables; busybox-static makes the image; iperf3 for the throughput benchmark.
BUILTIN_NETWORKS = ("bridge", "host", "none")
# Processes that may be left as zombies re-parented to the sandbox's PID 1 (often our process).
# (comm is cut to 15 characters: containerd-shim-runc-v2 shows as containerd-shim.)
_REAPABLE = ("containerd", "containerd-shim", "docker-proxy", "runc", "docker-init")


class DockerError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# installation


def installed() -> bool:
    """dockerd, containerd and runc are on PATH."""
    return all(shutil.which(b) for b in ("dockerd", "containerd", "runc"))


def docker_cli() -> str:
    for c in DOCKER_CLI_CANDIDATES:
        found = shutil.which(c)
        if found:
            return found
    raise DockerError("no docker CLI: apt-get install docker.io")


# --------------------------------------------------------------------------------------------
# images


# --------------------------------------------------------------------------------------------
# the sandbox


def in_sandbox() -> bool:
    """True inside tests/sandbox: root, PLEXUS_SANDBOX=1 and its private tmpfs on /run/netns."""
    if os.environ.get("PLEXUS_SANDBOX") != "1" or os.geteuid() != 0:
        return False
    return "/run/netns" in _mounts()


def _mounts() -> dict[str, str]:
    """Mount point -> filesystem source, for the caller's mount namespace (last mount wins)."""
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            found[fields[4]] = fields[sep + 2]
    return found


def _netns_path(ns: str) -> str:
    return ns if ns.startswith("/") else f"/run/netns/{ns}"


# Runs as `sh -c SCRIPT sh RUN_STAGE ETC_DOCKER OPT_UPPER OPT_WORK dockerd ARGS...` in a new mount
# namespace (a child of the sandbox's), then execs dockerd. See the module docstring.
_MOUNT_SCRIPT = r"""
set -eu
stage=$1 etc_docker=$2 opt_upper=$3 opt_work=$4
shift 4
mount --bind /run/docker "$stage"
mount -t tmpfs -o mode=0755 plexus-dockerd-run /run
mkdir -p /run/docker /run/lock /run/containerd
ln -s /dev/shm /run/shm
mount --move "$stage" /run/docker
if [ -d /etc/docker ]; then mount --bind "$etc_docker" /etc/docker; fi
if [ -d /opt ]; then
  mount -t overlay -o "lowerdir=/opt,upperdir=$opt_upper,workdir=$opt_work" plexus-dockerd-opt /opt
fi
exec "$@"
"""


class Dockerd(ContainerCommands):
    """One private Docker engine (see the module docstring). Use as a context manager.

    ``netns``: the network namespace dockerd (and so every container's host side) lives in --
    a name under /run/netns or a path; None for the caller's.
    ``plugins``: name -> plugin address (a socket path or ``unix://``/``tcp://`` URL), written
    as ``/etc/docker/plugins/<name>.spec`` for dockerd's plugin discovery.
    ``extra_args``: more dockerd flags (``--bip``, ``--default-address-pool``, ...).
    ``cli``: the docker CLI binary (default: docker.io's /usr/bin/docker, else ``docker``).
    """

    def __init__(
        self,
        workdir: Path,
        netns: str | None = None,
        *,
        plugins: Mapping[str, str | Path] | None = None,
        iptables: bool = True,
        userland_proxy: bool = True,
        debug: bool = False,
        storage_driver: str | None = None,
        extra_args: Sequence[str] = (),
        daemon_json: Mapping[str, Any] | None = None,
        import_image: bool = False,
        start_timeout: float = 60,
        cli: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.netns = netns
        self.iptables = iptables
        self.userland_proxy = userland_proxy
        self.debug = debug
        self.storage_driver = storage_driver
        self.extra_args = list(extra_args)
        self.daemon_json = dict(daemon_json or {})
        self._import_on_start = import_image
        self.start_timeout = start_timeout
        self.data_root = self.workdir / "data"
        self.etc_docker = self.workdir / "etc-docker"  # /etc/docker in dockerd's mount ns
        self.spec_dir = self.etc_docker / "plugins"  # /etc/docker/plugins in dockerd's mount ns
        self.config_file = self.workdir / "daemon.json"
        self.log_path = self.workdir / "dockerd.log"
        self.cli_config = self.workdir / "cli"  # DOCKER_CONFIG: the CLI never writes ~/.docker
        self.opt_upper = self.workdir / "mounts" / "opt" / "upper"
        self.opt_work = self.workdir / "mounts" / "opt" / "work"
        self.run_stage = self.workdir / "mounts" / "run-docker"
        token = secrets.token_hex(4)
        self.rundir = Path(tempfile.gettempdir()) / f"pxdk-{token}"
        self.exec_root = self.rundir / "exec"
        self.netns_dir = self.exec_root / "netns"  # libnetwork's SandboxKey files
        self.pidfile = self.rundir / "docker.pid"
        self.socket = self.rundir / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.cgroup_parent = f"/{CGROUP_PREFIX}{token}"
        self.cli = cli or docker_cli()
        self.image = IMAGE
        self._plugins = dict(plugins or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._mnt_ns: str | None = None
        self._exec_root_shared = False
        self._open = False
        self.warnings: list[str] = []  # what stop() could not do but did not raise for

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def argv(self) -> list[str]:
        """dockerd's own command line (without the namespace wrappers)."""
        args = [
            DOCKERD,
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pidfile),
            "-H", self.host,
            "--config-file", str(self.config_file),
            "--cgroup-parent", self.cgroup_parent,
            "--exec-opt", "native.cgroupdriver=cgroupfs",
            f"--iptables={str(self.iptables).lower()}",
            f"--userland-proxy={str(self.userland_proxy).lower()}",
            "--shutdown-timeout", "5",
            "--log-level", "debug" if self.debug else "info",
        ]  # fmt: skip
        if self.storage_driver:
            args += ["--storage-driver", self.storage_driver]
        return args + self.extra_args

    def full_argv(self) -> list[str]:
        """The command line the harness runs: nsenter (netns) + unshare (mount ns) + dockerd."""
        prefix = ["nsenter", f"--net={_netns_path(self.netns)}", "--"] if self.netns else []
        return [
            *prefix,
            "unshare", "--mount", "--propagation", "unchanged", "--",
            "sh", "-c", _MOUNT_SCRIPT, "sh",
            str(self.run_stage), str(self.etc_docker), str(self.opt_upper), str(self.opt_work),
            *self.argv(),
        ]  # fmt: skip

    def start(self) -> Dockerd:
        if self._open:
            return self
        if not in_sandbox():
            raise DockerError("the Docker harness must run as root inside tests/sandbox")
        if not installed():
            raise DockerError("dockerd/containerd/runc missing: apt-get install docker.io")
        if _mounts().get("/run/docker") is None:
            raise DockerError("tests/sandbox has no private tmpfs on /run/docker (update it)")
        if self.netns and not Path(_netns_path(self.netns)).exists():
            raise DockerError(f"no network namespace {self.netns}")
        self._open = True
        try:
            _sweep_stale_cgroups()
            for d in (self.data_root, self.spec_dir, self.cli_config, self.opt_upper,
                      self.opt_work, self.run_stage, self.netns_dir):  # fmt: skip
                d.mkdir(parents=True, exist_ok=True)
            self.rundir.chmod(0o711)
            self.config_file.write_text(json.dumps(self.daemon_json, indent=2) + "\n")
            for name, addr in self._plugins.items():
                self.add_plugin(name, addr)
            self._share_exec_root()
            self._log = open(self.log_path, "ab")  # noqa: SIM115 -- open while dockerd runs
            self._log.write(f"# {' '.join(self.argv())}\n".encode())
            self._log.flush()
            self._proc = subprocess.Popen(
                self.full_argv(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.wait_ready(self.start_timeout)
            if self._import_on_start:
                self.import_busybox()
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until ``docker info`` answers; raises with the log's tail if dockerd dies or hangs."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise DockerError(f"dockerd exited while starting:\n{self.log_tail()}")
            if self._mnt_ns is None:
                with contextlib.suppress(OSError):
                    ns = os.readlink(f"/proc/{self._proc.pid}/ns/mnt")
                    if ns != os.readlink("/proc/self/ns/mnt"):
                        self._mnt_ns = ns
            if self.socket.exists():
                r = self.docker("version", "--format", "{{.Server.Version}}", check=False,
                                timeout=10)  # fmt: skip
                if r.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise DockerError(f"dockerd not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def stop(self, check: bool = True, keep_data: bool = False, remove: bool = True) -> None:
        """Remove containers and networks, stop dockerd (and so containerd and the shims), kill
        anything left in its mount namespace, unmount, drop cgroups and the run dir.

        The data root goes too unless ``keep_data``; ``dockerd.log`` stays in ``workdir``.
        ``check``: raise if something could not be removed or was left behind.
        ``remove``: ``docker rm -f`` / ``network rm`` first. With a plugin that is already gone
        dockerd retries every call to it for ~15 s (then gives up and removes anyway), so stop
        dockerd before the plugin -- or pass ``remove=False``.
        """
        if not self._open:
            return
        self._open = False
        errors: list[str] = []
        try:
            if self.running and remove:
                self._remove_all(errors)
            self._stop_daemon(errors)
            self._kill_namespace(errors)
        finally:
            reap_zombies(_REAPABLE)
            self._unmount_under(self.rundir)
            self._unmount_under(self.workdir)
            if self._exec_root_shared:
                subprocess.run(["umount", "-l", str(self.netns_dir)], capture_output=True,
                               timeout=10)  # fmt: skip
                self._exec_root_shared = False
            self._remove_cgroups(errors)
            shutil.rmtree(self.rundir, ignore_errors=True)
            if not keep_data:
                shutil.rmtree(self.data_root, ignore_errors=True)
                shutil.rmtree(self.workdir / "mounts", ignore_errors=True)
            if self._log is not None:
                self._log.close()
                self._log = None
        left = self.leftovers()
        if left:
            errors.append(f"left behind: {left}")
        if errors and check:
            raise DockerError("; ".join(errors))

    def _share_exec_root(self) -> None:
        """Bind ``<exec-root>/netns`` onto itself and make it shared before dockerd's mount ns
        is made: the netns files dockerd mounts there (``SandboxKey``) then show up here too."""
        for argv in (
            ["mount", "--bind", str(self.netns_dir), str(self.netns_dir)],
            ["mount", "--make-shared", str(self.netns_dir)],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)
        self._exec_root_shared = True

    def _remove_all(self, errors: list[str]) -> None:
        ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.split()
        if ids:
            r = self.docker("rm", "-f", "-v", *ids, check=False, timeout=120)
            if r.returncode != 0:
                errors.append(f"rm: {r.stderr.strip()}")
        nets = [n for n in self.networks_list() if n not in BUILTIN_NETWORKS]
        if nets:
            # Not an error: a plugin network cannot go once its plugin is gone (stop dockerd
            # before the plugin); the data root, and so the network, is removed anyway.
            r = self.docker("network", "rm", *nets, check=False, timeout=60)
            if r.returncode != 0:
                self.warnings.append(f"network rm: {r.stderr.strip()}")

    def _stop_daemon(self, errors: list[str], timeout: float = 30) -> None:
        p = self._proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                errors.append(f"dockerd ignored SIGTERM for {timeout}s, killed")
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)
        if p.returncode not in (0, None):
            errors.append(f"dockerd exited with {p.returncode}")

    def namespace_pids(self) -> list[int]:
        """Processes (still) in dockerd's mount namespace: containerd, shims, docker-proxy,
        containers -- all of them are gone after a clean :meth:`stop`."""
        if self._mnt_ns is None:
            return []
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry.name}/ns/mnt") == self._mnt_ns:
                        pids.append(int(entry.name))
        return pids

    def _kill_namespace(self, errors: list[str], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        # containerd exits a moment after dockerd; shims when their container is gone.
        while self.namespace_pids() and time.monotonic() < deadline - timeout / 2:
            reap_zombies(_REAPABLE)
            time.sleep(0.1)
        left = self.namespace_pids()
        if left:
            errors.append(f"processes left in dockerd's mount ns: {_describe(left)}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        while self.namespace_pids() and time.monotonic() < deadline:
            reap_zombies(_REAPABLE)
            time.sleep(0.1)

    def _unmount_under(self, path: Path) -> None:
        prefix = str(path) + "/"
        points = [p for p in _mounts() if p.startswith(prefix)]
        for mp in sorted(points, key=len, reverse=True):
            r = subprocess.run(["umount", mp], capture_output=True, timeout=10)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True, timeout=10)

    def _cgroups(self) -> list[Path]:
        name = self.cgroup_parent.lstrip("/")
        return [p for p in [CGROUP_ROOT / name, *CGROUP_ROOT.glob(f"*/{name}")] if p.is_dir()]

    def _remove_cgroups(self, errors: list[str]) -> None:
        tops = self._cgroups()
        for _ in range(50):  # processes may still be exiting
            left = []
            for top in tops:
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                try:
                    top.rmdir()
                except OSError:
                    left.append(top)
            if not left:
                return
            tops = left
            time.sleep(0.1)
        errors.append(f"cgroups left: {tops}")

    def leftovers(self) -> dict[str, list[str]]:
        """What a stopped Dockerd must not leave: processes, mounts, cgroups, the run dir."""
        found: dict[str, list[str]] = {}
        procs = self.namespace_pids()
        if self._proc is not None and self._proc.poll() is None:
            procs.append(self._proc.pid)
        if procs:
            found["processes"] = [_describe([p]) for p in procs]
        prefixes = (str(self.rundir) + "/", str(self.workdir) + "/")
        mounts = [m for m in _mounts() if m.startswith(prefixes) or m == str(self.rundir)]
        if mounts:
            found["mounts"] = mounts
        cgroups = self._cgroups()
        if cgroups:
            found["cgroups"] = [str(c) for c in cgroups]
        if self.rundir.exists():
            found["rundir"] = [str(self.rundir)]
        return found

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---------------------------------------------------------------- plugins

    def add_plugin(self, name: str, address: str | Path) -> Path:
        """Make plugin ``name`` discoverable at ``address`` (a socket path or a URL): writes
        ``/etc/docker/plugins/<name>.spec`` as dockerd sees it. dockerd reads specs when it
        first looks the plugin up (e.g. ``docker network create -d NAME``)."""
        addr = str(address)
        if "://" not in addr:
            addr = f"unix://{Path(addr).resolve()}"
        self.spec_dir.mkdir(parents=True, exist_ok=True)
        spec = self.spec_dir / f"{name}.spec"
        spec.write_text(addr + "\n")
        return spec

    @staticmethod
    def plugin_socket_path(name: str) -> Path:
        """Where dockerd looks for plugin ``name``'s socket (the sandbox's private tmpfs)."""
        return Path("/run/docker/plugins") / f"{name}.sock"

    # ---------------------------------------------------------------- the CLI

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_API_VERSION"):
            env.pop(k, None)
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.cli_config))
        return env

    def docker_argv(self, *args: str) -> list[str]:
        """``docker -H ... ARGS`` (for callers that time or spawn it; use with :meth:`env`)."""
        return [self.cli, "-H", self.host, *args]

    def docker(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``docker ARGS`` against this engine (bounded by ``timeout``)."""
        try:
            r = subprocess.run(
                self.docker_argv(*args),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env(),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise DockerError(f"docker {' '.join(args)}: timed out after {timeout}s") from e
        if check and r.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stderr.strip()}"
            )
        return r

    def info(self) -> dict[str, Any]:
        return dict(json.loads(self.docker("info", "--format", "{{json .}}").stdout))

    # ---------------------------------------------------------------- images

    def import_image(
        self, tag: str, binaries: Iterable[str | Path] = (), timeout: float = 120
    ) -> str:
        """``docker import`` a busybox root fs (plus ``binaries``) as ``tag`` (CMD /bin/sh)."""
        tar = build_image_tar(self.workdir / f"{tag.replace(':', '_').replace('/', '_')}.tar",
                              binaries=binaries)  # fmt: skip
        try:
            r = self.docker("import", "--change", 'CMD ["/bin/sh"]', str(tar), tag,
                            timeout=timeout)  # fmt: skip
        finally:
            tar.unlink(missing_ok=True)
        return r.stdout.strip()

    def import_busybox(self, tag: str = IMAGE) -> str:
        self.image = tag
        return self.import_image(tag)

    def import_iperf3(self, tag: str = IPERF_IMAGE) -> str:
        """busybox + /usr/bin/iperf3 and its libraries (libiperf, libcrypto, libsctp, libc...)."""
        if not IPERF3.exists():
            raise DockerError("iperf3 missing: apt-get install iperf3")
        return self.import_image(tag, binaries=[IPERF3])

    # ---------------------------------------------------------------- networks

    def network_create(
        self,
        name: str,
        *,
        driver: str = "bridge",
        subnet: str | Sequence[str] | None = None,
        gateway: str | Sequence[str] | None = None,
        ip_range: str | None = None,
        ipam_driver: str | None = None,
        ipam_options: Mapping[str, str] | None = None,
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        internal: bool = False,
        ipv6: bool = False,
        extra: Iterable[str] = (),
        timeout: float = 60,
    ) -> str:
        """``docker network create``; returns the network id."""
        args = ["network", "create", "-d", driver]
        for s in [subnet] if isinstance(subnet, str) else subnet or []:
            args += ["--subnet", s]
        for g in [gateway] if isinstance(gateway, str) else gateway or []:
            args += ["--gateway", g]
        if ip_range:
            args += ["--ip-range", ip_range]
        if ipam_driver:
            args += ["--ipam-driver", ipam_driver]
        for k, v in (ipam_options or {}).items():
            args += ["--ipam-opt", f"{k}={v}"]
        for k, v in (options or {}).items():
            args += ["-o", f"{k}={v}"]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        if internal:
            args.append("--internal")
        if ipv6:
            args.append("--ipv6")
        args += [*extra, name]
        return self.docker(*args, timeout=timeout).stdout.strip()

    def network_rm(self, *names: str, timeout: float = 60) -> None:
        self.docker("network", "rm", *names, timeout=timeout)

    def network_inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.docker("network", "inspect", name).stdout)[0])

    def networks_list(self) -> list[str]:
        r = self.docker("network", "ls", "--format", "{{.Name}}", check=False, timeout=30)
        return r.stdout.split() if r.returncode == 0 else []

    def connect(self, network: str, container: str, *extra: str, timeout: float = 60) -> None:
        """``docker network connect [--alias A --ip IP ...] NETWORK CONTAINER``."""
        self.docker("network", "connect", *extra, network, container, timeout=timeout)

    def disconnect(self, network: str, container: str, timeout: float = 60) -> None:
        self.docker("network", "disconnect", network, container, timeout=timeout)

    # ---------------------------------------------------------------- containers

    def run_args(
        self,
        network: str | None,
        *,
        name: str | None = None,
        detach: bool = True,
        rm: bool = False,
        publish: Iterable[str] = (),
        extra: Iterable[str] = (),
    ) -> list[str]:
        args = ["run"]
        if name:
            args += ["--name", name]
        if detach:
            args.append("-d")
        if rm:
            args.append("--rm")
        if network is not None:
            args += ["--network", network]
        for p in publish:
            args += ["-p", p]
        return args + list(extra)

    def run(
        self,
        name: str,
        network: str | None,
        *cmd: str,
        publish: Iterable[str] = (),
        extra: Iterable[str] = (),
        image: str | None = None,
        timeout: float = 60,
    ) -> str:
        """``docker run -d --name NAME --network NETWORK IMAGE CMD`` (default ``sleep 3600``).

        ``network``: a network name, ``none``, ``host`` or None for Docker's default (bridge).
        Names need at least two characters (dockerd 20.10). Returns the container id.
        """
        argv = self.run_args(network, name=name, publish=publish, extra=extra)
        argv += [image or self.image, *(cmd or ("sleep", "3600"))]
        try:
            r = self.docker(*argv, timeout=timeout)
        except DockerError:
            self.docker("rm", "-f", name, check=False, timeout=30)
            raise
        return r.stdout.strip().splitlines()[-1]

    def run_http(self, name: str, network: str | None, port: int = 80, **kw: Any) -> str:
        """A container serving ``INDEX_HTML`` with busybox httpd on ``port``."""
        return self.run(name, network, "httpd", "-f", "-p", str(port), "-h", "/www", **kw)

    def run_rm(
        self,
        network: str | None,
        *cmd: str,
        extra: Iterable[str] = (),
        image: str | None = None,
        timeout: float = 60,
    ) -> float:
        """``docker run --rm IMAGE CMD`` (default ``true``) in the foreground; wall time (s)."""
        argv = self.run_args(network, detach=False, rm=True, extra=extra)
        argv += [image or self.image, *(cmd or ("true",))]
        t0 = time.perf_counter()
        self.docker(*argv, timeout=timeout)
        return time.perf_counter() - t0

    def container_cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.docker(*args, check=check, timeout=timeout)

    def rm(self, *names: str, timeout: float = 60) -> None:
        """``docker rm -f NAMES`` (SIGKILL: busybox as PID 1 ignores SIGTERM)."""
        self.docker("rm", "-f", *names, timeout=timeout)

    def containers(self) -> list[str]:
        r = self.docker("ps", "-a", "--format", "{{.Names}}", check=False, timeout=30)
        return r.stdout.split() if r.returncode == 0 else []

    # ---------------------------------------------------------------- inspection

    def container_pid(self, name: str) -> int:
        return int(self.inspect(name)["State"]["Pid"])

    def sandbox_key(self, name: str) -> str:
        """The container's netns file (``<exec-root>/netns/<id>``), usable from the caller."""
        return str(self.inspect(name)["NetworkSettings"]["SandboxKey"])

    def netns_path(self, name: str) -> str:
        """A path to the container's netns usable from any mount namespace."""
        return f"/proc/{self.container_pid(name)}/ns/net"


# --------------------------------------------------------------------------------------------


def _describe(pids: Iterable[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            cmd = "?"
        out.append(f"{pid}:{cmd[:120]}")
    return ", ".join(out)


def _sweep_stale_cgroups() -> None:
    """rmdir empty ``plexus-docker-*`` cgroups a killed run left (busy ones stay)."""
    for top in [*CGROUP_ROOT.glob(f"{CGROUP_PREFIX}*"), *CGROUP_ROOT.glob(f"*/{CGROUP_PREFIX}*")]:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()



"""Drive a real containerd (Debian's 1.6, runc) and ``ctr run --cni`` from tests and bench.

Each :class:`Containerd` is a private daemon, started inside ``tests/sandbox`` and stopped again:

* its own state: ``root`` (content, snapshots, metadata), the config file, the CNI plugin and
  config dirs and the containers' logs under ``workdir``; the ``state`` dir and the gRPC/ttrpc
  sockets in a short ``/tmp/pxcd-XXXXXXXX`` (unix socket paths are limited to 108 bytes);
* its own mount namespace, a child of the sandbox's, held by a ``sleep`` process; containerd,
  its shims and every ``ctr`` command run in it (``nsenter``), and it catches the paths that
  containerd 1.6 and ctr hard-code:

  - ``/run`` is a fresh tmpfs (the sandbox's ``/run/netns`` bound back): the shims' sockets go
    to ``/run/containerd/s`` and runc's state to ``/run/containerd/runc`` whatever the config
    says, ctr's IO FIFOs to ``/run/containerd/fifo``;
  - ``/var/lib`` is an overlay (upper under ``workdir/mounts``): libcni caches every ADD's
    result in ``/var/lib/cni/results`` (DEL reads it back);
  - ``/opt/cni/bin`` and ``/etc/cni/net.d`` are ``cni_bin_dir`` and ``cni_conf_dir``: ctr 1.6
    calls ``gocni.New(gocni.WithDefaultConf)``, which knows only go-cni's defaults (no flag, no
    environment variable); a missing mount point is made inside an overlay of its nearest
    existing parent, so nothing is ever created on the host. (Debian's build appends
    /usr/lib/cni, the reference plugins, to the plugin path: ``CNI_PATH`` is
    ``/opt/cni/bin:/usr/lib/cni``, so ``cni_bin_dir`` wins.)

* its own network namespace: ``netns`` (a name under /run/netns or a path), e.g. a simulated
  host. ``ctr`` runs the CNI plugins there, so bridges and the host ends of veths land there.
* containers' cgroups under ``/plexus-ctr-<token>/<id>`` (``ctr run --cgroup``), removed by
  :meth:`Containerd.close`.

Nothing is pulled: the only image, ``localhost/plexus-busybox:latest``, is an OCI archive made
here from the root filesystem ``tests.harness.image.build_image_tar`` builds (busybox-static),
``ctr images import``-ed and unpacked with the ``overlayfs`` snapshotter (``native`` where
overlayfs does not work).

What ctr 1.6 does with CNI (see test_containerd_harness): ``ctr run --cni`` loads the first
config file of the conf dir and sends ADD with ``CNI_CONTAINERID=<namespace>-<id>``, ifname
``eth0`` and ``CNI_NETNS=/proc/<pid>/ns/net``. Only a foreground ``ctr run --rm --cni`` sends
DEL, when its task exits (with an empty ``CNI_NETNS``); a detached container (``ctr run -d``)
never gets a DEL: ``ctr task kill`` / ``task rm`` / ``container rm`` do not call CNI at all.

Typical use::

    with Containerd(tmp_path / "containerd", netns="host1") as cd:
        cd.write_conflist("net", bridge_plugins("net", "cni-net0", "10.89.7.0/24",
                                                ipam_dir=cd.ipam_dir))
        cd.run("a")                                # ctr run -d --cni ... sleep 3600
        cd.run_attached("b", "httpd", "-f", "-p", "80", "-h", "/www")   # ctr run --rm --cni
        cd.exec("a", "ping", "-c1", "-W2", cd.ip("b"))
        cd.rm("a")                                 # no CNI DEL (ctr 1.6)
        cd.stop_attached("b")                      # ctr itself sends DEL, deletes the container
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tests.harness.image import INDEX_HTML as INDEX_HTML  # re-exported for the tests
from tests.harness.image import build_image_tar
from tests.harness.reap import reap_zombies

IMAGE = "localhost/plexus-busybox:latest"
REFERENCE_PLUGIN_DIR = Path("/usr/lib/cni")
CNI_BIN_DIR = Path("/opt/cni/bin")  # go-cni's defaults, all ctr 1.6 knows
CNI_CONF_DIR = Path("/etc/cni/net.d")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "plexus-ctr-"
SNAPSHOTTERS = ("overlayfs", "native")
# Orphans that may become our zombies (comm is cut to 15 characters: containerd-shim-runc-v2
# shows as containerd-shim). Never containerd, ctr or nsenter: they are our own Popen children,
# and reaping one would steal its exit status from subprocess.
_REAPABLE = ("containerd-shim", "runc")


class ContainerdError(RuntimeError):
    """A ctr command failed or timed out, or the harness cannot run here."""


def bridge_plugins(
    network: str, bridge: str, subnet: str, *, ipam_dir: Path
) -> list[dict[str, Any]]:
    """The reference ``bridge`` + ``host-local`` chain (``dataDir`` in the work dir, not
    host-local's default /var/lib/cni/networks)."""
    return [{
        "type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(ipam_dir)},
    }]  # fmt: skip


# --------------------------------------------------------------------------------------------
# the image: an OCI image layout archive around build_image_tar's root filesystem

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def build_oci_archive(path: Path, name: str = IMAGE) -> Path:
    """``ctr images import`` reads image archives only (no root-fs tarball like ``docker
    import``): one uncompressed layer, a config (CMD /bin/sh) and a manifest, named by the
    ``io.containerd.image.name`` annotation of the index."""
    rootfs = build_image_tar(path.with_suffix(".rootfs.tar"))
    try:
        layer = rootfs.read_bytes()
    finally:
        rootfs.unlink(missing_ok=True)
    config = {
        "architecture": _go_arch(), "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }  # fmt: skip
    config_blob = json.dumps(config).encode()
    manifest_blob = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_blob),
        "layers": [_descriptor(OCI_LAYER, layer)],
    }).encode()  # fmt: skip
    entry = _descriptor(OCI_MANIFEST, manifest_blob)
    entry["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode(),
        **{f"blobs/sha256/{_digest(b)[7:]}": b for b in (layer, config_blob, manifest_blob)},
    }
    with tarfile.open(path, "w") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _descriptor(media_type: str, blob: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": _digest(blob), "size": len(blob)}


def _go_arch() -> str:
    """The platform ctr unpacks for by default, in Go's names (amd64, arm64, ...)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "i686": "386"}.get(machine, machine)


# --------------------------------------------------------------------------------------------


class Containerd:
    """One private containerd (see the module docstring). Use as a context manager.

    ``netns``: the network namespace containerd and every ``ctr`` command (hence the CNI
    plugins) run in -- a name under /run/netns or a path; None for the caller's. It may be
    changed between commands.
    ``snapshotter``: None picks ``overlayfs`` if containerd reports it usable, else ``native``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        netns: str | None = None,
        snapshotter: str | None = None,
        import_image: bool = True,
        namespace: str = "plexus",
    ) -> None:
        if snapshotter is not None and snapshotter not in SNAPSHOTTERS:
            raise ValueError(f"snapshotter must be one of {SNAPSHOTTERS}")
        self.workdir = Path(workdir).resolve()
        self.netns = netns
        self.snapshotter = snapshotter or ""
        self.import_image = import_image
        self.namespace = namespace
        self.image = IMAGE
        self.root = self.workdir / "root"
        self.config = self.workdir / "config.toml"
        self.log_dir = self.workdir / "logs"
        self.log_path = self.log_dir / "containerd.log"
        self.cni_bin_dir = self.workdir / "cni-bin"
        self.cni_conf_dir = self.workdir / "cni-net.d"
        self.ipam_dir = self.workdir / "ipam"
        self.mounts = self.workdir / "mounts"
        self.varlib_upper = self.mounts / "var-lib" / "upper"
        self.rundir = Path(tempfile.gettempdir()) / f"pxcd-{secrets.token_hex(4)}"
        self.socket = self.rundir / "containerd.sock"
        self.state = self.rundir / "state"
        self.cgroup_parent = f"/{CGROUP_PREFIX}{secrets.token_hex(4)}"
        self._holder: subprocess.Popen[str] | None = None
        self._daemon: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._attached: dict[str, subprocess.Popen[bytes]] = {}
        self._bridges: set[str] = set()
        self._open = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Containerd:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self, timeout: float = 30) -> Containerd:
        if self._open:
            return self
        for binary in ("containerd", "ctr", "containerd-shim-runc-v2", "runc"):
            if shutil.which(binary) is None:
                raise ContainerdError(f"{binary} missing: apt-get install containerd runc")
        if not _in_sandbox():
            raise ContainerdError("the containerd harness must run inside tests/sandbox")
        self._open = True
        try:
            _sweep_stale_cgroups()
            for d in (self.root, self.log_dir, self.cni_bin_dir, self.cni_conf_dir,
                      self.ipam_dir, self.state, self.rundir / "tmp"):  # fmt: skip
                d.mkdir(parents=True, exist_ok=True)
            for plugin in sorted(REFERENCE_PLUGIN_DIR.iterdir()):
                self.add_plugin(plugin)
            self._write_config()
            self._start_holder()
            self._start_daemon(timeout)
            self.snapshotter = self.snapshotter or self._pick_snapshotter()
            if self.import_image:
                archive = build_oci_archive(self.workdir / "image.oci.tar")
                self.ctr("images", "import", "--snapshotter", self.snapshotter, str(archive),
                         timeout=120)  # fmt: skip
                archive.unlink()
        except BaseException:
            self.close()
            raise
        return self

    def _write_config(self) -> None:
        # cri would load CNI configs and start a stream server; opt writes /opt/containerd.
        disabled = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]
        disabled += [f"io.containerd.snapshotter.v1.{s}" for s in ("aufs", "btrfs", "zfs",
                                                                    "devmapper")]  # fmt: skip
        self.config.write_text(
            f"""# written by tests.harness.containerd
version = 2
root = "{self.root}"
state = "{self.state}"
temp = "{self.rundir / "tmp"}"
disabled_plugins = {json.dumps(disabled)}
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
"""
        )

    def _start_holder(self, timeout: float = 10) -> None:
        """Start the process owning the mount namespace (see the module docstring)."""
        script = self._mount_script() + "echo ready\nexec sleep 2147483647\n"
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self._holder.stdout is not None
        ready, _, _ = select.select([self._holder.stdout], [], [], timeout)
        if (self._holder.stdout.readline() if ready else "").strip() != "ready":
            holder, self._holder = self._holder, None
            holder.kill()
            err = holder.communicate(timeout=10)[1]
            raise ContainerdError(f"could not set up containerd's mount namespace:\n{err}")

    def _mount_script(self) -> str:
        q = shlex.quote
        stage = self.rundir / "netns-stage"
        stage.mkdir(parents=True, exist_ok=True)
        lines = [
            "set -eu",
            "mount --make-rprivate /",  # nothing made here may propagate to the sandbox
            f"mount --bind /run/netns {q(str(stage))}",
            "mount -t tmpfs -o mode=0755 plexus-ctr-run /run",
            "mkdir -p /run/netns /run/lock /run/containerd",
            f"mount --move {q(str(stage))} /run/netns",
            *self._overlay(Path("/var/lib")),
        ]
        for target, source in ((CNI_BIN_DIR, self.cni_bin_dir), (CNI_CONF_DIR, self.cni_conf_dir)):
            parent = next(p for p in (target, *target.parents) if p.is_dir())
            if parent != target:
                if parent == Path("/"):
                    raise ContainerdError(f"cannot make {target}: no parent to overlay")
                lines += self._overlay(parent)
                lines.append(f"mkdir -p {q(str(target))}")  # inside the overlay (set -e)
            lines.append(f"mount --bind {q(str(source))} {q(str(target))}")
        return "\n".join(lines) + "\n"

    def _overlay(self, target: Path) -> list[str]:
        name = str(target).strip("/").replace("/", "-")
        upper, work = self.mounts / name / "upper", self.mounts / name / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        opts = shlex.quote(f"lowerdir={target},upperdir={upper},workdir={work}")
        return [f"mount -t overlay -o {opts} plexus-ctr-{name} {shlex.quote(str(target))}"]

    def _start_daemon(self, timeout: float) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 -- open while containerd runs
        self._daemon = subprocess.Popen(
            [*self._nsenter(), "containerd", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._daemon.poll() is not None:
                raise ContainerdError(f"containerd exited while starting:\n{self.log_tail()}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _pick_snapshotter(self) -> str:
        for line in self.ctr("plugins", "ls").stdout.splitlines():
            fields = line.split()
            if fields[:2] == ["io.containerd.snapshotter.v1", "overlayfs"] and fields[-1] == "ok":
                return "overlayfs"
        return "native"

    def close(self) -> None:
        """Remove every container and image, stop containerd and the shims, drop the mount
        namespace, cgroups, bridges and all state but ``log_dir``."""
        if not self._open:
            return
        self._open = False
        errors: list[str] = []
        try:
            if self.running:
                self._remove_all(errors)
            self._stop_daemon(errors)
            self._kill_namespace(errors)
        finally:
            self._stop_holder()
            reap_zombies(_REAPABLE)
            self._remove_cgroups(errors)
            self._remove_files()
            for br in sorted(self._bridges):  # the bridge plugin never deletes its bridge
                with contextlib.suppress(subprocess.SubprocessError):
                    self._ip("link", "del", br, check=False)
        if errors:
            raise ContainerdError("; ".join(errors))

    def _remove_files(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.rundir, ignore_errors=True)
        for child in self.workdir.iterdir() if self.workdir.exists() else []:
            if child == self.log_dir:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self._daemon is not None and self._daemon.poll() is None

    def _remove_all(self, errors: list[str]) -> None:
        for name in list(self._attached):
            with contextlib.suppress(ContainerdError):
                self.stop_attached(name)
        for name in self.tasks():
            r = self.ctr("tasks", "rm", "-f", name, check=False, timeout=30)
            if r.returncode != 0:
                errors.append(f"task rm {name}: {r.stderr.strip()}")
        for name in self.containers():
            r = self.ctr("containers", "rm", name, check=False, timeout=30)
            if r.returncode != 0:
                errors.append(f"container rm {name}: {r.stderr.strip()}")
        images = self.ctr("images", "ls", "-q", check=False).stdout.split()
        if images:
            self.ctr("images", "rm", "--sync", *images, check=False, timeout=60)

    def _stop_daemon(self, errors: list[str], timeout: float = 15) -> None:
        p, self._daemon = self._daemon, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"containerd ignored SIGTERM for {timeout}s, killed")
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def namespace_pids(self) -> list[int]:
        """Processes in the harness's mount namespace but its holder: containerd, shims,
        ctr. (Containers have mount namespaces of their own.)"""
        if self._holder is None or self._holder.poll() is not None:
            return []
        try:
            ns = os.readlink(f"/proc/{self._holder.pid}/ns/mnt")
        except OSError:
            return []
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and int(entry.name) != self._holder.pid:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry.name}/ns/mnt") == ns:
                        pids.append(int(entry.name))
        return pids

    def _kill_namespace(self, errors: list[str], timeout: float = 10) -> None:
        """Shims exit when containerd deletes their task; a straggler is killed (an error)."""
        deadline = time.monotonic() + timeout / 2
        while self.namespace_pids() and time.monotonic() < deadline:
            reap_zombies(_REAPABLE)
            time.sleep(0.05)
        left = self.namespace_pids()
        if left:
            errors.append(f"processes left in containerd's mount ns: {_describe(left)}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout / 2
        while self.namespace_pids() and time.monotonic() < deadline:
            reap_zombies(_REAPABLE)
            time.sleep(0.05)

    def _stop_holder(self) -> None:
        h, self._holder = self._holder, None
        if h is None:
            return
        h.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.communicate(timeout=10)

    def cgroups(self) -> list[Path]:
        name = self.cgroup_parent.lstrip("/")
        return [p for p in [CGROUP_ROOT / name, *CGROUP_ROOT.glob(f"*/{name}")] if p.is_dir()]

    def _remove_cgroups(self, errors: list[str]) -> None:
        tops = self.cgroups()
        for _ in range(50):  # bounded: processes may still be exiting
            tops = [t for t in tops if not _rmdir_tree(t)]
            if not tops:
                return
            time.sleep(0.1)
        errors.append(f"cgroups left: {tops}")

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # ---------------------------------------------------------------- CNI plugins and config

    def add_plugin(self, binary: Path, name: str | None = None) -> Path:
        """Make ``binary`` plugin type ``name`` in the plugin dir (ctr's /opt/cni/bin)."""
        link = self.cni_bin_dir / (name or binary.name)
        link.unlink(missing_ok=True)
        link.symlink_to(Path(binary).absolute())
        return link

    def write_conflist(
        self, network: str, plugins: Sequence[Mapping[str, Any]], cni_version: str = "1.0.0"
    ) -> Path:
        """Make ``network`` the one config ctr uses: ctr 1.6 loads only the first file of the
        conf dir (sorted), so this replaces any other. containerd 1.6 vendors libcni 1.1,
        which knows spec versions up to 1.0.0."""
        for p in plugins:
            if p.get("type") == "bridge" and p.get("bridge"):
                self._bridges.add(str(p["bridge"]))
        for old in self.cni_conf_dir.iterdir():
            old.unlink()
        path = self.cni_conf_dir / f"{network}.conflist"
        doc = {"cniVersion": cni_version, "name": network, "plugins": list(plugins)}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    # ---------------------------------------------------------------- ctr

    def argv(self, *args: str) -> list[str]:
        """``ctr ARGS`` against this containerd, in its mount and network namespaces."""
        ctr = ["ctr", "--address", str(self.socket), "--namespace", self.namespace]
        return [*self._nsenter(), *ctr, *args]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        env["TMPDIR"] = str(self.rundir / "tmp")
        return env

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr ARGS`` (bounded by ``timeout``)."""
        try:
            r = subprocess.run(
                self.argv(*args), capture_output=True, text=True, timeout=timeout,
                env=self.env(), stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise ContainerdError(f"ctr {' '.join(args)}: timed out after {timeout}s") from e
        finally:
            reap_zombies(_REAPABLE)
        if check and r.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def run_args(
        self, name: str, *cmd: str, cni: bool = True, extra: Sequence[str] = ()
    ) -> list[str]:
        """``run [--cni] --snapshotter S --cgroup PARENT/NAME EXTRA IMAGE NAME CMD``."""
        args = ["run", *(["--cni"] if cni else []), "--snapshotter", self.snapshotter]
        args += ["--cgroup", f"{self.cgroup_parent}/{name}", *extra, self.image, name]
        return args + list(cmd or ("sleep", "3600"))

    def run(self, name: str, *cmd: str, cni: bool = True, timeout: float = 60) -> int:
        """``ctr run -d [--cni] IMAGE NAME CMD`` (default ``sleep 3600``); output to
        ``log_dir/NAME.log``. Returns the task's pid."""
        log = f"file://{self.log_dir / name}.log"
        self.ctr(*self.run_args(name, *cmd, cni=cni, extra=["-d", "--log-uri", log]),
                 timeout=timeout)  # fmt: skip
        return self.pid(name)

    def run_http(self, name: str, port: int = 80, **kw: Any) -> int:
        """A detached container serving ``INDEX_HTML`` with busybox httpd on ``port``, once
        it listens."""
        pid = self.run(name, "httpd", "-f", "-p", str(port), "-h", "/www", **kw)
        self.wait_listening(name, port)
        return pid

    def wait_listening(self, name: str, port: int, timeout: float = 10) -> None:
        """Until a TCP socket listens on ``port`` in the container's netns (a task runs
        before its server has bound)."""
        if not wait_listening(self.pid(name), port, timeout):
            raise ContainerdError(f"{name} is not listening on {port} after {timeout}s")

    def run_attached(self, name: str, *cmd: str, timeout: float = 60) -> int:
        """``ctr run --rm --cni IMAGE NAME CMD`` in the foreground (a child process): when its
        task exits, ctr sends the CNI DEL and deletes the container. Returns the task's pid
        once it runs; :meth:`stop_attached` ends it."""
        with open(self.log_dir / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                self.argv(*self.run_args(name, *cmd, extra=["--rm"])), env=self.env(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._attached[name] = proc
        deadline = time.monotonic() + timeout
        while self.tasks().get(name, (0, ""))[1] != "RUNNING":
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop_attached(name)
                log = (self.log_dir / f"{name}.log").read_text(errors="replace")
                raise ContainerdError(f"ctr run --rm {name} did not start:\n{log[-2000:]}")
            time.sleep(0.05)
        return self.pid(name)

    def stop_attached(self, name: str, timeout: float = 30) -> int | None:
        """SIGKILL the task of a :meth:`run_attached` container, then wait for its ``ctr run``
        to finish (CNI DEL, task and container deleted). Returns ctr's exit status."""
        proc = self._attached.pop(name)
        if proc.poll() is None:
            self.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait(timeout=10)
            raise ContainerdError(f"ctr run --rm {name} still running after {timeout}s") from e

    def kill(self, name: str, timeout: float = 20) -> None:
        """``ctr task kill -s SIGKILL NAME`` and wait until the task is STOPPED."""
        self.ctr("tasks", "kill", "-s", "SIGKILL", name)
        deadline = time.monotonic() + timeout
        while self.tasks().get(name, (0, "STOPPED"))[1] != "STOPPED":
            if time.monotonic() > deadline:
                raise ContainerdError(f"task {name} not stopped after {timeout}s")
            time.sleep(0.05)

    def rm(self, *names: str) -> None:
        """``ctr task kill`` + ``ctr container rm`` (which deletes the stopped task and the
        snapshot). ctr 1.6 sends no CNI DEL here. A :meth:`run_attached` container is
        :meth:`stop_attached` instead."""
        for name in names:
            if name in self._attached:
                self.stop_attached(name)
                continue
            if name in self.tasks():
                self.kill(name)
            self.ctr("containers", "rm", name)

    def exec(
        self, name: str, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """``ctr task exec`` CMD in container ``name``."""
        exec_id = f"exec-{secrets.token_hex(4)}"
        return self.ctr("tasks", "exec", "--exec-id", exec_id, name, *cmd, check=check,
                        timeout=timeout)  # fmt: skip

    def fetch(self, name: str, url: str, timeout: int = 10) -> str:
        """HTTP GET from inside container ``name`` ("" on failure; busybox wget, bounded by
        busybox timeout: Debian's busybox-static 1.35 ``wget -T`` segfaults)."""
        r = self.exec(name, "timeout", str(timeout), "wget", "-q", "-O", "-", url,
                      check=False, timeout=timeout + 15)  # fmt: skip
        return r.stdout if r.returncode == 0 else ""

    # ---------------------------------------------------------------- inspection

    def tasks(self) -> dict[str, tuple[int, str]]:
        """Task name -> (pid, status) from ``ctr task ls``."""
        out = self.ctr("tasks", "ls").stdout.splitlines()[1:]
        return {f[0]: (int(f[1]), f[2]) for f in (line.split() for line in out) if len(f) == 3}

    def containers(self) -> list[str]:
        return self.ctr("containers", "ls", "-q").stdout.split()

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def pid(self, name: str) -> int:
        return self.tasks()[name][0]

    def netns_path(self, name: str) -> str:
        """The container's netns as ctr passes it to CNI (``/proc/PID/ns/net``)."""
        return f"/proc/{self.pid(name)}/ns/net"

    def cni_container_id(self, name: str) -> str:
        """``CNI_CONTAINERID`` as ctr sends it: ``<namespace>-<id>``."""
        return f"{self.namespace}-{name}"

    def addresses(self, name: str, ifname: str = "eth0") -> list[str]:
        """``ADDR/PREFIX`` of ``ifname`` in the container's netns, read with ``ip -j``."""
        out = subprocess.run(
            ["nsenter", f"--net={self.netns_path(name)}", "ip", "-j", "addr", "show", ifname],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out)
                for a in link["addr_info"] if a.get("scope") == "global"]  # fmt: skip

    def ip(self, name: str, ifname: str = "eth0") -> str:
        """The container's (first) IPv4 address."""
        for a in self.addresses(name, ifname):
            if ":" not in a:
                return a.split("/")[0]
        raise KeyError(f"{name} has no IPv4 address on {ifname}")

    # ---------------------------------------------------------------- helpers

    def _nsenter(self) -> list[str]:
        opts = []
        if self._holder is not None:
            opts.append(f"--mount=/proc/{self._holder.pid}/ns/mnt")
        if self.netns:
            opts.append(f"--net={_netns_path(self.netns)}")
        return ["nsenter", *opts, "--"] if opts else []

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix = ["nsenter", f"--net={_netns_path(self.netns)}", "--"] if self.netns else []
        return subprocess.run(
            [*prefix, "ip", *args], capture_output=True, text=True, timeout=10, check=check
        )


# --------------------------------------------------------------------------------------------


def wait_listening(pid: int, port: int, timeout: float = 10) -> bool:
    """Poll (bounded) for a TCP socket in LISTEN state on ``port`` in the network namespace
    of process ``pid``, read from /proc/PID/net/tcp{,6}: nothing connects to the server."""
    deadline = time.monotonic() + timeout
    while True:
        for table in ("tcp", "tcp6"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
                for line in f.readlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _in_sandbox() -> bool:
    """True inside tests/sandbox: root, PLEXUS_SANDBOX=1 and its private tmpfs on /run/netns."""
    if os.environ.get("PLEXUS_SANDBOX") != "1" or os.geteuid() != 0:
        return False
    with open("/proc/self/mountinfo") as f:
        return any(" /run/netns " in line and "plexus-netns" in line for line in f)


def _netns_path(ns: str | None) -> str:
    assert ns is not None
    return ns if ns.startswith("/") else f"/run/netns/{ns}"


def _rmdir_tree(top: Path) -> bool:
    """rmdir ``top`` and the cgroups below it, deepest first; True when it is gone."""
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    try:
        top.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _sweep_stale_cgroups() -> None:
    """rmdir empty ``plexus-ctr-*`` cgroups a killed run left (busy ones stay)."""
    for top in [*CGROUP_ROOT.glob(f"{CGROUP_PREFIX}*"), *CGROUP_ROOT.glob(f"*/{CGROUP_PREFIX}*")]:
        _rmdir_tree(top)


def _describe(pids: Sequence[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        out.append(f"{pid}:{cmd.strip()[:120]}")
    return ", ".join(out)



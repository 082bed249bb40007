"""Drive the real Podman (Debian's 4.3, runc, CNI or netavark backend) from tests and bench.

State: storage (``--root``), the CNI and netavark config dirs, host-local's data dir and a CNI
plugin dir of our own (symlinks to /usr/lib/cni/*, plus whatever a test adds with
:meth:`Podman.add_plugin`, e.g. the plexus plugin) live under ``workdir``. Run state
(``--runroot``, libpod's tmp dir with its file locks, runc's ``--root``) lives in a short
``/tmp/pxpm-XXXXXXXX``, because Podman refuses a runroot longer than 50 characters. Nothing is
pulled from a registry: the only image, ``localhost/plexus-busybox``, is ``podman import``-ed
from a tarball built from Debian's ``busybox-static``.

It must run inside ``tests/sandbox``; ``close()`` (or the context manager) removes every
container, image, cgroup, bridge and file it made. Every podman command runs (via ``nsenter``)
in a mount namespace of its own, a child of the sandbox's, where overlays catch the paths Podman
4.3 hard-codes and no flag or containers.conf key moves:

* /var/lib (upper: ``varlib_upper``): libcni's cache ``/var/lib/cni/results`` (DEL takes its
  config and prevResult from there) and ``/var/lib/containers/cache/blob-info-cache-v1.boltdb``
  (``podman import``);
* /run, for the netavark backend only (upper: ``run_upper``): netavark's IPAM db
  ``/run/containers/networks/ipam.db``.

/run/netns is shared with the sandbox's, so with CNI a container's netns file (``SandboxKey``,
``/run/netns/netns-<uuid>``) is visible to the caller; with netavark it exists only inside, so
use :meth:`Podman.netns_path` (``/proc/PID/ns/net``), which works with both.

runc always creates cgroups and a cgroup v1 hierarchy is global, so containers are put under
``--cgroup-parent /plexus-podman-<token>`` (``--cgroups no-conmon``) and ``close()`` removes
those cgroups. ``podman container cleanup``, which conmon runs when a container exits, sees the
same configuration: CONTAINERS_CONF and friends reach conmon through ``conmon_env_vars``, and
runc is a wrapper script pinning ``runc --root``.

Typical use::

    with Podman(tmp_path / "podman") as pm:
        pm.write_conflist("net", bridge_plugins("net", "cni-net0", "10.89.7.0/24",
                                                ipam_dir=pm.ipam_dir))
        pm.run("a", "net")                                  # sleep 3600
        pm.run_http("b", "net", publish=["8080:80"])        # busybox httpd serving INDEX_HTML
        pm.exec("a", "ping", "-c1", "-W2", pm.ip("b", "net"))
        pm.rm("a", "b")
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.harness.image import BUSYBOX as BUSYBOX  # re-exported for the tests
from tests.harness.image import INDEX_HTML as INDEX_HTML
from tests.harness.image import ContainerCommands, build_image_tar
from tests.harness.reap import reap_zombies

IMAGE = "localhost/plexus-busybox:latest"
REFERENCE_PLUGIN_DIR = Path("/usr/lib/cni")
RUNC = "/usr/bin/runc"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "plexus-podman-"
BACKENDS = ("cni", "netavark")


class PodmanError(RuntimeError):
    """A podman command failed or timed out, or the harness cannot run here."""


# --------------------------------------------------------------------------------------------
# conflist helpers


def bridge_plugins(
    network: str,
    bridge: str,
    subnet: str,
    *,
    ipam_dir: Path,
    gateway: str | None = None,
    ip_masq: bool = True,
    portmap: bool = True,
) -> list[dict[str, Any]]:
    """The reference ``bridge`` + ``host-local`` (+ ``portmap``) chain for a conflist.

    ``ipam_dir`` becomes host-local's ``dataDir`` (its default, /var/lib/cni/networks, is
    outside the work dir).
    """
    rng: dict[str, str] = {"subnet": subnet}
    if gateway:
        rng["gateway"] = gateway
    plugins: list[dict[str, Any]] = [
        {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": ip_masq,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[rng]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(ipam_dir),
            },
        }
    ]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return plugins


def _in_sandbox_mount_ns() -> bool:
    """True inside tests/sandbox: root, PLEXUS_SANDBOX=1 and its private tmpfs on /run/netns."""
    if os.environ.get("PLEXUS_SANDBOX") != "1" or os.geteuid() != 0:
        return False
    with open("/proc/self/mountinfo") as f:
        return any(" /run/netns " in line and "plexus-netns" in line for line in f)


# --------------------------------------------------------------------------------------------


class Podman(ContainerCommands):
    """One isolated Podman installation under ``workdir`` (see the module docstring).

    ``backend``: "cni" (our conflists in ``cni_config_dir``, plugins from ``cni_plugin_dir``)
    or "netavark" (Podman's default network "podman", 10.88.0.0/16 on bridge podman0).
    ``netns``: run podman (and so conmon, runc, the CNI plugins / netavark and every container's
    host side) in that network namespace (a name under /run/netns or a path) instead of the
    caller's -- e.g. a ``World`` host.
    ``env``: extra environment for podman *and* for conmon, hence for the CNI plugins run by
    ``podman container cleanup`` when a container exits by itself (conmon passes on nothing
    but ``conmon_env_vars``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        netns: str | None = None,
        backend: str = "cni",
        storage_driver: str = "overlay",
        import_image: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        self.workdir = Path(workdir).resolve()
        self.netns = netns
        self.backend = backend
        self.storage_driver = storage_driver
        self.import_image = import_image
        self.extra_env = dict(env or {})
        self.root = self.workdir / "root"
        # Podman refuses a runroot longer than 50 characters (conmon's socket paths), and pytest's
        # tmp_path is longer: run state goes to a short /tmp/pxpm-XXXXXXXX, removed by close().
        self.rundir = Path(tempfile.gettempdir()) / f"pxpm-{secrets.token_hex(4)}"
        self.runroot = self.rundir / "runroot"
        self.tmpdir = self.rundir / "tmp"
        self.runc_root = self.rundir / "runc"
        self.bin_dir = self.workdir / "bin"
        self.cni_plugin_dir = self.workdir / "cni-plugins"
        self.cni_config_dir = self.workdir / "cni-net.d"
        self.netavark_config_dir = self.workdir / "netavark"
        self.ipam_dir = self.workdir / "ipam"
        self.conf = self.workdir / "containers.conf"
        self.cgroup_parent = f"/{CGROUP_PREFIX}{secrets.token_hex(4)}"
        self.image = IMAGE
        self.varlib_upper = self.workdir / "mounts" / "varlib" / "upper"
        self.run_upper = self.workdir / "mounts" / "run" / "upper"
        self.overlay_run = backend == "netavark"
        self._holder: subprocess.Popen[str] | None = None
        self._bridges: set[str] = set()
        self._open = False

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Podman:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> Podman:
        if self._open:
            return self
        if shutil.which("podman") is None:
            raise PodmanError("podman missing: apt-get install podman runc netavark ...")
        self._open = True
        try:
            _sweep_stale_cgroups()
            self._start_holder()
            for d in (
                self.root, self.runroot, self.tmpdir, self.runc_root, self.bin_dir,
                self.cni_plugin_dir, self.cni_config_dir, self.netavark_config_dir, self.ipam_dir,
            ):  # fmt: skip
                d.mkdir(parents=True, exist_ok=True)
            for plugin in sorted(REFERENCE_PLUGIN_DIR.iterdir()):
                self.add_plugin(plugin)
            runc = self.bin_dir / "runc"  # named runc so podman treats it as runc
            runc.write_text(f'#!/bin/sh\nexec {RUNC} --root "{self.runc_root}" "$@"\n')
            runc.chmod(0o755)
            self._write_conf()
            if self.import_image:
                tar = build_image_tar(self.workdir / "image.tar")
                self.podman("import", "--change", 'CMD ["/bin/sh"]', str(tar), self.image)
        except BaseException:
            self.close()
            raise
        return self

    def _write_conf(self) -> None:
        env = json.dumps(
            [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                f"CONTAINERS_CONF={self.conf}",
                f"CONTAINERS_STORAGE_CONF={self.workdir / 'storage.conf'}",
                f"CONTAINERS_REGISTRIES_CONF={self.workdir / 'registries.conf'}",
                f"TMPDIR={self.tmpdir}",
                *(f"{k}={v}" for k, v in self.extra_env.items()),
            ]
        )
        self.conf.write_text(
            f"""# written by tests.harness.podman
[containers]
cgroups = "enabled"
log_driver = "k8s-file"
[network]
network_backend = "{self.backend}"
cni_plugin_dirs = ["{self.cni_plugin_dir}"]
network_config_dir = "{self.cni_config_dir}"
default_network = "podman"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
lock_type = "file"
tmp_dir = "{self.tmpdir}"
static_dir = "{self.root / "libpod"}"
volume_path = "{self.root / "volumes"}"
runtime = "runc"
conmon_env_vars = {env}
pull_policy = "never"
[engine.runtimes]
runc = ["{self.bin_dir / "runc"}"]
"""
        )
        (self.workdir / "storage.conf").write_text(
            f"""[storage]
driver = "{self.storage_driver}"
graphroot = "{self.root}"
runroot = "{self.runroot}"
"""
        )
        (self.workdir / "registries.conf").write_text("unqualified-search-registries = []\n")

    def close(self) -> None:
        """Remove every container and image, drop cgroups, links we made and all state."""
        if not self._open:
            return
        self._open = False
        errors: list[str] = []
        try:
            if self.root.exists():
                self._remove_all_containers(errors)
                r = self.podman("rmi", "-af", check=False, timeout=60)
                if r.returncode != 0:
                    errors.append(f"rmi: {r.stderr.strip()}")
        finally:
            self._remove_cgroups()
            for br in sorted(self._bridges):
                self._ip("link", "del", br, check=False)
            self._unmount_in_holder(self.workdir, self.rundir)
            self._stop_holder()
            shutil.rmtree(self.workdir, ignore_errors=True)
            shutil.rmtree(self.rundir, ignore_errors=True)
        if errors:
            raise PodmanError("; ".join(errors))

    def _start_holder(self, timeout: float = 10) -> None:
        """Start a process owning the mount namespace every podman command runs in.

        It is a child of the caller's (the sandbox's) mount namespace with an overlay on
        /var/lib, so libcni's cache and podman's blob-info cache land in ``varlib_upper``.
        /run/netns is made shared first, so container netns files podman mounts there show up
        in the caller's namespace too (``ip netns add`` and podman share it the same way).
        For netavark, /run is overlaid as well (its IPAM db is /run/containers/networks): then
        netns files exist only in there; reach a container's netns via :meth:`netns_path`.
        """
        if not _in_sandbox_mount_ns():
            raise PodmanError("the Podman harness must run inside tests/sandbox")
        subprocess.run(
            ["mount", "--make-shared", "/run/netns"], check=True, timeout=10, capture_output=True
        )
        cmds = ["mount --make-private /"]
        targets = [("/var/lib", self.varlib_upper)]
        if self.overlay_run:
            targets.append(("/run", self.run_upper))
        for target, upper in targets:
            work = upper.parent / "work"
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            cmds.append(
                f"mount -t overlay -o lowerdir={target},upperdir={upper},workdir={work} "
                f"plexus-{upper.parent.name} {target}"
            )
        script = " && ".join(cmds) + " && echo ready && exec sleep 2147483647"
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self._holder.stdout is not None
        ready, _, _ = select.select([self._holder.stdout], [], [], timeout)
        line = self._holder.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self._stop_holder()
            raise PodmanError("could not set up podman's mount namespace")

    def _stop_holder(self) -> None:
        h, self._holder = self._holder, None
        if h is None:
            return
        h.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.communicate(timeout=10)

    def _remove_all_containers(self, errors: list[str]) -> None:
        r = self.podman("rm", "-af", "-t", "0", check=False, timeout=120)
        if r.returncode != 0:
            errors.append(f"rm: {r.stderr.strip()}")

    def _remove_cgroups(self) -> None:
        name = self.cgroup_parent.lstrip("/")
        tops = [CGROUP_ROOT / name, *CGROUP_ROOT.glob(f"*/{name}")]
        for _ in range(50):  # processes may still be exiting
            left = []
            for top in tops:
                if not top.is_dir():
                    continue
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

    def _unmount_in_holder(self, *dirs: Path) -> None:
        """Unmount what storage left mounted under ``dirs`` in podman's mount namespace.

        The namespace dies with the holder anyway; this covers a straggler keeping it alive.
        """
        if self._holder is None or self._holder.poll() is not None:
            return
        pid = self._holder.pid
        prefixes = tuple(f"{d}/" for d in dirs)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/mountinfo") as f:
            points = [line.split()[4] for line in f]
            for mp in sorted((p for p in points if p.startswith(prefixes)), key=len, reverse=True):
                subprocess.run(
                    ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", "umount", "-l", mp],
                    capture_output=True,
                    timeout=10,
                )

    # ---------------------------------------------------------------- plugins and networks

    def add_plugin(self, binary: Path, name: str | None = None) -> Path:
        """Make ``binary`` available to Podman's CNI backend as plugin type ``name``."""
        link = self.cni_plugin_dir / (name or binary.name)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(Path(binary).absolute())
        return link

    def write_conflist(
        self, network: str, plugins: Sequence[Mapping[str, Any]], cni_version: str = "1.0.0"
    ) -> Path:
        """Write ``<network>.conflist`` into the CNI config dir (Podman reads it on every call)."""
        for p in plugins:
            if p.get("type") == "bridge" and p.get("bridge"):
                self._bridges.add(str(p["bridge"]))
        path = self.cni_config_dir / f"{network}.conflist"
        doc = {"cniVersion": cni_version, "name": network, "plugins": list(plugins)}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        return path

    def remove_conflist(self, network: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.cni_config_dir / f"{network}.conflist").unlink()

    # ---------------------------------------------------------------- running podman

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CONTAINERS_CONF=str(self.conf),
            CONTAINERS_STORAGE_CONF=str(self.workdir / "storage.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.workdir / "registries.conf"),
            TMPDIR=str(self.tmpdir),
        )
        env.update(self.extra_env)
        env.pop("CONTAINER_HOST", None)
        env.pop("CONTAINER_CONNECTION", None)
        return env

    def argv(self, *args: str) -> list[str]:
        """The full command line for ``podman ARGS`` (for callers that time or spawn it)."""
        cni = self.backend == "cni"
        return [
            *self._nsenter(),
            "podman",
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.tmpdir),
            "--storage-driver", self.storage_driver,
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "none",
            "--network-backend", self.backend,
            "--network-config-dir", str(self.cni_config_dir if cni else self.netavark_config_dir),
            *self._with_cgroup_parent(args),
        ]  # fmt: skip

    def _with_cgroup_parent(self, args: Sequence[str]) -> list[str]:
        """Every ``run``/``create`` gets our cgroup parent (there is no containers.conf key)."""
        args = list(args)
        i = 1 if args[:1] == ["container"] else 0
        if args[i : i + 1] in (["run"], ["create"]) and "--cgroup-parent" not in args:
            args[i + 1 : i + 1] = ["--cgroup-parent", self.cgroup_parent, "--cgroups", "no-conmon"]
        return args

    def podman(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` against this installation (bounded by ``timeout``); ``env``
        adds to its environment for this command only (e.g. ``CNI_ARGS``, which Podman's CNI
        backend passes on to the plugins)."""
        argv = self.argv(*args)
        try:
            r = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**self.env(), **(env or {})},
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise PodmanError(f"podman {' '.join(args)}: timed out after {timeout}s") from e
        reap_zombies(("conmon",))
        if check and r.returncode != 0:
            raise PodmanError(
                f"podman {' '.join(args)} failed ({r.returncode}):\n{r.stderr.strip()}"
            )
        return r

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
        args = ["run", "--pull", "never"]
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
        args += list(extra)
        return args

    def run(
        self,
        name: str,
        network: str | None,
        *cmd: str,
        publish: Iterable[str] = (),
        extra: Iterable[str] = (),
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """``podman run -d --name NAME --network NETWORK IMAGE CMD`` (default ``sleep 3600``).

        ``network``: a network name (``NAME:ip=...,mac=...`` works too), ``none``, ``host`` or
        None for Podman's default. ``env``: see :meth:`podman`. Returns the container id.
        """
        argv = self.run_args(network, name=name, publish=publish, extra=extra)
        argv += [self.image, *(cmd or ("sleep", "3600"))]
        try:
            r = self.podman(*argv, timeout=timeout, env=env)
        except PodmanError:
            self.podman("rm", "-f", "-t", "0", name, check=False)
            raise
        return r.stdout.strip().splitlines()[-1]

    def run_http(self, name: str, network: str | None, port: int = 80, **kw: Any) -> str:
        """A container serving ``INDEX_HTML`` with busybox httpd on ``port``."""
        return self.run(name, network, "httpd", "-f", "-p", str(port), "-h", "/www", **kw)

    def run_rm(
        self,
        network: str | None,
        *cmd: str,
        timeout: float = 60,
    ) -> float:
        """``podman run --rm IMAGE CMD`` (default ``true``) in the foreground; returns wall time."""
        argv = self.argv(*self.run_args(network, detach=False, rm=True), self.image)
        argv += cmd or ("true",)
        env = self.env()
        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        elapsed = time.perf_counter() - t0
        reap_zombies(("conmon",))
        if r.returncode != 0:
            raise PodmanError(f"podman run --rm failed ({r.returncode}):\n{r.stderr.strip()}")
        return elapsed

    def container_cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.podman(*args, check=check, timeout=timeout)

    def stop(self, *names: str, timeout: float = 60) -> None:
        self.podman("stop", "-t", "0", *names, timeout=timeout)

    def start(self, *names: str, timeout: float = 60) -> None:
        self.podman("start", *names, timeout=timeout)

    def rm(self, *names: str, timeout: float = 60) -> None:
        """``podman rm -f -t 0 NAMES``: stops (CNI DEL) and removes them."""
        self.podman("rm", "-f", "-t", "0", *names, timeout=timeout)

    # ---------------------------------------------------------------- inspection

    def networks(self, name: str) -> dict[str, dict[str, Any]]:
        return self.container_networks(name)

    def sandbox_key(self, name: str) -> str:
        """The container's netns path (``/run/netns/netns-<uuid>`` for bridge networks)."""
        return self.podman(
            "inspect", "--type", "container", "--format", "{{.NetworkSettings.SandboxKey}}", name
        ).stdout.strip()

    def pid(self, name: str) -> int:
        return int(self.inspect(name)["State"]["Pid"])

    def containers(self) -> list[str]:
        r = self.podman("ps", "-a", "--format", "{{.Names}}", check=False, timeout=30)
        return [n for n in r.stdout.split() if n] if r.returncode == 0 else []

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

    def netns_path(self, name: str) -> str:
        """A path to the container's netns usable from any mount namespace."""
        return f"/proc/{self.pid(name)}/ns/net"


def _sweep_stale_cgroups() -> None:
    """rmdir empty ``plexus-podman-*`` cgroups a killed run left (busy ones stay)."""
    for top in [*CGROUP_ROOT.glob(f"{CGROUP_PREFIX}*"), *CGROUP_ROOT.glob(f"*/{CGROUP_PREFIX}*")]:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _netns_path(ns: str | None) -> str:
    assert ns is not None
    return ns if ns.startswith("/") else f"/run/netns/{ns}"

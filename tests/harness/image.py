"""What the Docker and Podman harnesses share: the tiny busybox image the tests build themselves
(nothing is pulled from a registry), and the two commands they run inside containers."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BUSYBOX = Path("/bin/busybox")
INDEX_HTML = "hello from plexus-busybox\n"


class ImageError(RuntimeError):
    pass


def build_image_tar(
    path: Path, busybox: Path = BUSYBOX, binaries: Iterable[str | Path] = ()
) -> Path:
    """A tiny root filesystem: busybox-static, a /bin symlink per applet (sh, nc, ping, ip,
    wget, httpd, sleep, ...), /etc/passwd and group, /www/index.html (``INDEX_HTML``).

    ``binaries``: dynamically linked host binaries to add at the same path, with every shared
    library ``ldd`` lists (and the loader) at the path the loader looks for.
    """
    if not busybox.is_file():
        raise ImageError(f"{busybox} missing: apt-get install busybox-static")
    mtime = 1_700_000_000  # fixed, so the image is reproducible
    dirs: set[str] = set()

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d in dirs:
                continue
            dirs.add(d)
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
            tar.addfile(info)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            add_dir(tar, name.rsplit("/", 1)[0])
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, mtime
        tar.addfile(info, io.BytesIO(data))

    files: dict[str, Path] = {}
    for b in binaries:
        b = Path(b)
        if not b.is_file():
            raise ImageError(f"{b} missing")
        files[str(b)] = b
        for lib in _shared_libraries(b):
            files[lib] = Path(lib).resolve()

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "proc", "sys", "dev", "root", "run", "var", "www", "usr"):
            add_dir(tar, d)
        add_dir(tar, "tmp", 0o1777)
        add_file(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
        for applet in applets:
            if applet == "busybox" or f"/bin/{applet}" in files:
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            info.mtime, info.mode = mtime, 0o777
            tar.addfile(info)
        passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
        add_file(tar, "etc/passwd", passwd)
        add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file(tar, "www/index.html", INDEX_HTML.encode())
        for dest, src in sorted(files.items()):
            add_file(tar, dest, src.read_bytes(), 0o755)
    return path


def _shared_libraries(binary: Path) -> list[str]:
    """Absolute paths of the libraries (and loader) ``ldd binary`` lists."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=10).stdout
    libs = []
    for line in out.splitlines():
        for tok in line.split():
            if tok.startswith("/"):
                libs.append(tok)
                break
    return libs


class ContainerCommands:
    """What the docker and podman CLIs do alike: exec, fetch, inspect, addresses."""

    def container_cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def exec(
        self, name: str, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.container_cli("exec", name, *cmd, check=check, timeout=timeout)

    def fetch(self, name: str, url: str, timeout: int = 5) -> str:
        """HTTP GET from inside container ``name`` ("" on failure).

        Debian's busybox-static 1.35 ``wget -T`` segfaults, so the limit is busybox ``timeout``.
        """
        r = self.exec(
            name, "timeout", str(timeout), "wget", "-q", "-O", "-", url,
            check=False, timeout=timeout + 15,
        )  # fmt: skip
        return r.stdout if r.returncode == 0 else ""

    def inspect(self, name: str) -> dict[str, Any]:
        data = json.loads(self.container_cli("inspect", "--type", "container", name).stdout)
        return dict(data[0])

    def container_networks(self, name: str) -> dict[str, dict[str, Any]]:
        """Network name -> the runtime's view (IPAddress, IPPrefixLen, Gateway, MacAddress,
        Aliases)."""
        return dict(self.inspect(name)["NetworkSettings"].get("Networks") or {})

    def ip(self, name: str, network: str | None = None) -> str:
        nets = self.container_networks(name)
        for net, info in nets.items():
            if network in (None, net) and info.get("IPAddress"):
                return str(info["IPAddress"])
        raise KeyError(f"{name} has no IPv4 address on {network or 'any network'}: {nets}")

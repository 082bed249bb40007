"""Helpers shared by the benchmarks: percentiles, plain-text tables, namespaces, CNI exec.

Every benchmark runs inside ``tests/sandbox`` (fresh net, mount and pid namespaces with a private
/run/netns), so nothing here ever touches the root network namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
CNI_PATH = "/usr/lib/cni"
CNI_VERSION = "1.0.0"

_libc = ctypes.CDLL(None, use_errno=True)


def require_sandbox(name: str) -> bool:
    """True when it is safe to run (root inside tests/sandbox); prints how to run it otherwise."""
    if os.environ.get("PLEXUS_SANDBOX") == "1" and os.geteuid() == 0:
        return True
    print(f"run me inside the sandbox: tests/sandbox .venv/bin/python bench/{name}")
    return False


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float, b: float) -> str:
    if not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


# --- output ----------------------------------------------------------------------------------


def header(title: str, lines: Sequence[str] = ()) -> None:
    bar = "=" * max(72, len(title) + 4)
    print(bar)
    print(f"  {title}")
    for line in lines:
        print(f"  {line}")
    print(bar)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "",
                align: str = "") -> None:
    """A plain-text table. ``align`` has one letter per column, "l" or "r"; by default the first
    column is left-aligned and the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(row, widths, align, strict=True)).rstrip()

    if title:
        print(f"\n{title}")
    line = fmt(cells[0])
    print(line)
    print("-" * max(len(fmt(r)) for r in cells))
    for row in cells[1:]:
        print(fmt(row))


# --- namespaces ------------------------------------------------------------------------------


def sh(*argv: str, check: bool = True, timeout: float = 60, stdin: str | None = None,
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout,
                          input=stdin)


def netns_batch(verb: str, names: Sequence[str], timeout: float = 300) -> None:
    """``ip netns add|del`` for many names with one ``ip -batch`` process."""
    if names:
        script = "".join(f"netns {verb} {n}\n" for n in names)
        sh("ip", "-force", "-batch", "-", stdin=script, check=verb == "add", timeout=timeout)


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    """Move the *calling thread* into the netns at ``path`` and back on exit.

    Children it forks start in that namespace, as they would under a runtime living there (the
    reference CNI plugins are then executed directly, without an extra ``nsenter`` exec).
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns(back): {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(home)


def host_links(ns: str) -> list[dict[str, Any]]:
    """``ip -j -d link`` inside netns ``ns`` (an independent view of the kernel)."""
    out = sh("nsenter", f"--net=/run/netns/{ns}", "--", "ip", "-j", "-d", "link").stdout
    return list(json.loads(out))


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of ``pid`` in KiB, from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0])
    return out


def proc_cpu(pid: int) -> float:
    """utime + stime of ``pid`` (its own threads, not its children) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- CNI -------------------------------------------------------------------------------------


@dataclass
class CniResult:
    seconds: float
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.stdout)) if self.stdout.strip() else {}


def bridge_config(name: str, bridge: str, subnet: str, data_dir: str, ip_masq: bool = True,
                  ) -> dict[str, Any]:
    """A reference ``bridge`` + ``host-local`` network configuration (gateway, default route)."""
    return {
        "cniVersion": CNI_VERSION,
        "name": name,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": ip_masq,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": data_dir,
        },
    }


def cni_exec(command: str, config: dict[str, Any], container_id: str, netns: str,
             ifname: str = "eth0", timeout: float = 60) -> CniResult:
    """Execute a CNI plugin of /usr/lib/cni (the config's "type") exactly as a runtime does: CNI_*
    in the environment, the network configuration on stdin, the result on stdout. The plugin
    runs in the caller's *thread's* network namespace (see ``in_netns``). Only the exec itself
    is timed."""
    return plugin_exec(os.path.join(CNI_PATH, str(config["type"])), command, config,
                       container_id, netns, ifname=ifname, timeout=timeout)


def plugin_exec(binary: str | Path, command: str, config: dict[str, Any], container_id: str,
                netns: str, ifname: str = "eth0", cni_path: str = CNI_PATH, timeout: float = 60,
                ) -> CniResult:
    """Like ``cni_exec``, for the plugin at ``binary`` (e.g. plexus's, installed elsewhere) with
    ``cni_path`` as CNI_PATH. Timed from before the fork to after the wait."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    data = json.dumps(config)
    t0 = time.perf_counter()
    r = subprocess.run([str(binary)], input=data, env=env, capture_output=True, text=True,
                       timeout=timeout)
    elapsed = time.perf_counter() - t0
    return CniResult(elapsed, r.returncode, r.stdout, r.stderr)


# --- plexus diagnostics ----------------------------------------------------------------------


def missing_veths(endpoints: list[dict[str, Any]], links: list[dict[str, Any]]) -> list[str]:
    """Endpoints the agent lists whose host-side veth is not in the kernel."""
    present = {ln["ifname"] for ln in links}
    return [f"{e['container_id']} ({e.get('host_ifname')})" for e in endpoints
            if e.get("host_ifname") and e["host_ifname"] not in present]


def logged_orphans(log: Path) -> list[tuple[datetime, str]]:
    """(when, link) for every link the agent's periodic reconcile reported deleting as an orphan
    (from its log; the report's orphan *store keys*, which contain "/", are left out)."""
    found: list[tuple[datetime, str]] = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            if "reconcile" not in line:
                continue
            try:
                when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            except ValueError:
                when = datetime.min
            for group in re.findall(r"orphans=\[([^\]]*)\]", line):
                names = (x.strip(" '\"") for x in group.split(","))
                found += [(when, n) for n in names if n and "/" not in n]
    return found

"""Execute CNI plugins exactly as a runtime does: environment, stdin, stdout, exit code."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE_DIR = "/usr/lib/cni"


@dataclass
class CniResult:
    code: int
    out: dict[str, Any]
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def error_code(self) -> int | None:
        return None if self.ok else int(self.out.get("code", -1))


def exec_plugin(
    plugin: str | Path,
    command: str,
    config: dict[str, Any] | str,
    *,
    container_id: str = "",
    netns: str | None = "",
    ifname: str = "eth0",
    args: str = "",
    path: str = REFERENCE_DIR,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60,
    in_netns: str | None = None,
) -> CniResult:
    """``in_netns``: the runtime's own namespace (where the host's agent runs); a runtime
    executes plugins there, and meta plugins look for the host end of the veth there."""
    env = {"CNI_COMMAND": command, "CNI_PATH": path, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if command not in ("VERSION", "STATUS", "GC"):
        env.update({"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname})
        if netns is not None:
            env["CNI_NETNS"] = netns
        if args:
            env["CNI_ARGS"] = args
    env.update(extra_env or {})
    stdin = config if isinstance(config, str) else json.dumps(config)
    argv = [str(plugin)]
    if in_netns is not None:
        argv = ["nsenter", f"--net={in_netns}", "--", *argv]
    p = subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else {}
    except ValueError:
        out = {"unparsable": p.stdout}
    return CniResult(p.returncode, out, p.stdout, p.stderr)


def chain(
    plugins: list[tuple[str | Path, dict[str, Any]]],
    command: str,
    conflist: dict[str, Any],
    **kw: Any,
) -> list[CniResult]:
    """Run a conflist's plugins in order (ADD/CHECK) or in reverse (DEL), passing each ADD
    result on as the next plugin's prevResult, as libcni does."""
    results: list[CniResult] = []
    prev: dict[str, Any] | None = kw.pop("prev_result", None)
    order = list(reversed(plugins)) if command == "DEL" else plugins
    for binary, plugin_conf in order:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin_conf}
        if prev is not None:
            conf["prevResult"] = prev
        r = exec_plugin(binary, command, conf, **kw)
        results.append(r)
        if not r.ok:
            break
        if command == "ADD":
            prev = r.out
    return results

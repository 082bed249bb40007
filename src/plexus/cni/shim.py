"""plexus's CNI plugin binary: a thin shim that forwards each verb to the agent.

A runtime executes the plugin for every ADD, DEL, CHECK, STATUS, GC and VERSION, so it must start
fast: this file imports only the standard library (nothing from plexus, no site-packages; it is
installed with ``#!<python> -I -S``) and speaks HTTP/1.0 over the agent's unix socket by hand.

It validates what the spec makes the plugin's job before anything reaches the agent (the
environment, the config's JSON, its name and version), answers VERSION itself, and prints the
agent's result or error. Errors are a JSON object on stdout with a non-zero exit (libcni parses
stdout); diagnostics go to stderr.

Installed as ``plexus`` (a main plugin) and ``plexus-ipam`` (an IPAM plugin for other main
plugins such as the reference ``bridge``); the name it is run as selects the mode.
"""

from __future__ import annotations  # annotations stay strings: no `typing` import at start-up

import json
import os
import re
import socket
import sys

# Importing `typing` costs start-up time on every CNI call; type checkers see this block
# (mypy treats any name TYPE_CHECKING as true), the interpreter never runs it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, NoReturn

    Env = Mapping[str, str]
    Json = Any

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SOCKET = "/run/plexus/plexus.sock"
NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
TIMEOUT = 120.0
REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}


class Failure(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def _vt(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in version.split("."))
    except ValueError:
        raise Failure(1, "incompatible CNI versions", f"invalid cniVersion {version!r}") from None


def check_env(command: str, env: Env) -> None:
    missing = [k for k in REQUIRED[command] if not env.get(k)]
    # Set but empty is "unknown container" (3) for skel; absent is a missing variable (4).
    if "CNI_CONTAINERID" in missing and "CNI_CONTAINERID" in env:
        raise Failure(3, "missing containerID")
    if missing:
        raise Failure(4, f"required env variables [{','.join(missing)}] missing")
    cid = env.get("CNI_CONTAINERID", "")
    if cid and not NAME_RE.match(cid):
        raise Failure(4, f"invalid characters in containerID {cid!r}")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK") and (
        len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname)
    ):
        raise Failure(4, f"invalid CNI_IFNAME {ifname!r}")


def check_config(command: str, config: object) -> None:
    if not isinstance(config, dict):
        raise Failure(6, "failed to decode network configuration: not a JSON object")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise Failure(7, "missing network name")
    if not NAME_RE.match(name):
        raise Failure(7, f"invalid characters found in network name {name!r}")
    version = str(config.get("cniVersion", "0.1.0"))
    if version not in SUPPORTED:
        raise Failure(
            1, "incompatible CNI versions", f"config is {version!r}, plugin supports {SUPPORTED}"
        )
    if command == "CHECK" and _vt(version) < (0, 4):
        raise Failure(1, "config version does not allow CHECK")
    if command in ("GC", "STATUS") and _vt(version) < (1, 1):
        raise Failure(1, f"config version does not allow {command}")


def call_agent(path: str, body: dict[str, object]) -> dict[str, Json]:
    """POST /v1/cni over the unix socket; returns the decoded JSON answer."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/cni HTTP/1.0\r\nHost: plexus\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(head + payload)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, body_bytes = rest.partition(b"\r\n\r\n")
    status = int(status_line.split()[1])
    answer = json.loads(body_bytes) if body_bytes else {}
    if status >= 400 and "error" not in answer:
        raise Failure(999, f"agent answered HTTP {status}")
    return answer


def run(argv: list[str], env: Env, stdin: str) -> dict[str, Json] | None:
    command = env.get("CNI_COMMAND", "")
    if not command:
        print("plexus CNI plugin, CNI spec versions " + ", ".join(SUPPORTED), file=sys.stderr)
        return None
    if command == "VERSION":
        try:
            asked = json.loads(stdin or "{}").get("cniVersion", "1.1.0")
        except (ValueError, AttributeError):
            asked = "1.1.0"
        return {
            "cniVersion": asked if asked in SUPPORTED else "1.1.0",
            "supportedVersions": SUPPORTED,
        }
    if command not in REQUIRED:
        raise Failure(4, f"unknown CNI_COMMAND {command!r}")
    check_env(command, env)
    try:
        config = json.loads(stdin)
    except ValueError as exc:
        raise Failure(6, f"failed to decode network configuration: {exc}") from None
    check_config(command, config)
    mode = "ipam" if os.path.basename(argv[0]).endswith("-ipam") else "main"
    # An IPAM plugin's own settings live in the "ipam" block of the main plugin's config.
    ipam = config.get("ipam") if isinstance(config.get("ipam"), dict) else {}
    own = ipam if mode == "ipam" else config
    path = str(own.get("socket") or env.get("PLEXUS_SOCKET") or DEFAULT_SOCKET)
    body = {
        "command": command,
        "container_id": env.get("CNI_CONTAINERID", ""),
        "netns": env.get("CNI_NETNS", ""),
        "ifname": env.get("CNI_IFNAME", ""),
        "args": env.get("CNI_ARGS", ""),
        "config": config,
        "mode": mode,
    }
    try:
        answer = call_agent(path, body)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        code = 50 if command == "STATUS" else 11
        raise Failure(
            code,
            f"the plexus agent is not reachable at {path}",
            f"{exc.strerror}; is `plexus agent` running?",
        ) from None
    except (OSError, ValueError) as exc:
        raise Failure(999, f"talking to the plexus agent at {path} failed", str(exc)) from None
    if "error" in answer:
        err = answer["error"]
        raise Failure(int(err.get("code", 999)), err.get("msg", "error"), err.get("details", ""))
    return answer.get("result")


def main() -> None:
    version = "1.1.0"
    try:
        stdin = (
            ""
            if os.environ.get("CNI_COMMAND") == "VERSION" and sys.stdin.isatty()
            else sys.stdin.read()
        )
    except OSError as exc:
        _fail(version, Failure(5, f"cannot read stdin: {exc}"))
    try:
        version = str(json.loads(stdin).get("cniVersion", version))
    except (ValueError, AttributeError):
        version = "1.1.0"  # not JSON: the error says so in the current version
    try:
        result = run(sys.argv, os.environ, stdin)
    except Failure as exc:
        _fail(version, exc)
    except Exception as exc:  # a bug here must still answer the runtime in the protocol
        _fail(version, Failure(999, f"internal error in the plexus CNI shim: {exc!r}"))
    if result is not None:
        sys.stdout.write(json.dumps(result))
    sys.exit(0)


def _fail(version: str, exc: Failure) -> NoReturn:
    error = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        error["details"] = exc.details
    sys.stdout.write(json.dumps(error))
    print(f"plexus: {exc.msg}" + (f" ({exc.details})" if exc.details else ""), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()

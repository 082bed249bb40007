"""plexus's CNI plugin binary: a thin shim that forwards each verb to the agent.

A runtime executes the plugin for every ADD, DEL, CHECK, STATUS, GC and VERSION, so it must start
fast: this file imports only the standard library (nothing from plexus, no site-packages; it is
installed with ``#!<python> -I -S``) and speaks HTTP/1.0 over the agent's unix socket by hand.

Start-up is most of a CNI call's cost (Podman runs VERSION on every plugin several times per
container), so even ``json``, ``re`` and ``socket`` are avoided: importing them costs ~17 ms
(``json`` pulls in ``re``, ``enum``, ``functools``), against ~1 ms for the C modules they wrap
(``_json``'s scanner and string encoder, ``_socket``).

It validates what the spec makes the plugin's job before anything reaches the agent (the
environment, the config's JSON, its name and version), answers VERSION itself, and prints the
agent's result or error. Errors are a JSON object on stdout with a non-zero exit (libcni parses
stdout); diagnostics go to stderr.

Installed as ``plexus`` (a main plugin) and ``plexus-ipam`` (an IPAM plugin for other main
plugins such as the reference ``bridge``); the name it is run as selects the mode.
"""

from __future__ import annotations  # annotations stay strings: no `typing` import at start-up

import _json
import _socket
import posix  # `os` costs ~5 ms to import; its C core is all the shim needs
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
ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
NAME_CHARS = ALNUM | frozenset("_.-")
TIMEOUT = 120.0
REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}


class _JsonContext:
    """What ``_json.make_scanner`` reads from ``json.JSONDecoder``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict[str, str] = {}  # noqa: RUF012 - read once by the C scanner


_scan = _json.make_scanner(_JsonContext())  # type: ignore[arg-type]  # typeshed wants the class


def loads(text: str) -> Json:
    body = text.strip(" \t\r\n")
    try:
        value, end = _scan(body, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    except Exception as exc:  # the C scanner's JSONDecodeError, without importing json
        raise ValueError(str(exc)) from None
    if end != len(body):
        raise ValueError(f"extra data after JSON at character {end}")
    return value


def dumps(value: Json) -> str:
    if isinstance(value, str):
        return str(_json.encode_basestring_ascii(value))
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def valid_name(name: str) -> bool:
    """``^[a-zA-Z0-9][a-zA-Z0-9_.-]*$``, the spec's container ID and network name rule."""
    return bool(name) and name[0] in ALNUM and all(c in NAME_CHARS for c in name)


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
    if cid and not valid_name(cid):
        raise Failure(4, f"invalid characters in containerID {cid!r}")
    ifname = env.get("CNI_IFNAME", "")
    if command in ("ADD", "DEL", "CHECK") and (
        len(ifname) > 15 or ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname)
    ):
        raise Failure(4, f"invalid CNI_IFNAME {ifname!r}")


def check_config(command: str, config: object) -> None:
    if not isinstance(config, dict):
        raise Failure(6, "failed to decode network configuration: not a JSON object")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise Failure(7, "missing network name")
    if not valid_name(name):
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
    payload = dumps(body).encode()
    head = (
        f"POST /v1/cni HTTP/1.0\r\nHost: plexus\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(TIMEOUT)
        s.connect(path)
        s.sendall(head + payload)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        s.close()
    raw = b"".join(chunks)
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, body_bytes = rest.partition(b"\r\n\r\n")
    status = int(status_line.split()[1])
    answer = loads(body_bytes.decode()) if body_bytes else {}
    if status >= 400 and "error" not in answer:
        raise Failure(999, f"agent answered HTTP {status}")
    return answer


def version_result(stdin: str) -> dict[str, Json]:
    try:
        asked = loads(stdin or "{}").get("cniVersion", "1.1.0")
    except (ValueError, AttributeError):
        asked = "1.1.0"
    return {"cniVersion": asked if asked in SUPPORTED else "1.1.0", "supportedVersions": SUPPORTED}


def prepare(argv0: str, env: Env, stdin: str) -> tuple[str, dict[str, Json]]:
    """Validate what the spec makes the plugin's job and build the agent's request: (socket
    path, body). Shared with the agent, which runs it for the compiled shim."""
    command = env.get("CNI_COMMAND", "")
    if command not in REQUIRED:
        raise Failure(4, f"unknown CNI_COMMAND {command!r}")
    check_env(command, env)
    try:
        config = loads(stdin)
    except ValueError as exc:
        raise Failure(6, f"failed to decode network configuration: {exc}") from None
    check_config(command, config)
    mode = "ipam" if argv0.rsplit("/", 1)[-1].endswith("-ipam") else "main"
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
    return path, body


def run(argv: list[str], env: Env, stdin: str) -> dict[str, Json] | None:
    command = env.get("CNI_COMMAND", "")
    if not command:
        print("plexus CNI plugin, CNI spec versions " + ", ".join(SUPPORTED), file=sys.stderr)
        return None
    if command == "VERSION":
        return version_result(stdin)
    path, body = prepare(argv[0], env, stdin)
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
        if not isinstance(err, dict):  # the API's generic shape: {"error": "...", "kind": ...}
            raise Failure(11 if answer.get("kind") == "not-ready" else 999, str(err))
        raise Failure(int(err.get("code", 999)), err.get("msg", "error"), err.get("details", ""))
    return answer.get("result")


def environ() -> dict[str, str]:
    return {
        k.decode(errors="replace"): v.decode(errors="replace") for k, v in posix.environ.items()
    }


def main() -> None:
    version = "1.1.0"
    env = environ()
    try:
        stdin = (
            "" if env.get("CNI_COMMAND") == "VERSION" and sys.stdin.isatty() else sys.stdin.read()
        )
    except OSError as exc:
        _fail(version, Failure(5, f"cannot read stdin: {exc}"))
    try:
        version = str(loads(stdin).get("cniVersion", version))
    except (ValueError, AttributeError):
        version = "1.1.0"  # not JSON: the error says so in the current version
    try:
        result = run(sys.argv, env, stdin)
    except Failure as exc:
        _fail(version, exc)
    except Exception as exc:  # a bug here must still answer the runtime in the protocol
        _fail(version, Failure(999, f"internal error in the plexus CNI shim: {exc!r}"))
    if result is not None:
        sys.stdout.write(dumps(result))
    sys.stdout.flush()
    # Skip the interpreter's orderly shutdown (~1 ms of a CNI call): nothing is left to clean.
    posix._exit(0)


def _fail(version: str, exc: Failure) -> NoReturn:
    error = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        error["details"] = exc.details
    sys.stdout.write(dumps(error))
    print(f"plexus: {exc.msg}" + (f" ({exc.details})" if exc.details else ""), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    posix._exit(1)


if __name__ == "__main__":
    main()

"""plexus's CNI plugin, in Python: a thin shim that forwards each call to the agent.

The fallback for hosts without a C compiler (``shim.c`` is the default: ~1 ms to start against
~7 ms here). Like the C shim it only forwards: the plugin's ``CNI_*`` environment and raw stdin
go to the agent (``POST /v1/cni``), which validates them (``plexus.cni.validate``, one place for
both shims) and answers with the exact stdout and exit code; the shim copies them. It answers
two things itself, because the agent cannot: VERSION, and "the agent is not reachable" (code 11,
or 50 for STATUS).

A runtime executes the plugin for every verb, so start-up is most of a call's cost: this file
imports only C modules of the standard library (``json``, ``re`` and ``socket`` cost ~17 ms to
import; ``_json``, ``_socket`` and ``posix`` ~1 ms) and the spec's facts, installed next to it.
It speaks HTTP/1.0 over the agent's unix socket by hand. Errors are a JSON object on stdout with
a non-zero exit (libcni parses stdout); diagnostics go to stderr.

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

    from plexus.cni import spec

    Env = Mapping[str, str]
    Json = Any
else:
    try:
        import plexus_cni_spec as spec  # installed beside this file by plexus.cni.install
    except ImportError:
        from plexus.cni import spec

TIMEOUT = 120.0


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
    return spec.valid_name(name)


class Failure(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def version_result(stdin: str) -> dict[str, Json]:
    try:
        asked = loads(stdin or "{}").get("cniVersion", spec.LATEST)
    except (ValueError, AttributeError):
        asked = spec.LATEST
    return {"cniVersion": asked if asked in spec.VERSIONS else spec.LATEST,
            "supportedVersions": list(spec.VERSIONS)}


def socket_path(argv0: str, env: Env, stdin: str) -> str:
    """The config's "socket" (the "ipam" block's for plexus-ipam), then $PLEXUS_SOCKET. A
    config that is no JSON object names no agent: that much the shim must decide itself, as the
    C shim does (code 6)."""
    try:
        config = loads(stdin)
    except ValueError as exc:
        raise Failure(spec.DECODING_FAILURE,
                      f"failed to decode network configuration: {exc}") from None
    if not isinstance(config, dict):
        raise Failure(spec.DECODING_FAILURE,
                      "failed to decode network configuration: not a JSON object")
    if argv0.rsplit("/", 1)[-1].endswith("-ipam"):
        config = config.get("ipam") if isinstance(config.get("ipam"), dict) else {}
    return str(config.get("socket") or env.get("PLEXUS_SOCKET") or spec.DEFAULT_SOCKET)


def call_agent(path: str, body: dict[str, object]) -> tuple[int, str]:
    """POST /v1/cni over the unix socket; returns (exit code, stdout) as the agent chose, and
    copies the agent's one-line diagnostic (X-CNI-Log) to stderr."""
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
    head_bytes, _, body_bytes = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if "x-cni-exit" not in headers:
        raise Failure(spec.TRY_AGAIN_LATER if status == 503 else spec.GENERIC,
                      "the plexus agent refused the request", body_bytes.decode(errors="replace"))
    if headers.get("x-cni-log"):
        print(f"plexus: {headers['x-cni-log']}", file=sys.stderr)
    return int(headers["x-cni-exit"]), body_bytes.decode()


def run(argv0: str, env: Env, stdin: str) -> tuple[int, str]:
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, dumps(version_result(stdin))
    path = socket_path(argv0, env, stdin)
    wanted = {k: v for k, v in env.items() if k.startswith("CNI_") or k == "PLEXUS_SOCKET"}
    try:
        return call_agent(path, {"argv0": argv0, "env": wanted, "stdin": stdin})
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        code = spec.NOT_AVAILABLE if command == "STATUS" else spec.TRY_AGAIN_LATER
        raise Failure(code, f"the plexus agent is not reachable at {path}",
                      f"{exc.strerror}; is `plexus agent` running?") from None
    except (OSError, ValueError, IndexError) as exc:
        raise Failure(spec.GENERIC, f"talking to the plexus agent at {path} failed",
                      str(exc)) from None


def environ() -> dict[str, str]:
    return {
        k.decode(errors="replace"): v.decode(errors="replace") for k, v in posix.environ.items()
    }


def main() -> None:
    version = spec.LATEST
    env = environ()
    if not env.get("CNI_COMMAND"):
        print("plexus CNI plugin, CNI spec versions " + ", ".join(spec.VERSIONS), file=sys.stderr)
        posix._exit(0)
    try:
        stdin = (
            "" if env.get("CNI_COMMAND") == "VERSION" and sys.stdin.isatty() else sys.stdin.read()
        )
    except OSError as exc:
        _fail(version, Failure(spec.IO_FAILURE, f"cannot read stdin: {exc}"))
    try:
        version = str(loads(stdin).get("cniVersion", version))
    except (ValueError, AttributeError):
        version = spec.LATEST  # not JSON: the error says so in the current version
    try:
        code, out = run(sys.argv[0], env, stdin)
    except Failure as exc:
        _fail(version, exc)
    except Exception as exc:  # a bug here must still answer the runtime in the protocol
        _fail(version, Failure(spec.GENERIC, f"internal error in the plexus CNI shim: {exc!r}"))
    sys.stdout.write(out)
    sys.stdout.flush()
    # Skip the interpreter's orderly shutdown (~1 ms of a CNI call): nothing is left to clean.
    posix._exit(code)


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

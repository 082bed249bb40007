"""A client for the agent's API: standard library only, so that the CLI and the CNI shim start
fast (importing aiohttp alone costs ~100 ms).

Every failure is an ApiError with a message of one line: the agent's own answer, or what went
wrong on the way to it (no socket, no permission, no answer), naming the socket's path."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

DEFAULT_SOCKET = "/run/plexus/plexus.sock"
CHUNK = 65536


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            with self._failures():
                resp = self._send(conn, method, path, body)
                raw = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise _error(resp.status, raw)
        return _json(raw) if raw else {}

    def stream(self, path: str) -> Iterator[bytes]:
        """GET an answer that comes in pieces (a container's log, followed): its bytes as they
        arrive, until the agent ends it. Only connecting and the headers are timed: a container
        may print nothing for hours, and the agent ends the stream when it exits."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            with self._failures():
                resp = self._send(conn, "GET", path, None)
                if resp.status >= 400:
                    raise _error(resp.status, resp.read())
                if conn.sock is not None:
                    conn.sock.settimeout(None)
                while chunk := resp.read1(CHUNK):
                    yield chunk
        finally:
            conn.close()

    @staticmethod
    def _send(conn: _UnixConnection, method: str, path: str,
              body: Any) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        return conn.getresponse()

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """The ways of not getting an answer, each as one line that names the socket."""
        where = f"the plexus agent at {self.socket_path}"
        try:
            yield
        except PermissionError:
            raise ApiError(403, "permission", f"permission denied on {self.socket_path}: the "
                           "agent's socket needs root (or membership in the socket's group)"
                           ) from None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ApiError(503, "not-ready",
                           f"cannot reach {where}: {exc.strerror} (is the agent running?)"
                           ) from None
        except TimeoutError:
            raise ApiError(504, "timeout",
                           f"{where} did not answer within {self.timeout:g} s") from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise ApiError(502, "unreachable",
                           f"{where} closed the connection ({type(exc).__name__})") from None
        except OSError as exc:
            raise ApiError(503, "not-ready",
                           f"cannot reach {where}: {exc.strerror or exc}") from None

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(502, "internal", "the agent's answer is not JSON: "
                       + raw[:200].decode(errors="replace")) from None


def _error(status: int, raw: bytes) -> ApiError:
    """The agent's error answer: {"error": ..., "kind": ...}, or aiohttp's own text for a route
    it does not have (an older agent)."""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        text = raw.decode(errors="replace").strip().splitlines()
        return ApiError(status, "internal", text[0] if text else f"HTTP {status}")
    return ApiError(status, str(payload.get("kind", "internal")),
                    str(payload.get("error", f"HTTP {status}")))

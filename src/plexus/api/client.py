"""A client for the agent's API: standard library only, so that the CLI and the CNI shim start
fast (importing aiohttp alone costs ~100 ms)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

DEFAULT_SOCKET = "/run/plexus/plexus.sock"


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
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise ApiError(
                    503,
                    "not-ready",
                    f"cannot reach the plexus agent at {self.socket_path}: {exc.strerror}",
                ) from None
        finally:
            conn.close()
        payload = json.loads(raw) if raw else {}
        if resp.status >= 400:
            raise ApiError(
                resp.status,
                payload.get("kind", "internal"),
                payload.get("error", raw.decode(errors="replace")),
            )
        return payload

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)

"""Connections to etcd: one gRPC channel per endpoint, TLS, deadlines, failing over.

Design notes
------------
- **One channel per endpoint**, used from the last one that answered; the others are tried
  in order when it fails. (gRPC can balance over a list of addresses by itself, but then
  plexus could neither say which endpoint failed and why, nor decide which requests may be
  sent to another endpoint.)
- **Sent or not sent.** A request goes to the next endpoint only if it cannot have been
  applied: its channel never connected (a channel in TRANSIENT_FAILURE fails a call at once,
  without sending it), etcd refused it for having no leader (the ``hasleader`` metadata makes
  a member without a leader refuse before proposing anything, instead of timing out), or it
  is a read. A write whose connection broke after it was sent raises ``StoreUnavailable``: it
  may or may not have been applied, as in etcd's own client. Compare-and-swap callers find
  out by reading again, as after any lost race.
- **Deadlines.** A call has ``timeout`` seconds in all, and an endpoint whose channel has not
  connected within ``connect_timeout`` is passed over. An etcd that is down (connection
  refused) fails a call in ``RECONNECT_GRACE``, an unreachable one (no answer at all) in
  ``connect_timeout`` per endpoint: a write never hangs.
- **Reconnecting.** gRPC keeps reconnecting a failed channel in the background; its backoff
  is capped at ``RECONNECT_MAX`` (gRPC's own cap is 120 s), so a restarted etcd is used again
  within a second. A channel that failed stays failed until such a reconnect succeeds, so a
  call on it waits for one (``RECONNECT_GRACE``) before it gives up on the endpoint.
- **Keepalive pings** on open streams find a peer that vanished without closing its
  connections (a watch only reads and would wait forever); etcd 3.4 refuses pings more often
  than every 5 s (``--grpc-keepalive-min-time``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd.rpc import rpc_pb2_grpc

from plexus.errors import (
    InvalidArgument,
    NotFound,
    PlexusError,
    RevisionCompacted,
    StoreError,
    StoreUnavailable,
)
from plexus.store import _etcd_wire as wire

# A member without a leader refuses requests carrying this (etcd's rpctypes.MetadataHasLeader).
HAS_LEADER = (("hasleader", "true"),)

RECONNECT_MAX = 0.5  # seconds between gRPC's reconnects to an endpoint that is down
RECONNECT_GRACE = 0.8  # one reconnect, with gRPC's jitter (20%) and time to connect

_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    # Not grpc.min_reconnect_backoff_ms: despite its name it is how long one connection
    # attempt may take (20 s by default), and a TLS handshake over a WAN needs that.
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX * 1000)),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 256 << 20),  # a listing of a large prefix
]

_READY = grpc.ChannelConnectivity.READY
_FAILED = grpc.ChannelConnectivity.TRANSIENT_FAILURE
_SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN


@dataclass(frozen=True, slots=True)
class Credentials:
    """PEM bytes for TLS; ``ca`` None trusts the system's roots."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None


class Endpoint:
    """One etcd member's address, its channel and the stubs on it."""

    def __init__(self, address: str, credentials: Credentials | None) -> None:
        self.address = address
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        else:
            tls = grpc.ssl_channel_credentials(credentials.ca, credentials.key, credentials.cert)
            self.channel = grpc.aio.secure_channel(address, tls, options=_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)


Rpc = Callable[[Endpoint, float], Awaitable[Any]]
"""One gRPC call on an endpoint, with the seconds it may take."""


def reason(error: grpc.aio.AioRpcError) -> str:
    """The useful end of gRPC's message: 'failed to connect to all addresses; last error:
    UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused'."""
    details = str(error.details() or error.code().name)
    found = re.search(r"last error: [A-Z_]+: (?:ipv[46]:\S+: )?(.*)", details)
    text = found.group(1) if found else details
    return text.removeprefix("etcdserver: ")


def error_from(error: grpc.aio.AioRpcError, address: str) -> PlexusError:
    """etcd's answer as plexus's error (etcd: api/v3rpc/rpctypes/error.go)."""
    code, why = error.code(), reason(error)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return StoreUnavailable(f"etcd at {address}: {why}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(why)
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in why:
        return RevisionCompacted(why)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("etcd request", why, "refused by etcd")
    return StoreError(f"etcd at {address}: {code.name}: {why}")


def _safe_to_resend(error: grpc.aio.AioRpcError, idempotent: bool) -> bool:
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return idempotent or "no leader" in str(error.details())


class Connection:
    """Endpoints in the order they are tried, and the unary call that tries them."""

    def __init__(
        self,
        addresses: Sequence[str],
        credentials: Credentials | None,
        *,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        if not addresses:
            raise InvalidArgument("endpoints", list(addresses), "name at least one etcd")
        self.endpoints = [Endpoint(a, credentials) for a in addresses]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._current = 0

    def rotation(self) -> list[Endpoint]:
        """Every endpoint once, the one that last answered first."""
        return self.endpoints[self._current :] + self.endpoints[: self._current]

    def answered(self, endpoint: Endpoint) -> None:
        self._current = self.endpoints.index(endpoint)

    def failed(self, endpoint: Endpoint) -> None:
        """The next call starts with the endpoint after this one (unless another answered)."""
        index = self.endpoints.index(endpoint)
        if index == self._current:
            self._current = (index + 1) % len(self.endpoints)

    async def call(self, rpc: Rpc, *, idempotent: bool) -> Any:
        """Runs ``rpc`` on the first endpoint that takes it; see the module docstring."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        failures: list[str] = []
        for endpoint in self.rotation():
            left = deadline - loop.time()
            if left <= 0:
                break
            why = await self.connect(endpoint, min(left, self.connect_timeout))
            if why is not None:
                failures.append(f"{endpoint.address}: {why}")
                continue
            try:
                result = await rpc(endpoint, max(deadline - loop.time(), 0.001))
            except grpc.aio.AioRpcError as e:
                if not _safe_to_resend(e, idempotent):
                    raise error_from(e, endpoint.address) from e
                failures.append(f"{endpoint.address}: {reason(e)}")
                continue
            self.answered(endpoint)
            return result
        failures = failures or [f"no answer within {self.timeout:g}s"]
        raise StoreUnavailable(f"etcd did not answer: {'; '.join(failures)}")

    async def connect(self, endpoint: Endpoint, timeout: float) -> str | None:
        """None once the endpoint's channel is connected, else why not. Sends nothing that
        could change anything."""
        channel = endpoint.channel
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A failed channel stays in TRANSIENT_FAILURE until one of gRPC's background
        # reconnects succeeds: give it one (an etcd that has just restarted), not more.
        failed_by = loop.time() + min(timeout, RECONNECT_GRACE)
        state = channel.get_state(try_to_connect=True)
        while state != _READY:
            if state == _SHUTDOWN:
                return "the store is closed"
            try:
                async with asyncio.timeout_at(failed_by if state == _FAILED else deadline):
                    await channel.wait_for_state_change(state)
            except TimeoutError:
                if state == _FAILED:
                    return await _why_not(endpoint)
                return f"no connection within {timeout:g}s"
            state = channel.get_state(try_to_connect=True)
        return None

    async def close(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.channel.close()


async def _why_not(endpoint: Endpoint) -> str | None:
    """A read on a failed channel fails at once with gRPC's reason (or, if the channel came
    back in the meantime, succeeds: then it is connected)."""
    try:
        await endpoint.kv.Range(wire.revision_request(), timeout=1.0, metadata=HAS_LEADER)
    except grpc.aio.AioRpcError as e:
        return reason(e)
    return None

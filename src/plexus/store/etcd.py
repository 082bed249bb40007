"""The distributed Datastore: etcd v3 (Debian's etcd-server 3.4 and later), for many hosts.

plexus's store model *is* etcd's (see ``base``), so this module translates and adds nothing:
revisions are etcd's ``header.revision`` and ``mod_revision``, a transaction is one etcd Txn,
a lease is an etcd lease, a watch is an etcd watch. Where the pieces live:

- ``_etcd_wire``: messages from and to plexus's types (pure);
- ``_etcd_conn``: channels, TLS, deadlines and which endpoint a request may go to next;
- ``_etcd_watch``: watches that resume after a disconnect;
- here: the Datastore verbs, and ``open_etcd`` for ``etcd://`` and ``etcds://`` URLs.

Why these choices (more in each module):
- **Client: aetcd's generated stubs, our own channel.** aetcd 1.0 is the maintained asyncio
  client for etcd v3, but its ``Client`` has no TLS and its watch does not survive a restart
  of etcd; of it, only the protoc output for etcd's API (``aetcd.rpc``) is used.
- **Malformed requests are refused here** with the checks the embedded stores run
  (``_common.check_txn``), so a request means the same on every backend; etcd refuses the
  same ones.
- **Lease TTLs are whole seconds** in etcd: a TTL is rounded up, and etcd raises TTLs below
  its minimum (1.5 election timeouts, 2 s with etcd's default timing) to that minimum.
- **Limits** plexus must stay within, set on the etcd side: 128 operations per transaction
  (``--max-txn-ops``) and 1.5 MiB per request (``--max-request-bytes``). Compaction is the
  operator's (``--auto-compaction-retention``) or ``compact``'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aetcd.rpc import rpc_pb2

from plexus.errors import InvalidArgument, NotFound, StoreError
from plexus.store import _etcd_wire as wire
from plexus.store._common import check_txn
from plexus.store._etcd_conn import HAS_LEADER, Connection, Credentials, Endpoint, Rpc
from plexus.store._etcd_watch import Watches
from plexus.store.base import Compare, Delete, Event, Get, KeyValue, Op, Put, TxnResult

DEFAULT_PORT = 2379


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """``--etcd-cacert``, ``--etcd-cert`` and ``--etcd-key``: PEM files (None: not given)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def named(self) -> list[tuple[str, str | None]]:
        """(option, path) of each file."""
        return [("--etcd-cacert", self.cacert), ("--etcd-cert", self.cert),
                ("--etcd-key", self.key)]  # fmt: skip

    def given(self) -> bool:
        return any(path for _, path in self.named())

    def load(self) -> Credentials:
        if bool(self.cert) != bool(self.key):
            given, missing = ("--etcd-cert", "--etcd-key")
            if self.key:
                given, missing = missing, given
            path = self.key or self.cert
            raise InvalidArgument(given, path, f"needs {missing} too")
        return Credentials(
            ca=_read("--etcd-cacert", self.cacert),
            cert=_read("--etcd-cert", self.cert),
            key=_read("--etcd-key", self.key),
        )


def _read(field: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(field, path, e.strerror or str(e)) from e


def parse_endpoints(url: str) -> tuple[list[str], bool]:
    """``etcd://HOST[:PORT][,HOST[:PORT]...]`` (or ``etcds://``, TLS) -> (addresses, tls)."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("etcd", "etcds") or not rest:
        raise InvalidArgument("--store", url, "expected etcd://HOST:PORT[,HOST:PORT...]")
    return [_endpoint(url, part) for part in rest.rstrip("/").split(",")], scheme == "etcds"


def _endpoint(url: str, part: str) -> str:
    host, port = part, str(DEFAULT_PORT)
    if part.startswith("["):  # [IPv6]:PORT
        host, _, tail = part[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise InvalidArgument("--store", url, f"cannot read endpoint {part!r}")
            port = tail[1:]
        host = f"[{host}]"
    elif part.count(":") > 1:
        raise InvalidArgument("--store", url, f"write the IPv6 address {part!r} as [ADDRESS]:PORT")
    elif ":" in part:
        host, _, port = part.rpartition(":")
    if not host.strip("[]") or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument("--store", url, f"endpoint {part!r} is not HOST:PORT")
    return f"{host}:{int(port)}"


def open_etcd(url: str, tls: TlsFiles = TlsFiles(), **options: float) -> EtcdStore:
    """The EtcdStore for a ``--store`` URL; TLS files only go with ``etcds://``."""
    addresses, secure = parse_endpoints(url)
    if tls.given() and not secure:
        field, value = next((f, v) for f, v in tls.named() if v)
        raise InvalidArgument(field, value, "needs an etcds:// --store (TLS)")
    return EtcdStore(addresses, credentials=tls.load() if secure else None, **options)


class EtcdStore:
    """A Datastore on etcd. ``addresses``: HOST:PORT of members, tried in order;
    ``credentials``: TLS (None: plain gRPC); ``timeout``: seconds a call may take in all;
    ``connect_timeout``: seconds to wait for one endpoint to connect."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        credentials: Credentials | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self._conn = Connection(
            addresses, credentials, timeout=timeout, connect_timeout=connect_timeout
        )
        self._watches = Watches(self._conn)
        self._closed = False

    @property
    def addresses(self) -> list[str]:
        return [e.address for e in self._conn.endpoints]

    async def get(self, key: str) -> KeyValue | None:
        request = wire.range_request(key, prefix=False)
        response = await self._call(lambda e, t: e.kv.Range(request, **_opts(t)))
        return wire.key_value(response.kvs[0]) if response.kvs else None

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        request = wire.range_request(prefix, prefix=True)
        response = await self._call(lambda e, t: e.kv.Range(request, **_opts(t)))
        return [wire.key_value(kv) for kv in response.kvs], int(response.header.revision)

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        return (await self.txn((), [Put(key, value, lease)])).revision

    async def delete(self, key: str, prefix: bool = False) -> int:
        check_txn((), [Delete(key, prefix)], ())
        start, end = wire.key_range(key, prefix)
        request = rpc_pb2.DeleteRangeRequest(key=start, range_end=end)
        response = await self._call(
            lambda e, t: e.kv.DeleteRange(request, **_opts(t)),
            idempotent=False,
        )
        return int(response.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        check_txn(compares, success, failure)
        request = wire.txn_request(compares, success, failure)
        reads_only = all(isinstance(op, Get) for op in (*success, *failure))
        response = await self._call(
            lambda e, t: e.kv.Txn(request, **_opts(t)),
            idempotent=reads_only,
        )
        return wire.txn_result(response)

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """See ``Datastore.watch``; resumes by itself after a disconnect (``_etcd_watch``)."""
        return self._watches.watch(prefix, start_revision)

    async def revision(self) -> int:
        request = wire.revision_request()
        response = await self._call(lambda e, t: e.kv.Range(request, **_opts(t)))
        return int(response.header.revision)

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise InvalidArgument("ttl", ttl, "must be a positive number of seconds")
        request = rpc_pb2.LeaseGrantRequest(TTL=math.ceil(ttl))
        response = await self._call(
            lambda e, t: e.lease.LeaseGrant(request, **_opts(t)),
            idempotent=False,
        )
        if response.error:
            raise StoreError(f"etcd refused a lease: {response.error}")
        return int(response.ID)

    async def refresh_lease(self, lease: int) -> None:
        response = await self._call(lambda e, t: _keep_alive_once(e, lease, t))
        if response.TTL <= 0:  # etcd's answer for a lease it does not have
            raise NotFound(f"lease {lease} not found (expired or revoked)")

    async def revoke_lease(self, lease: int) -> None:
        """Deletes the lease's keys; an unknown or expired lease is not an error (as in the
        embedded stores: delete verbs are idempotent)."""
        request = rpc_pb2.LeaseRevokeRequest(ID=lease)
        with contextlib.suppress(NotFound):
            await self._call(lambda e, t: e.lease.LeaseRevoke(request, **_opts(t)))

    async def compact(self, revision: int) -> None:
        """Forgets the history before ``revision``: watches from earlier revisions raise
        ``RevisionCompacted``. (etcd compacts by itself only if told to.)"""
        request = rpc_pb2.CompactionRequest(revision=revision)
        await self._call(
            lambda e, t: e.kv.Compact(request, **_opts(t)), idempotent=False
        )

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._watches.close()
            await self._conn.close()

    # -- internals -------------------------------------------------------------------------

    async def _call(self, rpc: Rpc, *, idempotent: bool = True) -> Any:
        if self._closed:
            raise StoreError("the store is closed")
        return await self._conn.call(rpc, idempotent=idempotent)


def _opts(timeout: float) -> dict[str, Any]:
    """Every call's deadline and the metadata that makes a member without a leader refuse
    rather than wait (see ``_etcd_conn``)."""
    return {"timeout": timeout, "metadata": HAS_LEADER}


async def _keep_alive_once(endpoint: Endpoint, lease: int, timeout: float) -> Any:
    """etcd renews leases only over a stream: one request, one answer, closed."""
    call = endpoint.lease.LeaseKeepAlive(**_opts(timeout))
    try:
        await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease))
        return await call.read()
    finally:
        call.cancel()

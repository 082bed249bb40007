"""etcd watches that outlive their connection: resume from the revision after the last event.

A watch is one gRPC stream to one member. When that stream breaks (etcd restarting, a member
going away, a network cut), the watch opens a new one -- on the next endpoint if the member is
gone -- from the revision after the last event it handed out, so its consumer sees every event
once, in order, as if nothing had happened. Only when etcd has compacted that revision away in
the meantime does the consumer see ``RevisionCompacted``, and lists and diffs (the informer).

Facts of etcd 3.4 this relies on (server/etcdserver/api/v3rpc/watch.go, mvcc/watchable_store.go):
- etcd never splits one revision's events over two responses (it batches whole revisions), so
  "resume after the last event's revision" loses nothing and repeats nothing.
- The first response says ``created``. A start revision older than the compacted one is
  answered with ``compact_revision`` set and the watch canceled.
- With ``progress_notify``, a watch that has sent everything up to the store's revision gets an
  empty response now and then whose header carries that revision: a quiet watch moves its
  resume point on with it, so a reconnect after a compaction of unrelated keys is not
  mistaken for lost history.
- etcd ends a watch stream when the client half-closes it, so the request side is never closed.
- ``hasleader`` metadata: a member that loses its leader ends the stream instead of silently
  sending nothing; the watch moves to another endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from plexus.errors import RevisionCompacted, StoreError, StoreUnavailable
from plexus.store import _etcd_wire as wire
from plexus.store._etcd_conn import HAS_LEADER, Connection, Endpoint, error_from
from plexus.store.base import Event

log = logging.getLogger("plexus.store.etcd")

RETRY_MIN, RETRY_MAX = 0.05, 1.0


class _Broken(Exception):
    """The stream ended without an error from gRPC."""


class Watches:
    """Every open watch of one store; ``close`` ends them all."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._calls: set[Any] = set()
        self._closed = False

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        return self._stream(prefix, start_revision)

    def close(self) -> None:
        self._closed = True
        for call in self._calls:
            call.cancel()

    async def _stream(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        if self._closed:
            raise StoreError("the store is closed")
        resume = max(start_revision, 1)
        delay = RETRY_MIN
        while not self._closed:
            endpoint = self._conn.rotation()[0]
            call = endpoint.watch.Watch(metadata=HAS_LEADER)
            self._calls.add(call)
            try:
                await call.write(wire.watch_request(prefix, resume))
                async for event, revision in self._responses(call, endpoint, resume):
                    resume, delay = revision, RETRY_MIN
                    if event is not None:
                        yield event
            except (grpc.aio.AioRpcError, _Broken) as e:
                if self._closed:
                    return
                self._conn.failed(endpoint)
                _log_break(endpoint, e, resume, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and task is not None and not task.cancelling():
                    return  # close() cancelled the call, not someone the task
                raise
            finally:
                self._calls.discard(call)
                call.cancel()

    async def _responses(
        self, call: Any, endpoint: Endpoint, resume: int
    ) -> AsyncIterator[tuple[Event | None, int]]:
        """(event, revision to resume from after it); (None, revision) for progress."""
        while True:
            response: wire.PbWatchResponse = await call.read()
            if response is grpc.aio.EOF:
                raise _Broken("etcd ended the watch stream")
            if response.compact_revision:
                raise RevisionCompacted(
                    f"etcd compacted its history up to revision {response.compact_revision}; "
                    f"the watch needs {resume}"
                )
            if response.canceled:
                raise StoreError(f"etcd at {endpoint.address} canceled the watch: "
                                 f"{response.cancel_reason or 'no reason given'}")
            self._conn.answered(endpoint)
            if response.created:
                continue
            if not response.events:  # progress: everything up to the header's revision is in
                resume = max(resume, response.header.revision + 1)
                yield None, resume
            for pb in response.events:
                event = wire.event(pb)
                resume = event.kv.mod_revision + 1
                yield event, resume


def _log_break(endpoint: Endpoint, error: Exception, resume: int, delay: float) -> None:
    if isinstance(error, grpc.aio.AioRpcError):
        mapped = error_from(error, endpoint.address)
        if not isinstance(mapped, StoreUnavailable):
            raise mapped from error
        error = mapped
    # Once per outage: while etcd stays away, the retries are logged at debug level.
    level = logging.WARNING if delay == RETRY_MIN else logging.DEBUG
    log.log(level, "etcd watch broke (%s); resuming from revision %d", error, resume)

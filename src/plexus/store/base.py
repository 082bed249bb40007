"""The Datastore seam: an etcd-shaped key/value store.

Every backend (SQLite for one host, etcd for many, memory for unit tests) offers the same
primitives, so services and reconcilers never know which one they talk to:

- a single, store-wide *revision* that grows by one with every committed transaction;
- per key: ``create_revision``, ``mod_revision`` and ``version`` (number of writes since creation);
- compare-and-swap transactions (``txn``): all compares hold → apply ``success`` ops, else
  ``failure`` ops; atomically, as one revision;
- prefix listing, consistent with one revision;
- watches from a revision (replaying history the backend still has, then live events);
- leases: keys attached to a lease are deleted when it expires or is revoked.

Keys and values are ``str``; values are JSON documents written by ``plexus.model``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


CompareTarget = Literal["version", "create", "mod", "value"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """One guard of a transaction, as etcd has them.

    ``Compare.absent(k)`` is ``version == 0``: the key does not exist.
    """

    key: str
    target: CompareTarget
    op: CompareOp
    value: int | str

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "version", "==", 0)

    @staticmethod
    def unchanged(kv: KeyValue | None, key: str) -> Compare:
        """The key still is as it was when ``kv`` was read (or still absent if ``kv`` is None)."""
        if kv is None:
            return Compare.absent(key)
        return Compare(key, "mod", "==", kv.mod_revision)


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # One entry per op of the branch that ran: the KeyValues a Get found, [] for Put/Delete.
    responses: list[list[KeyValue]] = field(default_factory=list)


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    kv: KeyValue  # for DELETE: key, value "" and mod_revision = the deleting revision
    prev: KeyValue | None = None


@runtime_checkable
class Datastore(Protocol):
    """What plexus needs of a datastore. All methods are safe to call concurrently."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def list(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the revision they were read at."""
        ...

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        """Unconditional write; returns the new revision."""
        ...

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Returns how many keys were deleted."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult: ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Event]:
        """Events for keys under ``prefix`` with ``mod_revision >= start_revision``, in order,
        then live ones, until the iterator is closed. Raises ``RevisionCompacted`` if the
        backend no longer has history back to ``start_revision``: list and diff instead."""
        ...

    async def revision(self) -> int: ...

    async def grant_lease(self, ttl: float) -> int: ...

    async def refresh_lease(self, lease: int) -> None:
        """Extends the lease by its TTL; raises ``NotFound`` if it expired or was revoked."""
        ...

    async def revoke_lease(self, lease: int) -> None: ...

    async def close(self) -> None: ...

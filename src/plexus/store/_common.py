"""What a transaction means, decided once for the embedded backends (memory and SQLite).

A backend exposes its keys and leases through ``KeySpace`` -- a view from inside one of its
write transactions -- and these functions do the etcd-shaped rest: how a compare treats a
missing key, how ``create_revision``, ``mod_revision`` and ``version`` move, which events a
write produces and which requests are refused. Because both backends run this same code, the
in-memory test double cannot drift away from the store that ships.

Order of checks in a transaction, and why:

1. ``check_txn`` (pure, before the backend starts a transaction): malformed requests are
   refused whatever the state, as etcd refuses them (bad compare types, empty keys, a key
   written twice in one branch -- etcd's "duplicate key given in txn request", refused here
   too so that code written against the embedded stores also runs on etcd).
2. compares, then ``missing_lease``: a branch that names an unknown lease writes nothing and
   reports the error in ``Applied.error``, so the backend can still commit the lease
   expiry it ran in the same transaction before raising.
3. ``apply_op`` in order: a ``Get`` sees the writes of earlier ops of the same branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from plexus.errors import InvalidArgument, NotFound, PlexusError
from plexus.store.base import (
    Compare,
    CompareOp,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
)


class KeySpace(Protocol):
    """Keys and leases of a backend, seen from inside one write transaction."""

    def get(self, key: str) -> KeyValue | None: ...

    def range(self, prefix: str) -> list[KeyValue]:
        """Every key starting with ``prefix``, sorted by key (code point order)."""
        ...

    def write(self, kv: KeyValue) -> None: ...

    def remove(self, key: str) -> None: ...

    def lease_exists(self, lease: int) -> bool: ...

    def lease_keys(self, lease: int) -> list[KeyValue]:
        """The keys attached to ``lease``, sorted by key."""
        ...

    def drop_lease(self, lease: int) -> None: ...


@dataclass(slots=True)
class Applied:
    """What one change did: the branch taken, Get results, events, or why it was refused."""

    succeeded: bool = True
    responses: list[list[KeyValue]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    error: PlexusError | None = None  # set only when nothing was written


# -- compares ------------------------------------------------------------------------------

_T = TypeVar("_T", int, str)


def _ordered(left: _T, op: CompareOp, right: _T) -> bool:
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if op == "<":
        return left < right
    return left > right


def _int_target(cmp: Compare, kv: KeyValue | None) -> int:
    if kv is None:  # etcd compares a missing key as version/create/mod 0
        return 0
    if cmp.target == "version":
        return kv.version
    if cmp.target == "create":
        return kv.create_revision
    return kv.mod_revision


def compare_holds(cmp: Compare, kv: KeyValue | None) -> bool:
    """Evaluates one guard against the key's current state (``None``: absent)."""
    if cmp.target == "value":
        # As in etcd, a missing key has no value at all: every value compare fails, even != "".
        return kv is not None and _ordered(kv.value, cmp.op, str(cmp.value))
    assert isinstance(cmp.value, int)  # check_compare ran first
    return _ordered(_int_target(cmp, kv), cmp.op, cmp.value)


def check_compare(cmp: Compare) -> None:
    _check_key(cmp.key, prefix=False)
    if cmp.op not in ("==", "!=", "<", ">"):
        raise InvalidArgument("compare.op", cmp.op, "must be one of == != < >")
    if cmp.target == "value":
        if not isinstance(cmp.value, str):
            raise InvalidArgument("compare.value", cmp.value, "a value compare needs a str")
    elif cmp.target in ("version", "create", "mod"):
        if not isinstance(cmp.value, int) or isinstance(cmp.value, bool):
            raise InvalidArgument("compare.value", cmp.value, f"{cmp.target} needs an int")
    else:
        raise InvalidArgument("compare.target", cmp.target, "must be version/create/mod/value")


# -- request shape -------------------------------------------------------------------------


def _check_key(key: str, prefix: bool) -> None:
    # An empty prefix means "everything"; an empty key names nothing (etcd refuses it too).
    if not key and not prefix:
        raise InvalidArgument("key", key, "must not be empty")


def _overlaps(put_key: str, delete: Delete) -> bool:
    return put_key.startswith(delete.key) if delete.prefix else put_key == delete.key


def _check_branch(ops: Sequence[Op]) -> None:
    puts: set[str] = set()
    deletes: list[Delete] = []
    for op in ops:
        _check_key(op.key, prefix=not isinstance(op, Put) and op.prefix)
        if isinstance(op, Put):
            if op.key in puts:
                raise InvalidArgument("txn", op.key, "key is written twice in one transaction")
            puts.add(op.key)
        elif isinstance(op, Delete):
            deletes.append(op)
    for key in puts:
        if any(_overlaps(key, d) for d in deletes):
            raise InvalidArgument("txn", key, "key is both put and deleted in one transaction")


def check_txn(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> None:
    """Refuses malformed requests before any state is read (raises ``InvalidArgument``)."""
    for cmp in compares:
        check_compare(cmp)
    _check_branch(success)
    _check_branch(failure)


def missing_lease(space: KeySpace, ops: Sequence[Op]) -> NotFound | None:
    for op in ops:
        if isinstance(op, Put) and op.lease and not space.lease_exists(op.lease):
            return NotFound(f"lease {op.lease} not found (expired or revoked)")
    return None


# -- applying ops --------------------------------------------------------------------------


def read(space: KeySpace, key: str, prefix: bool) -> list[KeyValue]:
    if prefix:
        return space.range(key)
    kv = space.get(key)
    return [] if kv is None else [kv]


def put_key(space: KeySpace, op: Put, revision: int) -> Event:
    prev = space.get(op.key)
    kv = KeyValue(
        key=op.key,
        value=op.value,
        create_revision=revision if prev is None else prev.create_revision,
        mod_revision=revision,
        version=1 if prev is None else prev.version + 1,
        lease=op.lease,
    )
    space.write(kv)
    return Event(EventType.PUT, kv, prev)


def delete_keys(space: KeySpace, kvs: Iterable[KeyValue], revision: int) -> list[Event]:
    events: list[Event] = []
    for prev in kvs:
        space.remove(prev.key)
        tombstone = KeyValue(prev.key, "", create_revision=0, mod_revision=revision, version=0)
        events.append(Event(EventType.DELETE, tombstone, prev))
    return events


def apply_op(space: KeySpace, op: Op, revision: int) -> tuple[list[KeyValue], list[Event]]:
    """Applies one op at ``revision``; returns (what a Get found, the events it caused)."""
    if isinstance(op, Get):
        return read(space, op.key, op.prefix), []
    if isinstance(op, Put):
        return [], [put_key(space, op, revision)]
    return [], delete_keys(space, read(space, op.key, op.prefix), revision)


def run_txn(
    space: KeySpace,
    revision: int,
    compares: Sequence[Compare],
    success: Sequence[Op],
    failure: Sequence[Op],
) -> Applied:
    """Runs a checked transaction (see ``check_txn``) as if committed at ``revision``.

    The caller bumps its revision only if ``events`` is not empty: like etcd, a transaction
    that changes nothing (only Gets, or deletes of absent keys) does not make a revision.
    """
    succeeded = all(compare_holds(cmp, space.get(cmp.key)) for cmp in compares)
    ops = success if succeeded else failure
    error = missing_lease(space, ops)
    if error is not None:
        return Applied(succeeded, error=error)
    applied = Applied(succeeded)
    for op in ops:
        found, events = apply_op(space, op, revision)
        applied.responses.append(found)
        applied.events.extend(events)
    return applied


def revoke_leases(space: KeySpace, leases: Iterable[int], revision: int) -> list[Event]:
    """Deletes the keys of every (existing) lease at ``revision``, then forgets the leases."""
    events: list[Event] = []
    for lease in sorted(leases):
        if space.lease_exists(lease):
            events.extend(delete_keys(space, space.lease_keys(lease), revision))
            space.drop_lease(lease)
    return events

"""etcd v3 messages from and to plexus's store types: pure functions, no I/O.

The messages are protoc's Python classes for etcd's ``rpc.proto`` and ``kv.proto`` as the
``aetcd`` package ships them (``aetcd.rpc``); nothing else of aetcd is used. They have no type
information, so the fields plexus reads are declared here as Protocols and every message is
turned into a plexus type (``KeyValue``, ``Event``, ``TxnResult``) right where it arrives.

Facts of etcd's API this relies on (etcd 3.4, api/etcdserverpb/rpc.proto and mvcc):
- Keys and values are bytes; plexus's are ``str``, sent as UTF-8. UTF-8 byte order is code
  point order, so etcd lists keys in the order the embedded stores do.
- A range is ``[key, range_end)``. A prefix's ``range_end`` is the prefix with its last byte
  that is not 0xff incremented and the rest dropped; ``key = range_end = b"\\0"`` means every
  key. An empty ``range_end`` means the single key.
- A compare on a missing key compares version, create and mod revision as 0, and always
  fails on the value -- what ``_common.compare_holds`` does for the embedded stores.
- A DELETE event's kv has the key and ``mod_revision`` = the deleting revision, all else 0.
- A watch with ``start_revision`` 0 starts "now"; plexus's 0 means "all history", so 1 is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from aetcd.rpc import kv_pb2, rpc_pb2

from plexus.errors import InvalidArgument
from plexus.store.base import (
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Op,
    Put,
    TxnResult,
)

ALL_KEYS = b"\0"

_RESULTS = {
    "==": rpc_pb2.Compare.EQUAL,
    "!=": rpc_pb2.Compare.NOT_EQUAL,
    "<": rpc_pb2.Compare.LESS,
    ">": rpc_pb2.Compare.GREATER,
}
# Compare.target -> (etcd's target enum, the field of the target_union that holds the value)
_TARGETS = {
    "version": (rpc_pb2.Compare.VERSION, "version"),
    "create": (rpc_pb2.Compare.CREATE, "create_revision"),
    "mod": (rpc_pb2.Compare.MOD, "mod_revision"),
    "value": (rpc_pb2.Compare.VALUE, "value"),
}


class PbKeyValue(Protocol):
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class PbEvent(Protocol):
    type: int
    kv: PbKeyValue
    prev_kv: PbKeyValue

    def HasField(self, name: str) -> bool: ...  # protobuf's name


class PbHeader(Protocol):
    revision: int


class PbWatchResponse(Protocol):
    header: PbHeader
    created: bool
    canceled: bool
    compact_revision: int
    cancel_reason: str
    events: Sequence[PbEvent]


# -- requests ------------------------------------------------------------------------------


def encode(text: str, field: str = "key") -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as e:  # a lone surrogate: not text etcd could give back
        raise InvalidArgument(field, text, "is not valid Unicode") from e


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (ALL_KEYS: none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return ALL_KEYS
    return stripped[:-1] + bytes([stripped[-1] + 1])


def key_range(key: str, prefix: bool) -> tuple[bytes, bytes]:
    """``(key, range_end)`` for one key, or for every key under a prefix ("" is all keys)."""
    if not prefix:
        return encode(key), b""
    if not key:
        return ALL_KEYS, ALL_KEYS
    raw = encode(key)
    return raw, prefix_end(raw)


def range_request(key: str, prefix: bool) -> Any:
    start, end = key_range(key, prefix)
    return rpc_pb2.RangeRequest(key=start, range_end=end)


def revision_request() -> Any:
    """The cheapest linearizable read: its header carries the store's revision."""
    return rpc_pb2.RangeRequest(key=ALL_KEYS, count_only=True)


def compare(cmp: Compare) -> Any:
    target, field = _TARGETS[cmp.target]
    value = encode(cmp.value, "compare.value") if isinstance(cmp.value, str) else cmp.value
    return rpc_pb2.Compare(
        result=_RESULTS[cmp.op], target=target, key=encode(cmp.key), **{field: value}
    )


def request_op(op: Op) -> Any:
    if isinstance(op, Put):
        value = encode(op.value, "value")
        put = rpc_pb2.PutRequest(key=encode(op.key), value=value, lease=op.lease)
        return rpc_pb2.RequestOp(request_put=put)
    start, end = key_range(op.key, op.prefix)
    if isinstance(op, Delete):
        return rpc_pb2.RequestOp(
            request_delete_range=rpc_pb2.DeleteRangeRequest(key=start, range_end=end)
        )
    assert isinstance(op, Get)
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=start, range_end=end))


def txn_request(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Any:
    return rpc_pb2.TxnRequest(
        compare=[compare(c) for c in compares],
        success=[request_op(op) for op in success],
        failure=[request_op(op) for op in failure],
    )


def watch_request(prefix: str, start_revision: int) -> Any:
    start, end = key_range(prefix, prefix=True)
    create = rpc_pb2.WatchCreateRequest(
        key=start,
        range_end=end,
        start_revision=max(start_revision, 1),
        prev_kv=True,
        progress_notify=True,  # lets a quiet watch move its resume point on (see _etcd_watch)
    )
    return rpc_pb2.WatchRequest(create_request=create)


# -- responses -----------------------------------------------------------------------------


def key_value(pb: PbKeyValue) -> KeyValue:
    return KeyValue(
        key=pb.key.decode(),
        value=pb.value.decode(),
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )


def event(pb: PbEvent) -> Event:
    kind = EventType.DELETE if pb.type == kv_pb2.Event.DELETE else EventType.PUT
    prev = key_value(pb.prev_kv) if pb.HasField("prev_kv") else None
    return Event(kind, key_value(pb.kv), prev)


def txn_result(response: Any) -> TxnResult:
    """One entry per op of the branch that ran: the kvs a Get found, [] for Put/Delete."""
    found: list[list[KeyValue]] = []
    for op in response.responses:
        if op.WhichOneof("response") == "response_range":
            found.append([key_value(kv) for kv in op.response_range.kvs])
        else:
            found.append([])
    return TxnResult(bool(response.succeeded), int(response.header.revision), found)

"""What EtcdStore sends and how it reads etcd's errors, without an etcd: key ranges, --store
URLs, and gRPC statuses turned into plexus's errors. (The store itself runs against real
etcd members in tests/integration/test_store_etcd.py.)"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from plexus.errors import NotFound, RevisionCompacted, StoreError, StoreUnavailable
from plexus.store._etcd_conn import error_from
from plexus.store._etcd_wire import ALL_KEYS, key_range, prefix_end
from plexus.store.etcd import parse_endpoints


def test_prefix_end_increments_the_last_byte_below_0xff() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == ALL_KEYS
    assert key_range("", prefix=True) == (ALL_KEYS, ALL_KEYS)
    assert key_range("k", prefix=False) == (b"k", b"")


@given(st.text(min_size=1, max_size=4), st.text(max_size=4), st.text(max_size=5))
def test_a_prefix_range_holds_exactly_the_keys_with_the_prefix(
    prefix: str, rest: str, other: str
) -> None:
    start, end = key_range(prefix, prefix=True)
    for key in (prefix + rest, other):
        raw = key.encode()
        assert (start <= raw < end) == key.startswith(prefix)


@pytest.mark.parametrize(
    ("url", "addresses", "tls"),
    [
        ("etcd://10.0.0.1:2379", ["10.0.0.1:2379"], False),
        ("etcd://10.0.0.1,10.0.0.2:12379/", ["10.0.0.1:2379", "10.0.0.2:12379"], False),
        ("etcds://[fd00::1]:2379,[fd00::2]", ["[fd00::1]:2379", "[fd00::2]:2379"], True),
        ("etcds://etcd.example:2379", ["etcd.example:2379"], True),
    ],
)
def test_store_urls_name_the_members(url: str, addresses: list[str], tls: bool) -> None:
    assert parse_endpoints(url) == (addresses, tls)


def status(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize(
    ("code", "details", "error", "message"),
    [
        (grpc.StatusCode.UNAVAILABLE,
         "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:2379: "
         "Failed to connect to remote host: Connection refused",
         StoreUnavailable, "etcd at 10.0.0.1:2379: Failed to connect to remote host: "
         "Connection refused"),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader",
         StoreUnavailable, "etcd at 10.0.0.1:2379: no leader"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded",
         StoreUnavailable, "etcd at 10.0.0.1:2379: Deadline Exceeded"),
        (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found",
         NotFound, "requested lease not found"),
        (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted",
         RevisionCompacted, "mvcc: required revision has been compacted"),
        (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied",
         StoreError, "etcd at 10.0.0.1:2379: PERMISSION_DENIED: permission denied"),
    ],
)  # fmt: skip
def test_etcd_errors_become_plexus_errors(
    code: grpc.StatusCode, details: str, error: type[StoreError], message: str
) -> None:
    mapped = error_from(status(code, details), "10.0.0.1:2379")
    assert type(mapped) is error
    assert mapped.message == message

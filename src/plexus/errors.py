"""One exception hierarchy for all of plexus.

Front doors (CLI, HTTP API, CNI shim, Docker plugin) map these to their protocol at the boundary;
nothing deeper catches them to translate.

    PlexusError
    ├── InvalidArgument        bad input: names the field and the value (CNI 7, HTTP 400, exit 2)
    ├── NotFound               a named object does not exist              (HTTP 404)
    ├── AlreadyExists          a name or address is taken                 (HTTP 409)
    ├── Conflict               the request contradicts existing state     (HTTP 409)
    │   └── InUse              still referenced (network with endpoints)
    ├── Exhausted              no address or subnet left                  (HTTP 507)
    ├── NotReady               the agent cannot serve yet (CNI 11/50)     (HTTP 503)
    ├── Unsupported            the kernel lacks a feature                 (HTTP 501)
    ├── StoreError             the datastore failed
    │   ├── StoreUnavailable   the datastore did not answer (etcd down)   (HTTP 503, CNI 11)
    │   ├── TxnConflict        a compare-and-swap lost a race; retry
    │   └── RevisionCompacted  a watch asked for history the store no longer has
    └── DataplaneError         the kernel refused a change (netlink, nftables)
"""

from __future__ import annotations


class PlexusError(Exception):
    """Root of every error plexus raises on purpose."""

    http_status = 500
    kind = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PlexusError):
    http_status = 400
    kind = "invalid"

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"invalid {field} {value!r}: {reason}")
        self.field = field
        self.value = value


class NotFound(PlexusError):
    http_status = 404
    kind = "not-found"


class AlreadyExists(PlexusError):
    http_status = 409
    kind = "exists"


class Conflict(PlexusError):
    http_status = 409
    kind = "conflict"


class InUse(Conflict):
    kind = "in-use"


class Exhausted(PlexusError):
    http_status = 507
    kind = "exhausted"


class NotReady(PlexusError):
    http_status = 503
    kind = "not-ready"


class Unsupported(PlexusError):
    http_status = 501
    kind = "unsupported"


class StoreError(PlexusError):
    kind = "store"


class StoreUnavailable(StoreError):
    """No datastore endpoint answered in time. A write that raises it may or may not have
    been applied (the request may have reached etcd before the connection broke)."""

    http_status = 503
    kind = "store-unavailable"


class TxnConflict(StoreError):
    kind = "txn-conflict"


class RevisionCompacted(StoreError):
    kind = "compacted"


class DataplaneError(PlexusError):
    kind = "dataplane"


ERROR_KINDS: dict[str, type[PlexusError]] = {
    cls.kind: cls
    for cls in (
        PlexusError,
        NotFound,
        AlreadyExists,
        Conflict,
        InUse,
        Exhausted,
        NotReady,
        Unsupported,
        StoreError,
        StoreUnavailable,
        TxnConflict,
        RevisionCompacted,
        DataplaneError,
    )
}

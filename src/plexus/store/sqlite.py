"""The embedded Datastore: one SQLite file per host, no setup.

Design notes
------------
- **One change, one SQLite transaction.** Every write (a txn, the lease expiry before it, the
  revision bump and its history rows) runs inside one ``BEGIN IMMEDIATE ... COMMIT``, so a
  crash or a second process can never see it half-applied. IMMEDIATE takes the write lock at
  BEGIN, so the revision we read is still the current one when we commit.
- **Durability: WAL + synchronous=NORMAL.** A commit appends to the WAL with write(2) and
  returns; fsync happens at checkpoints. That survives a crash or SIGKILL of the process
  (committed transactions are in the OS page cache and replayed from the WAL on open), but an
  OS crash or power cut may lose the last few commits -- never consistency, the file stays
  a valid earlier state. That is acceptable here: after a power cut every netns, veth and
  nftables rule is gone as well and the agent rebuilds from what the store holds. FULL would
  fsync every commit (milliseconds each) for no gain in that situation.
- **Synchronous calls on the event loop.** Queries take microseconds, so the public ``async``
  methods call sqlite3 directly; no thread pool. The one way to block is another *process*
  holding the write lock (``busy_timeout`` below); one agent per state directory avoids it.
- **Watches are in-process.** Live events come from this process's commits (``_watch``);
  history comes from the ``events`` table. Another process writing the same file would be
  seen by replays but not streamed live -- not needed now (one agent per file); polling
  ``PRAGMA data_version`` would be the way to add it.
- **Lease expiry uses wall-clock time** (``time.time``) because expiries are persisted: a
  monotonic clock restarts with the machine.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from plexus.errors import RevisionCompacted, StoreError
from plexus.store._engine import Clock, Engine
from plexus.store.base import Event, EventType, KeyValue

_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id               INTEGER PRIMARY KEY CHECK (id = 0),
    revision         INTEGER NOT NULL,
    compact_revision INTEGER NOT NULL   -- events of revisions <= this are gone
);
INSERT OR IGNORE INTO meta (id, revision, compact_revision) VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS kv (
    key             TEXT PRIMARY KEY,
    value           TEXT NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision    INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_by_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    revision        INTEGER NOT NULL,   -- also the event kv's mod_revision
    seq             INTEGER NOT NULL,   -- order within the revision
    type            TEXT NOT NULL,
    key             TEXT NOT NULL,
    value           TEXT NOT NULL,
    create_revision INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    lease           INTEGER NOT NULL,
    prev_value      TEXT,               -- prev_*: NULL when the event has no prev
    prev_create     INTEGER,
    prev_mod        INTEGER,
    prev_version    INTEGER,
    prev_lease      INTEGER,
    PRIMARY KEY (revision, seq)
) WITHOUT ROWID;
-- AUTOINCREMENT: a lease id is never reused, so a stale holder cannot refresh a new lease.
CREATE TABLE IF NOT EXISTS leases (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl    REAL NOT NULL,
    expiry REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (expiry);
"""

_KV_COLUMNS = "key, value, create_revision, mod_revision, version, lease"


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: no
    bound). SQLite compares TEXT as UTF-8 bytes, which orders like Python's code points."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            # Surrogates cannot be encoded in UTF-8; the next encodable code point is E000.
            nxt = 0xE000 if 0xD800 <= last + 1 <= 0xDFFF else last + 1
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return None


def _prefix_where(prefix: str, column: str = "key") -> tuple[str, tuple[str, ...]]:
    end = prefix_end(prefix)
    if end is None:
        return f"{column} >= ?", (prefix,)
    return f"{column} >= ? AND {column} < ?", (prefix, end)


def _kv(row: sqlite3.Row | tuple[str, str, int, int, int, int]) -> KeyValue:
    return KeyValue(row[0], row[1], row[2], row[3], row[4], row[5])


def _event_row(revision: int, seq: int, event: Event) -> tuple[object, ...]:
    kv, prev = event.kv, event.prev
    prev_cols = (
        (None,) * 5
        if prev is None
        else (prev.value, prev.create_revision, prev.mod_revision, prev.version, prev.lease)
    )
    head = (revision, seq, event.type.value, kv.key, kv.value, kv.create_revision)
    return (*head, kv.version, kv.lease, *prev_cols)


def _event(row: sqlite3.Row) -> Event:
    revision, _seq, type_, key, value, create, version, lease = row[:8]
    prev = None
    if row["prev_value"] is not None:
        prev = KeyValue(key, *row[8:13])
    return Event(EventType(type_), KeyValue(key, value, create, revision, version, lease), prev)


@contextmanager
def _sqlite_errors() -> Iterator[None]:
    """Callers see StoreError, never which engine failed underneath."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"sqlite: {e}") from e


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: the sqlite3 module must not BEGIN on its own; we say when.
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if path != ":memory:" and mode != "wal":
        raise StoreError(f"{path}: cannot switch to WAL mode (got {mode!r})")
    db.execute("PRAGMA synchronous=NORMAL")  # why NORMAL, not FULL: module docstring
    # Another process holding the write lock blocks us (and the event loop) up to this long.
    db.execute("PRAGMA busy_timeout=5000")
    return db


class _SqliteStorage:
    """Storage (see ``_engine``) on one sqlite3 connection."""

    def __init__(self, path: str, history: int) -> None:
        with _sqlite_errors():
            self._db = _connect(path)
        self._history = history
        with self.transaction():
            self._migrate()

    def _migrate(self) -> None:
        found = self._db.execute("PRAGMA user_version").fetchone()[0]
        if found not in (0, _SCHEMA_VERSION):
            raise StoreError(f"store schema {found} is newer than this plexus ({_SCHEMA_VERSION})")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # -- transactions ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with _sqlite_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._db.in_transaction:  # already inside one: it is the snapshot
            yield
            return
        with _sqlite_errors():
            # A deferred BEGIN holds one WAL read mark for every SELECT until COMMIT.
            self._db.execute("BEGIN")
            try:
                yield
            finally:
                self._db.execute("COMMIT")

    # -- KeySpace --------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        row = self._db.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else _kv(row)

    def range(self, prefix: str) -> list[KeyValue]:
        where, args = _prefix_where(prefix)
        rows = self._db.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE {where} ORDER BY key", args)
        return [_kv(row) for row in rows]

    def write(self, kv: KeyValue) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO kv ({_KV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        )

    def remove(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def lease_exists(self, lease: int) -> bool:
        return (
            self._db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is not None
        )

    def lease_keys(self, lease: int) -> list[KeyValue]:
        rows = self._db.execute(
            f"SELECT {_KV_COLUMNS} FROM kv WHERE lease = ? ORDER BY key", (lease,)
        )
        return [_kv(row) for row in rows]

    def drop_lease(self, lease: int) -> None:
        self._db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    # -- revisions and history -------------------------------------------------------------

    def revision(self) -> int:
        return int(self._db.execute("SELECT revision FROM meta").fetchone()[0])

    def commit_revision(self, revision: int, events: Sequence[Event]) -> None:
        floor = revision - self._history
        self._db.execute(
            "UPDATE meta SET revision = ?, compact_revision = max(compact_revision, ?)",
            (revision, floor),
        )
        self._db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_event_row(revision, seq, e) for seq, e in enumerate(events)],
        )
        self._db.execute("DELETE FROM events WHERE revision <= ?", (floor,))

    def history(self, prefix: str, start: int) -> list[Event]:
        where, args = _prefix_where(prefix)
        with self.snapshot():
            compacted = int(self._db.execute("SELECT compact_revision FROM meta").fetchone()[0])
            if max(start, 1) <= compacted:
                raise RevisionCompacted(f"history starts after revision {compacted}")
            rows = self._db.execute(
                f"SELECT * FROM events WHERE revision >= ? AND {where} ORDER BY revision, seq",
                (start, *args),
            )
            return [_event(row) for row in rows]

    # -- leases ----------------------------------------------------------------------------

    def due_leases(self, now: float) -> list[int]:
        rows = self._db.execute("SELECT id FROM leases WHERE expiry <= ? ORDER BY id", (now,))
        return [int(row[0]) for row in rows]

    def add_lease(self, ttl: float, expiry: float) -> int:
        cursor = self._db.execute("INSERT INTO leases (ttl, expiry) VALUES (?, ?)", (ttl, expiry))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def extend_lease(self, lease: int, now: float) -> bool:
        cursor = self._db.execute(
            "UPDATE leases SET expiry = ? + ttl WHERE id = ? AND expiry > ?", (now, lease, now)
        )
        return cursor.rowcount == 1

    def close(self) -> None:
        self._db.close()


class SqliteStore(Engine):
    """A Datastore in the SQLite file at ``path`` (created if missing).

    ``history``: how many revisions of events watches can replay (older → RevisionCompacted);
    ``clock``: wall-clock seconds for lease expiry (tests pass a fake one to skip time).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        history: int = 10_000,
        watch_buffer: int = 10_000,
        clock: Clock = time.time,
    ) -> None:
        super().__init__(_SqliteStorage(os.fspath(path), history), clock, watch_buffer)

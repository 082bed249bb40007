"""The datastore: one protocol (``base.Datastore``), chosen from configuration here.

memory://                  MemoryStore (unit tests, throw-away demos)
sqlite:///abs/path.db      SqliteStore on that file (one host)
/abs/path.db, rel/path.db  the same, for a plain path
"""

from __future__ import annotations

from plexus.errors import InvalidArgument
from plexus.store.base import Datastore
from plexus.store.memory import MemoryStore
from plexus.store.sqlite import SqliteStore

__all__ = ["Datastore", "MemoryStore", "SqliteStore", "open_store"]


def open_store(url: str) -> Datastore:
    """Opens the datastore named by ``url`` (see the module docstring)."""
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
    elif "://" in url:
        raise InvalidArgument("store url", url, "supported: memory://, sqlite:///path, a path")
    else:
        path = url
    if not path:
        raise InvalidArgument("store url", url, "names no file")
    return SqliteStore(path)

"""The datastore: one protocol (``base.Datastore``), chosen from configuration here.

memory://                         MemoryStore (unit tests, throw-away demos)
sqlite:///abs/path.db             SqliteStore on that file (one host)
/abs/path.db, rel/path.db         the same, for a plain path
etcd://HOST:PORT[,HOST:PORT...]   EtcdStore on those members (many hosts), plain gRPC
etcds://HOST:PORT[,...]           the same over TLS: ``--etcd-cacert`` (default: the system's
                                  roots), ``--etcd-cert`` and ``--etcd-key`` (client certificate)
"""

from __future__ import annotations

from plexus.errors import InvalidArgument
from plexus.store.base import Datastore
from plexus.store.memory import MemoryStore
from plexus.store.sqlite import SqliteStore

__all__ = ["Datastore", "MemoryStore", "SqliteStore", "open_store"]


def open_store(
    url: str, *, cacert: str | None = None, cert: str | None = None, key: str | None = None
) -> Datastore:
    """Opens the datastore named by ``url`` (see the module docstring). Nothing is contacted
    yet: an etcd that does not answer fails the first call with ``StoreUnavailable``."""
    if url.startswith(("etcd://", "etcds://")):
        # Imported here: gRPC takes a while to load and only etcd users need it.
        from plexus.store.etcd import TlsFiles, open_etcd

        return open_etcd(url, TlsFiles(cacert, cert, key))
    for field, value in (("--etcd-cacert", cacert), ("--etcd-cert", cert), ("--etcd-key", key)):
        if value:
            raise InvalidArgument(field, value, "needs an etcds:// --store")
    return _open_local(url)


def _open_local(url: str) -> Datastore:
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
    elif "://" in url:
        raise InvalidArgument(
            "--store", url, "supported: etcd://, etcds://, memory://, sqlite:///path, a path"
        )
    else:
        path = url
    if not path:
        raise InvalidArgument("--store", url, "names no file")
    return SqliteStore(path)

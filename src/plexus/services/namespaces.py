"""Policy namespaces: create, label, list, remove. Each a single transaction.

``default`` always exists (an endpoint that names no namespace is in it); it is stored only once
it has labels. ``kubernetes.io/metadata.name`` is every namespace's own name, added when read,
as the Kubernetes API server adds it, and cannot be set.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from plexus.errors import AlreadyExists, Conflict, InUse, InvalidArgument, NotFound
from plexus.model import keys, parse
from plexus.model.types import DEFAULT_NAMESPACE, NAMESPACE_NAME_LABEL, Namespace
from plexus.services.context import Context
from plexus.store.base import Compare, Delete, Op, Put


def check_name(name: str) -> str:
    if not name:
        raise InvalidArgument("namespace", name, "a namespace needs a name")
    return parse.namespace(name)


def _check_labels(labels: Mapping[str, str], removed: Sequence[str] = ()) -> None:
    for key in [*labels, *removed]:
        if key == NAMESPACE_NAME_LABEL:
            raise InvalidArgument("label", key, "is the namespace's own name; it cannot change")
    for key, value in labels.items():
        parse.label(key, value)


async def ensure_ops(ctx: Context, names: Sequence[str]) -> tuple[list[Compare], list[Op]]:
    """What creates the namespaces of ``names`` that do not exist yet, to fold into another
    transaction (``plexus run --namespace NS`` creates NS with its container)."""
    compares: list[Compare] = []
    ops: list[Op] = []
    for name in sorted(set(names) - {"", DEFAULT_NAMESPACE}):
        key = keys.namespace(name)
        # The cache may lag a racing creator's write: the store decides (one read, only for a
        # namespace the cache does not know).
        if ctx.cache.namespace(name) is None and await ctx.store.get(key) is None:
            compares.append(Compare.absent(key))
            ops.append(Put(key, Namespace(name, {}, time.time()).to_json()))
    return compares, ops


class NamespaceService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def all(self) -> list[Namespace]:
        found = dict(self.ctx.cache.namespaces)
        found.setdefault(DEFAULT_NAMESPACE, Namespace(DEFAULT_NAMESPACE))
        return [found[n] for n in sorted(found)]

    def get(self, name: str) -> Namespace:
        ns = self.ctx.cache.namespace(name)
        if ns is None:
            raise NotFound(f"namespace {name!r} not found")
        return ns

    async def create(self, name: str, labels: Mapping[str, str]) -> Namespace:
        check_name(name)
        _check_labels(labels)
        if self.ctx.cache.namespace(name) is not None:
            raise AlreadyExists(f"namespace {name} already exists")
        ns = Namespace(name, dict(labels), time.time())
        key = keys.namespace(name)
        result = await self.ctx.commit([Compare.absent(key)], [Put(key, ns.to_json())])
        if not result.succeeded:
            raise AlreadyExists(f"namespace {name} already exists")
        await self.ctx.seen(result.revision)
        return ns

    async def label(self, name: str, put: Mapping[str, str], drop: Sequence[str]) -> Namespace:
        _check_labels(put, drop)
        key = keys.namespace(name)
        kv = await self.ctx.store.get(key)
        if kv is None and name != DEFAULT_NAMESPACE:
            raise NotFound(f"namespace {name!r} not found")
        old = Namespace.from_json(kv.value) if kv else Namespace(name, {}, time.time())
        labels = {k: v for k, v in {**old.labels, **put}.items() if k not in drop}
        new = Namespace(name, labels, old.created)
        result = await self.ctx.commit([Compare.unchanged(kv, key)], [Put(key, new.to_json())])
        if not result.succeeded:
            raise Conflict(f"namespace {name} changed meanwhile; try again")
        await self.ctx.seen(result.revision)
        return new

    async def remove(self, name: str) -> list[str]:
        """Remove a namespace and its policies; refused while endpoints are in it. Returns the
        policies removed with it."""
        if name == DEFAULT_NAMESPACE:
            raise InvalidArgument("namespace", name, "the default namespace cannot be removed")
        self.get(name)
        users = [e for e in self.ctx.cache.endpoints.values() if e.namespace == name]
        if users:
            who = users[0].name or users[0].container_id[:12]
            raise InUse(f"namespace {name} has {len(users)} endpoint(s) (e.g. {who}): remove "
                        "them first")
        policies = [(k, p.ref) for k, p in self.ctx.cache.policies.items() if p.namespace == name]
        key = keys.namespace(name)
        ops: list[Op] = [Delete(key), *(Delete(k) for k, _ in policies)]
        kv = await self.ctx.store.get(key)
        result = await self.ctx.commit([Compare.unchanged(kv, key)], ops)
        if not result.succeeded:
            raise Conflict(f"namespace {name} changed meanwhile; try again")
        await self.ctx.seen(result.revision)
        return [ref for _, ref in policies]

"""Policies: apply a file (all of it or nothing, one transaction), list, get, delete, explain.

A policy is stored as its document (``keys.policy``), so that ``policy get`` gives back what was
applied and every agent parses the same text into the same model (``state.cache``). Applying
into a namespace that does not exist creates it, in the same transaction, as ``plexus run
--namespace`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from plexus.errors import InvalidArgument, NotFound
from plexus.model import keys
from plexus.policy import documents
from plexus.policy.model import Policy
from plexus.services import namespaces
from plexus.services.context import Context
from plexus.store.base import Compare, Delete, Op, Put


@dataclass(frozen=True, slots=True)
class Applied:
    policy: Policy
    outcome: str  # "created", "configured", "unchanged" (kubectl's words)


def key_of(policy: Policy) -> str:
    return keys.policy(policy.kind, policy.namespace, policy.name)


def _stored(policy: Policy) -> str:
    return json.dumps(dict(policy.document), sort_keys=True, separators=(",", ":"))


class PolicyService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def all(self, namespace: str = "") -> list[Policy]:
        found = [p for p in self.ctx.cache.policies.values()
                 if not namespace or p.namespace == namespace]
        return sorted(found, key=lambda p: (p.tier, p.namespace, p.priority, p.name, p.kind))

    def find(self, ref: str) -> list[tuple[str, Policy]]:
        """Policies named ``ref``: ``NS/NAME`` (every namespaced kind of that name) or ``NAME``
        (the cluster-wide kinds); ``KIND/NS/NAME`` or ``KIND/NAME`` to pick one kind."""
        parts = ref.split("/")
        kind = parts.pop(0) if len(parts) > 1 and parts[0][:1].isupper() else ""
        namespace, name = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
        if len(parts) > 2 or not name:
            raise InvalidArgument("policy", ref, "expected NAMESPACE/NAME or NAME")
        found = [(k, p) for k, p in self.ctx.cache.policies.items()
                 if p.name == name and p.namespace == namespace and (not kind or p.kind == kind)]
        if not found:
            raise NotFound(f"policy {ref} not found")
        return sorted(found)

    async def apply(self, text: str, source: str = "-") -> list[Applied]:
        """Every policy of a file, created or replaced by kind, namespace and name."""
        policies = documents.load(text, source)
        if not policies:
            raise InvalidArgument("file", source, "holds no policy")
        compares, ops = await namespaces.ensure_ops(self.ctx, [p.namespace for p in policies])
        applied = await self.plan(policies, compares, ops)
        if ops:
            result = await self.ctx.commit(compares, ops)
            if not result.succeeded:
                raise InvalidArgument("file", source, "changed by someone else meanwhile; "
                                      "nothing applied, try again")
            await self.ctx.seen(result.revision)
        return applied

    async def plan(self, policies: Sequence[Policy], compares: list[Compare],
                   ops: list[Op]) -> list[Applied]:
        """Adds to ``compares`` and ``ops`` what creates or replaces ``policies`` (not their
        namespaces: the caller plans those)."""
        applied = []
        for p in policies:
            key, value = key_of(p), _stored(p)
            kv = await self.ctx.store.get(key)
            outcome = "created" if kv is None else "unchanged" if kv.value == value \
                else "configured"
            applied.append(Applied(p, outcome))
            if outcome != "unchanged":
                compares.append(Compare.unchanged(kv, key))
                ops.append(Put(key, value))
        return applied

    async def delete(self, refs: Sequence[str], every: bool = False) -> list[Policy]:
        """Delete the named policies (or all of them), in one transaction."""
        found = list(self.ctx.cache.policies.items()) if every else \
            [kp for ref in refs for kp in self.find(ref)]
        if not found:
            return []
        ops: list[Op] = [Delete(k) for k, _ in dict(found).items()]
        result = await self.ctx.commit([], ops)
        await self.ctx.seen(result.revision)
        return [p for _, p in dict(found).items()]

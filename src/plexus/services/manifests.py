"""``plexus apply -f``: the one entry point for manifests. A file may mix Kubernetes ``v1
Service`` documents (``lb.k8s``) with the policy kinds (``policy.documents``); every document is
checked, then all of them are written in one transaction, or nothing is (an error names the
document, the field and the value, in one line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plexus.errors import InvalidArgument
from plexus.lb import k8s
from plexus.lb.spec import Service
from plexus.model.types import IPAddress
from plexus.policy import documents
from plexus.policy.model import Policy
from plexus.services import namespaces
from plexus.services.context import Context
from plexus.services.lbservices import Plan, Planned, ServiceRegistry
from plexus.services.policies import PolicyService
from plexus.store.base import Compare, Op


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    ref: str
    outcome: str  # "created", "configured", "unchanged" (kubectl's words)
    service: Service | None = None

    def line(self) -> str:
        return f"{self.kind} {self.ref} {self.outcome}"


Parsed = Policy | tuple[Service, tuple[IPAddress, ...]]


class Manifests:
    def __init__(self, ctx: Context, policies: PolicyService, services: ServiceRegistry) -> None:
        self.ctx = ctx
        self.policies = policies
        self.services = services

    def load(self, text: str, source: str) -> list[Parsed]:
        docs = documents.split(text, source)
        parsed = [documents.one(i + 1, d, source, self._parse) for i, d in enumerate(docs)]
        if not parsed:
            raise InvalidArgument("file", source, "holds no document")
        documents.no_duplicates([p for p in parsed if isinstance(p, Policy)], source)
        seen: set[str] = set()
        for p in parsed:
            if not isinstance(p, Policy):
                if p[0].ref in seen:
                    raise InvalidArgument("file", source, f"Service {p[0].ref} appears twice")
                seen.add(p[0].ref)
        return parsed

    def _parse(self, doc: dict[str, Any]) -> Parsed:
        if (doc.get("apiVersion"), doc.get("kind")) != (k8s.API_VERSION, k8s.KIND):
            return documents.parse(doc)
        meta = doc.get("metadata")
        if not isinstance(meta, dict):
            raise InvalidArgument("metadata", meta, "required: a mapping with a name")
        name = documents.dns_label("metadata.name", meta.get("name"))
        namespace = documents.dns_label("metadata.namespace",
                                        meta.get("namespace") or documents.DEFAULT_NAMESPACE)
        body = doc.get("spec")
        if not isinstance(body, dict):
            raise InvalidArgument("spec", body, "required: a mapping")
        return k8s.parse(namespace, name, meta, body, sorted(self.ctx.cache.networks))

    async def apply(self, text: str, source: str = "-") -> list[Outcome]:
        parsed = self.load(text, source)
        policies = [p for p in parsed if isinstance(p, Policy)]
        wanted = [p for p in parsed if not isinstance(p, Policy)]
        spaces = [p.namespace for p in policies] + [s.namespace for s, _ in wanted]
        compares, ops = await namespaces.ensure_ops(self.ctx, spaces)
        outcomes = [Outcome(a.policy.kind, a.policy.ref, a.outcome)
                    for a in await self.policies.plan(policies, compares, ops)]
        planned = Planned()
        for index, (svc, ips) in enumerate(wanted):
            plan = await self._plan(index, svc, ips, planned, source)
            compares += plan.compares
            ops += plan.ops
            outcomes.append(Outcome("Service", plan.service.ref, plan.outcome, plan.service))
        await self._commit(compares, ops, source)
        return outcomes

    async def _plan(self, index: int, svc: Service, ips: tuple[IPAddress, ...],
                    planned: Planned, source: str) -> Plan:
        try:
            return await self.services.plan(svc, ips, planned=planned, own_namespace=False)
        except InvalidArgument as exc:
            raise documents.InvalidDocument(f"{source} (Service {svc.ref})", exc) from None

    async def _commit(self, compares: list[Compare], ops: list[Op], source: str) -> None:
        if not ops:
            return
        result = await self.ctx.commit(compares, ops)
        if not result.succeeded:
            raise InvalidArgument("file", source, "changed by someone else meanwhile; "
                                  "nothing applied, try again")
        await self.ctx.settle(result.revision)

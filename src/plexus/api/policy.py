"""The API of namespaces, policies and explain: translation only (``services.namespaces``,
``services.policies``, ``services.explain``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from plexus.api import body
from plexus.model.types import IPAddress, Namespace
from plexus.policy.evaluate import Flow, Step, Verdict
from plexus.policy.model import Policy
from plexus.services import explain
from plexus.services.context import Context
from plexus.services.namespaces import NamespaceService
from plexus.services.policies import PolicyService


def namespace_view(ns: Namespace, endpoints: int, policies: int) -> dict[str, Any]:
    return {"name": ns.name, "labels": ns.all_labels, "created": ns.created,
            "endpoints": endpoints, "policies": policies}


def policy_view(p: Policy) -> dict[str, Any]:
    return {"kind": p.kind, "namespace": p.namespace, "name": p.name, "ref": p.ref,
            "tier": p.tier.name.lower(), "priority": p.priority, "audit": p.audit,
            "selects": p.subject.describe(),
            "types": sorted(d.value for d in p.isolates),
            "ingress_rules": len(p.ingress), "egress_rules": len(p.egress)}


def _step(s: Step) -> dict[str, Any]:
    return {"direction": s.direction.value, "tier": s.tier.name.lower(), "policy": s.policy,
            "rule": s.rule, "effect": s.effect.value, "audit": s.audit}


def verdict_view(flow: Flow, v: Verdict) -> dict[str, Any]:
    return {"from": flow.src.describe(), "to": flow.dst.describe(),
            "port": f"{flow.port}/{flow.protocol}",
            "verdict": "allowed" if v.allowed else "denied",
            "steps": [_step(s) for s in v.steps],
            "audit": [_step(s) for s in v.audit_drops]}


class PolicyApi:
    def __init__(self, ctx: Context, resolve: explain.Resolve,
                 counters: Callable[[], Awaitable[dict[str, dict[str, int]]]]) -> None:
        self.ctx = ctx
        self.namespaces = NamespaceService(ctx)
        self.policies = PolicyService(ctx)
        self.resolve = resolve
        self.counters = counters

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/v1/namespaces", self.namespace_list)
        r.add_post("/v1/namespaces", self.namespace_create)
        r.add_patch("/v1/namespaces/{name}", self.namespace_label)
        r.add_delete("/v1/namespaces/{name}", self.namespace_remove)
        r.add_get("/v1/policies", self.policy_list)
        r.add_post("/v1/policies", self.policy_apply)
        r.add_post("/v1/policies/delete", self.policy_delete)
        r.add_post("/v1/policies/explain", self.policy_explain)
        r.add_get("/v1/policies/{ref:.+}", self.policy_get)

    async def namespace_list(self, request: web.Request) -> web.Response:
        eps: dict[str, int] = {}
        for e in self.ctx.cache.endpoints.values():
            eps[e.policy_namespace] = eps.get(e.policy_namespace, 0) + 1
        pols: dict[str, int] = {}
        for p in self.ctx.cache.policies.values():
            pols[p.namespace] = pols.get(p.namespace, 0) + 1
        return web.json_response([namespace_view(n, eps.get(n.name, 0), pols.get(n.name, 0))
                                  for n in self.namespaces.all()])

    async def namespace_create(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        ns = await self.namespaces.create(body.get(b, "name", str, ""), body.labels(b))
        return web.json_response(namespace_view(ns, 0, 0), status=201)

    async def namespace_label(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        ns = await self.namespaces.label(request.match_info["name"], body.labels(b, "set"),
                                         body.strings(b, "remove"))
        return web.json_response(namespace_view(ns, 0, 0))

    async def namespace_remove(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        removed = await self.namespaces.remove(request.match_info["name"])
        return web.json_response({"policies": removed})

    async def policy_list(self, request: web.Request) -> web.Response:
        found = self.policies.all(request.query.get("namespace", ""))
        counts = await self.counters()
        zero = {"allow": 0, "deny": 0, "audit": 0}
        return web.json_response([{**policy_view(p), "packets": counts.get(f"{p.kind} {p.ref}",
                                                                           zero)}
                                  for p in found])

    async def policy_get(self, request: web.Request) -> web.Response:
        found = self.policies.find(request.match_info["ref"])
        return web.json_response([dict(p.document) for _, p in found])

    async def policy_apply(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        applied = await self.policies.apply(body.get(b, "text", str, ""),
                                            body.get(b, "source", str, "-"))
        return web.json_response([{**policy_view(a.policy), "outcome": a.outcome}
                                  for a in applied])

    async def policy_delete(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        gone = await self.policies.delete(body.strings(b, "refs"), body.get(b, "all", bool, False))
        return web.json_response([policy_view(p) for p in gone])

    async def policy_explain(self, request: web.Request) -> web.Response:
        b = await body.read(request)
        src, dst = body.get(b, "from", str, ""), body.get(b, "to", str, "")
        local = {ip for ip in map(_address, (src, dst))
                 if ip is not None and await self.ctx.host.has_address(ip)}
        flow, verdict = explain.explain(self.ctx.cache, self.resolve, src, dst,
                                        body.get(b, "port", str, ""), local)
        return web.json_response(verdict_view(flow, verdict))


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None

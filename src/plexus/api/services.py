"""The API of services and manifests: translation only (``services.lbservices``,
``services.manifests``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from plexus.api import body
from plexus.errors import InvalidArgument
from plexus.lb import members, spec
from plexus.lb.spec import Health, Service
from plexus.model import keys
from plexus.model.types import DEFAULT_NAMESPACE, Endpoint
from plexus.services.context import Context
from plexus.services.lbservices import ServiceRegistry, address
from plexus.services.manifests import Manifests
from plexus.services.policies import PolicyService
from plexus.state.cache import Cache


def service_view(svc: Service) -> dict[str, Any]:
    return {"namespace": svc.namespace, "name": svc.name, "ref": svc.ref,
            "network": svc.network, "vips": [str(v) for v in svc.vips],
            "headless": svc.headless, "ports": [str(p) for p in svc.ports],
            "selector": dict(svc.selector), "affinity": svc.affinity,
            "affinity_timeout": svc.affinity_timeout,
            "publish": [str(p) for p in svc.publish], "origin": svc.origin,
            "created": svc.created,
            "health": None if svc.health is None else _health_view(svc.health)}


def _health_view(h: Health) -> dict[str, Any]:
    return {"tcp": h.port or None, "cmd": h.command or None, "interval": h.interval,
            "threshold": h.threshold}


def endpoint_view(cache: Cache, svc: Service, ep: Endpoint) -> dict[str, Any]:
    failing = (keys.service(svc.namespace, svc.name), ep.store_key) in cache.failing
    stopped = not members.running(cache, ep)
    ready = members.backs(svc, ep) and not failing and not stopped
    health = "ready" if ready else "failing its readiness check" if failing \
        else "container exited" if stopped else f"not ready ({ep.state})"
    return {"container": ep.name or ep.container_id[:12], "node": ep.node,
            "key": ep.store_key, "addresses": [str(a.ip) for a in ep.addresses],
            "state": ep.state, "ready": ready, "health": health,
            "targets": {str(p): members.target_of(p, ep) for p in svc.ports}}


class ServiceApi:
    def __init__(self, ctx: Context, policies: PolicyService) -> None:
        self.ctx = ctx
        self.services = ServiceRegistry(ctx)
        self.manifests = Manifests(ctx, policies, self.services)

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/v1/services", self.service_list)
        r.add_post("/v1/services", self.service_create)
        r.add_get("/v1/services/{namespace}/{name}", self.service_get)
        r.add_delete("/v1/services/{namespace}/{name}", self.service_remove)
        r.add_post("/v1/apply", self.apply)

    async def service_list(self, request: web.Request) -> web.Response:
        found = self.services.all(request.query.get("namespace", ""))
        return web.json_response([
            {**service_view(s), "endpoints": sum(
                members.serving(self.ctx.cache, keys.service(s.namespace, s.name), s, ep)
                for ep in self.services.endpoints(s))}
            for s in found])

    async def service_get(self, request: web.Request) -> web.Response:
        svc = self.services.get(request.match_info["namespace"], request.match_info["name"])
        eps = self.services.endpoints(svc)
        return web.json_response({**service_view(svc),
                                  "endpoints": [endpoint_view(self.ctx.cache, svc, ep)
                                                for ep in eps],
                                  "unresolved": self.services.unresolved(svc)})

    async def service_create(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        svc = _service(b)
        if body.get(b, "headless", bool, False) and body.strings(b, "ip"):
            raise InvalidArgument("ip", ",".join(body.strings(b, "ip")),
                                  "a headless service has no VIP (--ip or --headless)")
        ips = [address("ip", t) for t in body.strings(b, "ip")]
        made = await self.services.create(svc, ips)
        return web.json_response(service_view(made), status=201)

    async def service_remove(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        gone = await self.services.remove(request.match_info["namespace"],
                                          request.match_info["name"])
        return web.json_response(service_view(gone))

    async def apply(self, request: web.Request) -> web.Response:
        self.ctx.require_ready()
        b = await body.read(request)
        done = await self.manifests.apply(body.get(b, "text", str, ""),
                                          body.get(b, "source", str, "-"))
        return web.json_response([{"kind": o.kind, "ref": o.ref, "outcome": o.outcome,
                                   "line": o.line()} for o in done])


def _service(b: dict[str, Any]) -> Service:
    """A service from the CLI's words (``plexus service create``), VIPs not chosen yet."""
    ports = spec.service_ports(body.strings(b, "ports"))
    publish = tuple(spec.publish(p) for p in body.strings(b, "publish"))
    spec.check_publish(publish, ports)
    timeout = b.get("affinity_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)):
        raise InvalidArgument("affinity-timeout", timeout, "expected a number of seconds")
    affinity, seconds = spec.affinity(body.get(b, "affinity", str, ""), timeout)
    headless = body.get(b, "headless", bool, False)
    return Service(body.get(b, "namespace", str, "") or DEFAULT_NAMESPACE,
                   body.get(b, "name", str, ""), body.get(b, "network", str, ""),
                   spec.selector(body.strings(b, "selector")), ports, (), headless,
                   affinity, seconds, publish, _health(b))


def _health(b: dict[str, Any]) -> Health | None:
    port = body.get(b, "health_tcp", int, 0)
    command = body.get(b, "health_cmd", str, "")
    if not port and not command:
        return None
    if port and command:
        raise InvalidArgument("health-cmd", command, "give --health-tcp or --health-cmd, "
                              "not both")
    if port and not 1 <= port <= 65535:
        raise InvalidArgument("health-tcp", port, "expected a port number (1 to 65535)")
    interval = body.get(b, "health_interval", float, 5.0)
    threshold = body.get(b, "health_threshold", int, 3)
    if not 0.1 <= interval <= 3600:
        raise InvalidArgument("health-interval", interval, "expected 0.1 to 3600 seconds")
    if not 1 <= threshold <= 100:
        raise InvalidArgument("health-threshold", threshold, "expected 1 to 100")
    return Health(port, command, interval, threshold)

"""The agent's HTTP API on a unix socket: what the CLI, the CNI shim and later front doors call.

Handlers only translate: JSON in → a service call → JSON out. Errors become
``{"error": message, "kind": kind}`` with the status of the PlexusError class, here and nowhere
deeper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from plexus import __version__
from plexus.api import views
from plexus.api.body import get as _get
from plexus.api.body import labels as _labels
from plexus.api.body import read as _body
from plexus.api.body import strings as _strings
from plexus.api.flows import FlowsApi
from plexus.api.policy import PolicyApi
from plexus.api.services import ServiceApi
from plexus.api.verify import VerifyApi
from plexus.cni import validate
from plexus.cni.service import CniService, to_cni_error
from plexus.dns import DnsService
from plexus.errors import Conflict, NotFound, PlexusError
from plexus.model import parse
from plexus.model.types import Container, Endpoint
from plexus.observe.flows import FlowLog
from plexus.runtime.containers import ContainerRuntime, RunSpec
from plexus.services import hosts, labels
from plexus.services.endpoints import AttachSpec, EndpointService
from plexus.services.networks import NetworkService, NetworkSpec

log = logging.getLogger("plexus.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": message, "kind": kind}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PlexusError as exc:
        return _error(exc.http_status, exc.kind, exc.message)
    except web.HTTPException:
        raise
    except Exception as exc:  # a bug: say so, keep serving
        log.exception("internal error serving %s %s", request.method, request.path)
        return _error(500, "internal", f"internal error: {exc!r}")


class Admin(Protocol):
    """What the agent itself answers: its state, and a full reconcile pass on demand."""

    def status(self) -> dict[str, Any]: ...

    async def reconcile(self) -> dict[str, Any]: ...

    def flow_log(self) -> FlowLog | None: ...

    async def policy_counters(self) -> dict[str, dict[str, int]]:
        """Packets per policy ("Kind ref") and outcome (allow, deny, audit)."""
        ...


class Api:
    def __init__(self, networks: NetworkService, endpoints: EndpointService,
                 containers: ContainerRuntime, cni: CniService, dns: DnsService | None,
                 admin: Admin) -> None:
        self.ctx = networks.ctx
        self.networks = networks
        self.endpoints = endpoints
        self.containers = containers
        self.cni = cni
        self.dns = dns
        self.admin = admin
        self._closing = False  # followed logs end when the agent stops

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware])
        app.on_shutdown.append(self._shutdown)
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/networks", self.network_list)
        r.add_post("/v1/networks", self.network_create)
        r.add_get("/v1/networks/{name}", self.network_get)
        r.add_delete("/v1/networks/{name}", self.network_remove)
        r.add_get("/v1/containers", self.container_list)
        r.add_post("/v1/containers", self.container_run)
        r.add_get("/v1/containers/{name}", self.container_get)
        r.add_get("/v1/containers/{name}/logs", self.container_logs)
        r.add_delete("/v1/containers/{name}", self.container_remove)
        r.add_get("/v1/endpoints", self.endpoint_list)
        r.add_post("/v1/endpoints", self.endpoint_attach)
        r.add_post("/v1/endpoints/detach", self.endpoint_detach)
        r.add_post("/v1/cni", self.cni_call)
        r.add_post("/v1/reconcile", self.reconcile)
        r.add_get("/v1/hosts", self.host_list)
        r.add_delete("/v1/hosts/{name}", self.host_remove)
        r.add_get("/v1/dns/stats", self.dns_stats)
        r.add_get("/v1/dns/lookup", self.dns_lookup)
        r.add_patch("/v1/containers/{name}/labels", self.container_label)
        policies = PolicyApi(self.ctx, lambda ref: self._find(ref)[2],
                             self.admin.policy_counters)
        policies.add_routes(r)
        ServiceApi(self.ctx, policies.policies).add_routes(r)
        FlowsApi(self.admin.flow_log).add_routes(r)
        VerifyApi(self.ctx).add_routes(r)
        return app

    def _require_ready(self) -> None:
        self.ctx.require_ready()

    async def _shutdown(self, app: web.Application) -> None:
        self._closing = True

    async def status(self, request: web.Request) -> web.Response:
        cache = self.ctx.cache
        return web.json_response({
            "ready": self.ctx.ready,
            "node": self.ctx.node,
            "version": __version__,
            "networks": len(cache.networks),
            "endpoints": cache.local_count(),
            "pid": os.getpid(),
            **self.admin.status(),
        })

    async def reconcile(self, request: web.Request) -> web.Response:
        self._require_ready()
        return web.json_response(await self.admin.reconcile())

    async def host_list(self, request: web.Request) -> web.Response:
        return web.json_response([v.to_dict() for v in hosts.views(self.ctx.cache)])

    async def host_remove(self, request: web.Request) -> web.Response:
        self._require_ready()
        released = await hosts.remove(self.ctx.store, self.ctx.cache, request.match_info["name"])
        return web.json_response({"released": released})

    async def network_list(self, request: web.Request) -> web.Response:
        cache = self.ctx.cache
        return web.json_response([
            {**views.network(n, cache.count_on(n.name)),
             "docker_networks": cache.served_by(n.name)}
            for n in self.networks.all()
        ])

    async def network_get(self, request: web.Request) -> web.Response:
        net = self.networks.get(request.match_info["name"])
        eps = self.ctx.cache.endpoints_on(net.name)
        view = views.network(net, len(eps))
        view["containers"] = [views.endpoint(e) for e in eps]
        if net.vni:  # a network that spans hosts: which host holds which blocks
            view["blocks"] = {str(b): node for s in net.subnets
                              for b, node in sorted(self.ctx.cache.blocks.get(s.cidr, {}).items())}
        return web.json_response(view)

    async def network_create(self, request: web.Request) -> web.Response:
        self._require_ready()
        b = await _body(request)
        spec = NetworkSpec(
            name=_get(b, "name", str, ""),
            driver=_get(b, "driver", str, "bridge"),
            subnets=_strings(b, "subnets"),
            gateways=_strings(b, "gateways"),
            ip_ranges=_strings(b, "ip_ranges"),
            ipv6=_get(b, "ipv6", bool, False),
            internal=_get(b, "internal", bool, False),
            mtu=_get(b, "mtu", int, 1500),
            labels=_labels(b),
            options=_labels(b, "options"),
            dns_upstreams=_strings(b, "dns_upstreams"),
            vni=_get(b, "vni", int, 0),
            block_size=_get(b, "block_size", int, 0),
        )
        net = await self.networks.create(spec)
        return web.json_response(views.network(net), status=201)

    async def network_remove(self, request: web.Request) -> web.Response:
        self._require_ready()
        force = request.query.get("force", "") in ("1", "true")
        detached = await self.networks.remove(request.match_info["name"], force=force)
        return web.json_response({"detached": detached}, status=200)

    def _externals(self) -> dict[str, list[Endpoint]]:
        """Containers other runtimes started (CNI, Docker, `plexus attach`): their endpoints."""
        others: dict[str, list[Endpoint]] = {}
        for ep in self.endpoints.all():
            if self.ctx.cache.container_by_id(ep.container_id) is None:
                others.setdefault(ep.container_id, []).append(ep)
        return others

    def _find(self, ref: str) -> tuple[Container | None, str, list[Endpoint]]:
        """What `ps` lists as ``ref`` (its name or ID, or a prefix of the ID no other has):
        a container of `plexus run`, or (None) one that another runtime started."""
        try:
            c = self.containers.get(ref)
            return c, c.id, self.endpoints.of_container(c.id)
        except NotFound:
            pass
        others = self._externals()
        if ref in others:
            return None, ref, others[ref]
        found = [cid for cid, eps in others.items() if views.external_name(cid, eps) == ref]
        found = found or [cid for cid in others if cid.startswith(ref)]
        if len(found) > 1:
            raise Conflict(f"container {ref!r} is ambiguous: IDs {', '.join(sorted(found))}")
        if not found:
            raise NotFound(f"container {ref!r} not found")
        return None, found[0], others[found[0]]

    def _own(self, ref: str, instead: str) -> Container:
        """A container of `plexus run`, for what only those have (a process, a log)."""
        c, cid, _ = self._find(ref)
        if c is None:
            raise Conflict(f"container {ref!r} was not started by plexus run but attached by "
                           f"another runtime or `plexus attach`: {instead.format(id=cid)}")
        return c

    async def container_list(self, request: web.Request) -> web.Response:
        own = self.containers.all()
        items = [views.container(c, self.endpoints.of_container(c.id)) for c in own]
        items += [views.external(cid, eps) for cid, eps in self._externals().items()]
        return web.json_response(sorted(items, key=lambda c: str(c["name"])))

    async def container_get(self, request: web.Request) -> web.Response:
        c, cid, eps = self._find(request.match_info["name"])
        view = views.external(cid, eps) if c is None else views.container(c, eps)
        return web.json_response(view)

    async def container_logs(self, request: web.Request) -> web.StreamResponse:
        """The container's output as it is in its log file; ``follow=1``: then as it comes,
        until the container exits (the stream ends), the client leaves or the agent stops."""
        c = self._own(request.match_info["name"], "its runtime keeps its logs")
        follow = request.query.get("follow", "") in ("1", "true")

        def give_up() -> bool:
            return self._closing or request.transport is None or request.transport.is_closing()

        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        # aclosing: a write that fails (the reader left) closes the log file now, not at GC.
        async with contextlib.aclosing(self.containers.log(c, follow, give_up)) as chunks:
            async for chunk in chunks:
                await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def container_run(self, request: web.Request) -> web.Response:
        self._require_ready()
        b = await _body(request)
        spec = RunSpec(
            name=_get(b, "name", str, ""),
            command=_strings(b, "command"),
            networks=_strings(b, "networks"),
            ips=[parse.address("ip", a) for a in _strings(b, "ips")],
            ports=[parse.port_mapping(p) for p in _strings(b, "publish")],
            labels=_labels(b),
            namespace=_get(b, "namespace", str, ""),
            aliases=_strings(b, "aliases"),
            exposes=parse.exposes(_strings(b, "expose")),
        )
        c = await self.containers.run(spec)
        return web.json_response(views.container(c, self.endpoints.of_container(c.id)), status=201)

    async def container_label(self, request: web.Request) -> web.Response:
        self._require_ready()
        b = await _body(request)
        c, _, eps = self._find(request.match_info["name"])
        now = await labels.relabel(self.ctx, c, eps, _labels(b, "set"), _strings(b, "remove"))
        return web.json_response({"labels": now})

    async def container_remove(self, request: web.Request) -> web.Response:
        self._require_ready()
        force = request.query.get("force", "") in ("1", "true")
        c = self._own(request.match_info["name"], "`plexus detach --id {id}` detaches it")
        await self.containers.remove(c.id, force=force)
        return web.json_response({})

    async def endpoint_list(self, request: web.Request) -> web.Response:
        return web.json_response([views.endpoint(e) for e in self.endpoints.all()])

    async def endpoint_attach(self, request: web.Request) -> web.Response:
        self._require_ready()
        b = await _body(request)
        spec = AttachSpec(
            container_id=_get(b, "container_id", str, ""),
            network=_get(b, "network", str, ""),
            netns=_get(b, "netns", str, ""),
            ifname=_get(b, "ifname", str, ""),
            ips=[parse.address("ip", a) for a in _strings(b, "ips")],
            ports=[parse.port_mapping(p) for p in _strings(b, "publish")],
            mac=_get(b, "mac", str, ""),
            name=_get(b, "name", str, ""),
            aliases=_strings(b, "aliases"),
            namespace=_get(b, "namespace", str, ""),
            labels=_labels(b),
            exposes=parse.exposes(_strings(b, "expose")),
        )
        ep = await self.endpoints.attach(spec)
        return web.json_response(views.endpoint(ep), status=201)

    async def endpoint_detach(self, request: web.Request) -> web.Response:
        self._require_ready()
        b = await _body(request)
        ep = await self.endpoints.detach(
            _get(b, "container_id", str, ""),
            network=_get(b, "network", str, ""),
            ifname=_get(b, "ifname", str, ""),
            missing_ok=_get(b, "missing_ok", bool, False),
        )
        return web.json_response(views.endpoint(ep) if ep else {})

    def _dns(self) -> DnsService:
        if self.dns is None:
            raise NotFound("the agent runs without DNS (--no-dns)")
        return self.dns

    async def dns_stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self._dns().stats())

    async def dns_lookup(self, request: web.Request) -> web.Response:
        q = request.query
        explanation = await self._dns().lookup(
            q.get("network", ""), q.get("name", ""), q.get("type", "A"), q.get("client") or None
        )
        return web.json_response({**explanation.to_dict(), "text": explanation.text()})

    async def cni_call(self, request: web.Request) -> web.Response:
        """Both CNI shims' one endpoint: the plugin's environment and raw stdin in; the exact
        stdout and exit code out (``X-CNI-Exit``, and a one-line ``X-CNI-Log`` for stderr), so a
        shim only copies bytes. Validation runs here, once (``cni.validate``)."""
        b = await _body(request)
        env = {str(k): str(v) for k, v in _get(b, "env", dict, {}).items()}
        stdin, argv0 = _get(b, "stdin", str, ""), _get(b, "argv0", str, "plexus")
        try:
            req = validate.prepare(argv0, env, stdin)
            result = await self.cni.handle(req)
        except PlexusError as exc:
            err = to_cni_error(exc)
            log.info("cni %s %s/%s failed (%d): %s", env.get("CNI_COMMAND"),
                     env.get("CNI_CONTAINERID"), env.get("CNI_IFNAME"), err.code, err.message)
            return _cni_failure(validate.version_of(stdin), err)
        text = "" if result is None else json.dumps(result)
        return web.Response(text=text, headers={"X-CNI-Exit": "0"})


def _cni_failure(version: str, err: PlexusError) -> web.Response:
    cni = to_cni_error(err)
    line = (cni.message + (f" ({cni.details})" if cni.details else "")).replace("\n", " ")[:400]
    return web.Response(
        text=json.dumps(validate.error_body(version, cni)),
        headers={"X-CNI-Exit": "1", "X-CNI-Log": line.encode("ascii", "replace").decode()},
    )


async def serve(app: web.Application, socket_path: Path) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    socket_path.parent.mkdir(parents=True, exist_ok=True)  # claimed by the caller first
    # The socket is created under a restrictive umask so that it is never, even briefly,
    # reachable by other users (then chmod makes the mode explicit).
    old = os.umask(0o177)
    try:
        site = web.UnixSite(runner, str(socket_path))
        await site.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    return runner

"""The agent's HTTP API on a unix socket: what the CLI, the CNI shim and later front doors call.

Handlers only translate: JSON in → a service call → JSON out. Errors become
``{"error": message, "kind": kind}`` with the status of the PlexusError class, here and nowhere
deeper.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from plexus import __version__
from plexus.agent.containers import ContainerService, RunSpec
from plexus.agent.core import Core, log
from plexus.agent.endpoints import AttachSpec
from plexus.agent.networks import NetworkService, NetworkSpec
from plexus.api import views
from plexus.api.docker.network import served as docker_served
from plexus.cni import shim
from plexus.cni.config import CniRequest
from plexus.cni.service import CniService, to_cni_error
from plexus.dns import DnsService
from plexus.errors import InvalidArgument, NotFound, NotReady, PlexusError
from plexus.model import parse
from plexus.model.types import Endpoint

T = TypeVar("T")
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


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidArgument("body", "(not JSON)", "expected a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", type(body).__name__, "expected a JSON object")
    return body


def _get(body: dict[str, Any], key: str, kind: type[T], default: T) -> T:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise InvalidArgument(key, value, f"expected {kind.__name__}")
    return value


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = _get(body, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise InvalidArgument(key, value, "expected a list of strings")
    return value


def _labels(body: dict[str, Any], key: str = "labels") -> dict[str, str]:
    value = _get(body, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgument(key, value, "expected an object of strings")
    return value


class Api:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.networks = NetworkService(core)
        self.containers = ContainerService(core)
        self.endpoints = self.containers.endpoints
        self.cni = CniService(core, self.networks, self.endpoints)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[errors_middleware])
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/networks", self.network_list)
        r.add_post("/v1/networks", self.network_create)
        r.add_get("/v1/networks/{name}", self.network_get)
        r.add_delete("/v1/networks/{name}", self.network_remove)
        r.add_get("/v1/containers", self.container_list)
        r.add_post("/v1/containers", self.container_run)
        r.add_get("/v1/containers/{name}", self.container_get)
        r.add_delete("/v1/containers/{name}", self.container_remove)
        r.add_get("/v1/endpoints", self.endpoint_list)
        r.add_post("/v1/endpoints", self.endpoint_attach)
        r.add_post("/v1/endpoints/detach", self.endpoint_detach)
        r.add_post("/v1/cni", self.cni_call)
        r.add_post("/v1/cni/exec", self.cni_exec)
        r.add_get("/v1/dns/stats", self.dns_stats)
        r.add_get("/v1/dns/lookup", self.dns_lookup)
        return app

    def _require_ready(self) -> None:
        if not self.core.ready:
            raise NotReady("the agent is still starting (recovering state)")

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ready": self.core.ready,
                "node": self.core.node,
                "version": __version__,
                "networks": len(self.core.networks),
                "endpoints": len(self.core.endpoints),
                "pid": os.getpid(),
            }
        )

    async def network_list(self, request: web.Request) -> web.Response:
        counts = {n: len(self.core.endpoints_on(n)) for n in self.core.networks}
        served = await docker_served(self.core.store)
        return web.json_response(
            [
                {
                    **views.network(n, counts.get(n.name, 0)),
                    "docker_networks": served.get(n.name, []),
                }
                for n in self.networks.all()
            ]
        )

    async def network_get(self, request: web.Request) -> web.Response:
        net = self.networks.get(request.match_info["name"])
        view = views.network(net, len(self.core.endpoints_on(net.name)))
        view["containers"] = [views.endpoint(e) for e in self.core.endpoints_on(net.name)]
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
        )
        net = await self.networks.create(spec)
        return web.json_response(views.network(net), status=201)

    async def network_remove(self, request: web.Request) -> web.Response:
        self._require_ready()
        force = request.query.get("force", "") in ("1", "true")
        await self.networks.remove(request.match_info["name"], force=force)
        return web.json_response({}, status=200)

    async def container_list(self, request: web.Request) -> web.Response:
        own = await self.containers.all()
        items = [views.container(c, self.endpoints.of_container(c.id)) for c in own]
        others: dict[str, list[Endpoint]] = {}
        known = {c.id for c in own}
        for ep in self.endpoints.all():
            if ep.container_id not in known:
                others.setdefault(ep.container_id, []).append(ep)
        items += [views.external(cid, eps) for cid, eps in others.items()]
        return web.json_response(sorted(items, key=lambda c: str(c["name"])))

    async def container_get(self, request: web.Request) -> web.Response:
        c = await self.containers.get(request.match_info["name"])
        return web.json_response(views.container(c, self.endpoints.of_container(c.id)))

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
        )
        c = await self.containers.run(spec)
        return web.json_response(views.container(c, self.endpoints.of_container(c.id)), status=201)

    async def container_remove(self, request: web.Request) -> web.Response:
        self._require_ready()
        force = request.query.get("force", "") in ("1", "true")
        await self.containers.remove(request.match_info["name"], force=force)
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
        if self.core.dns is None:
            raise NotFound("the agent runs without DNS (--no-dns)")
        return self.core.dns

    async def dns_stats(self, request: web.Request) -> web.Response:
        return web.json_response(await self._dns().stats())

    async def dns_lookup(self, request: web.Request) -> web.Response:
        q = request.query
        explanation = await self._dns().lookup(
            q.get("network", ""), q.get("name", ""), q.get("type", "A"), q.get("client") or None
        )
        return web.json_response({**explanation.to_dict(), "text": explanation.text()})

    async def cni_exec(self, request: web.Request) -> web.Response:
        """The compiled shim's endpoint: the plugin's environment and raw stdin in; the exact
        stdout and exit code out (``X-CNI-Exit``), so the shim only copies bytes. Validation is
        the Python shim's own, run here."""
        b = await _body(request)
        env = {str(k): str(v) for k, v in _get(b, "env", dict, {}).items()}
        stdin, argv0 = _get(b, "stdin", str, ""), _get(b, "argv0", str, "plexus")
        try:
            if env.get("CNI_COMMAND") == "VERSION":
                result: dict[str, Any] | None = shim.version_result(stdin)
            else:
                _, fields = shim.prepare(argv0, env, stdin)
                result = await self.cni.handle(CniRequest(**fields))
        except shim.Failure as exc:
            return _cni_failure(stdin, exc.code, exc.msg, exc.details)
        except PlexusError as exc:
            err = to_cni_error(exc)
            return _cni_failure(stdin, err.code, err.message, err.details)
        text = "" if result is None else shim.dumps(result)
        return web.Response(text=text, headers={"X-CNI-Exit": "0"})

    async def cni_call(self, request: web.Request) -> web.Response:
        """The CNI shim's one endpoint. Always HTTP 200: the CNI outcome is in the body."""
        b = await _body(request)
        req = CniRequest(
            command=_get(b, "command", str, ""),
            container_id=_get(b, "container_id", str, ""),
            netns=_get(b, "netns", str, ""),
            ifname=_get(b, "ifname", str, ""),
            args=_get(b, "args", str, ""),
            config=_get(b, "config", dict, {}),
            mode=_get(b, "mode", str, "main"),
        )
        try:
            result = await self.cni.handle(req)
        except PlexusError as exc:
            err = to_cni_error(exc)
            log.info(
                "cni %s %s/%s failed (%d): %s",
                req.command,
                req.container_id,
                req.ifname,
                err.code,
                err.message,
            )
            return web.json_response({"error": _cni_error(err.code, err.message, err.details)})
        return web.json_response({"result": result})


def _cni_error(code: int, msg: str, details: str = "") -> dict[str, Any]:
    """The spec's error object (without cniVersion, which the caller knows or the shim adds)."""
    return {"code": code, "msg": msg, **({"details": details} if details else {})}


def _cni_failure(stdin: str, code: int, msg: str, details: str = "") -> web.Response:
    try:
        version = str(shim.loads(stdin).get("cniVersion", "1.1.0"))
    except (ValueError, AttributeError):
        version = "1.1.0"
    error = {"cniVersion": version, **_cni_error(code, msg, details)}
    log_line = (msg + (f" ({details})" if details else "")).replace("\n", " ")[:400]
    return web.Response(
        text=shim.dumps(error),
        headers={"X-CNI-Exit": "1", "X-CNI-Log": log_line.encode("ascii", "replace").decode()},
    )


async def serve(app: web.Application, socket_path: Path) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists() or socket_path.is_symlink():
        socket_path.unlink()
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

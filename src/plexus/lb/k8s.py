"""Kubernetes ``v1 Service`` documents to the service model (``plexus apply -f``). Pure.

What is read: ``spec.type`` ClusterIP (the default) or NodePort; ``spec.clusterIP`` (and
``clusterIPs``): "" or absent picks VIPs, ``None`` makes a headless service, addresses ask for
those; ``spec.selector``; ``spec.ports`` (``name``, ``port``, ``targetPort`` as a number or a
name the containers ``--expose``, ``protocol`` TCP or UDP, ``nodePort``); ``sessionAffinity:
ClientIP`` with ``sessionAffinityConfig.clientIP.timeoutSeconds``. A NodePort's ``nodePort`` is
published on every host (``Publish`` with no address); without one, a free port of
30000-32767 is picked when the service is stored.

The network: the annotation ``plexus.io/network``, else the one network that exists besides
the built-in ``host`` and ``none`` (several: the annotation is required, and the error says so).
Everything else (``externalIPs``, ``LoadBalancer``, ``ExternalName``, ``ipFamilyPolicy``...) is
either refused by name or ignored, as noted below.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from plexus.errors import InvalidArgument
from plexus.lb import spec
from plexus.lb.spec import Publish, Service, ServicePort
from plexus.model.types import IPAddress

API_VERSION, KIND = "v1", "Service"
NETWORK_ANNOTATION = "plexus.io/network"
NODE_PORTS = range(30000, 32768)  # Kubernetes' default --service-node-port-range
BUILTIN_NETWORKS = ("host", "none")
TYPES = ("ClusterIP", "NodePort")


def parse(namespace: str, name: str, meta: dict[str, Any], body: dict[str, Any],
          networks: Sequence[str]) -> tuple[Service, tuple[IPAddress, ...]]:
    """The service (VIPs not chosen yet) and the VIPs the document asks for."""
    kind = body.get("type", "ClusterIP")
    if kind not in TYPES:
        raise InvalidArgument("spec.type", kind, "plexus serves ClusterIP and NodePort")
    ports = tuple(_port(i, p) for i, p in enumerate(_list(body, "ports")))
    spec.check_ports(ports, "spec.ports")
    headless, ips = _cluster_ips(body)
    if headless and kind == "NodePort":
        raise InvalidArgument("spec.clusterIP", "None", "a NodePort service needs a VIP")
    publish = tuple(_node_port(i, p, port) for i, (p, port)
                    in enumerate(zip(_list(body, "ports"), ports, strict=True))
                    if kind == "NodePort")
    affinity, timeout = _affinity(body)
    svc = Service(namespace, name, network_of(meta, networks), _selector(body), ports,
                  headless=headless, affinity=affinity, affinity_timeout=timeout, publish=publish,
                  origin="manifest", labels=_labels(meta))
    return svc, ips


def network_of(meta: dict[str, Any], networks: Sequence[str]) -> str:
    notes = meta.get("annotations") or {}
    given = notes.get(NETWORK_ANNOTATION) if isinstance(notes, dict) else None
    if given is not None:
        if not isinstance(given, str) or given not in networks:
            raise InvalidArgument(f"metadata.annotations.{NETWORK_ANNOTATION}", given,
                                  "no such network")
        return given
    mine = [n for n in networks if n not in BUILTIN_NETWORKS]
    if len(mine) != 1:
        raise InvalidArgument(f"metadata.annotations.{NETWORK_ANNOTATION}", None,
                              f"required: {len(mine)} networks exist, name the service's")
    return mine[0]


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key) or []
    if not isinstance(value, list):
        raise InvalidArgument(f"spec.{key}", value, "expected a list")
    return value


def _port(i: int, raw: Any) -> ServicePort:
    where = f"spec.ports[{i}]"
    if not isinstance(raw, dict):
        raise InvalidArgument(where, raw, "expected a mapping with port")
    port = _number(f"{where}.port", raw.get("port"))
    proto = spec.protocol(f"{where}.protocol", str(raw.get("protocol", "TCP")),
                          str(raw.get("protocol", "TCP")))
    name = raw.get("name") or ""
    if name:
        spec.target(f"{where}.name", str(name), str(name))
    target_raw = raw.get("targetPort", port)
    target = (_number(f"{where}.targetPort", target_raw) if isinstance(target_raw, int)
              else spec.target(f"{where}.targetPort", str(target_raw), str(target_raw)))
    return ServicePort(port, proto, 0 if target == port else target, str(name))


def _number(field: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise InvalidArgument(field, raw, "expected a port number (1 to 65535)")
    return raw


def _node_port(i: int, raw: dict[str, Any], port: ServicePort) -> Publish:
    given = raw.get("nodePort")
    if given is None:
        return Publish(0, port.port, port.protocol)  # picked when stored
    number = _number(f"spec.ports[{i}].nodePort", given)
    if number not in NODE_PORTS:
        raise InvalidArgument(f"spec.ports[{i}].nodePort", number,
                              f"expected {NODE_PORTS.start} to {NODE_PORTS.stop - 1}")
    return Publish(number, port.port, port.protocol)


def _cluster_ips(body: dict[str, Any]) -> tuple[bool, tuple[IPAddress, ...]]:
    raw = body.get("clusterIPs") or ([body["clusterIP"]] if body.get("clusterIP") else [])
    if not isinstance(raw, list):
        raise InvalidArgument("spec.clusterIPs", raw, "expected a list")
    if raw and str(raw[0]) == "None":
        return True, ()
    ips = []
    for text in raw:
        try:
            ips.append(ipaddress.ip_address(str(text)))
        except ValueError:
            raise InvalidArgument("spec.clusterIP", text, "not an IP address or None") from None
    if len({ip.version for ip in ips}) != len(ips):
        raise InvalidArgument("spec.clusterIPs", raw, "at most one address per family")
    return False, tuple(ips)


def _selector(body: dict[str, Any]) -> dict[str, str]:
    raw = body.get("selector") or {}
    if not isinstance(raw, dict):
        raise InvalidArgument("spec.selector", raw, "expected a mapping of labels")
    try:
        return spec.selector(f"{k}={v}" for k, v in raw.items())
    except InvalidArgument as exc:
        raise InvalidArgument("spec.selector", exc.value, exc.message.split(": ", 1)[-1]) \
            from None


def _affinity(body: dict[str, Any]) -> tuple[spec.Affinity, int]:
    mode = body.get("sessionAffinity", "None")
    if mode == "None":
        return "none", 0
    if mode != "ClientIP":
        raise InvalidArgument("spec.sessionAffinity", mode, "expected ClientIP or None")
    config = body.get("sessionAffinityConfig") or {}
    timeout = (config.get("clientIP") or {}).get("timeoutSeconds") \
        if isinstance(config, dict) else None
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)):
        raise InvalidArgument("spec.sessionAffinityConfig.clientIP.timeoutSeconds", timeout,
                              "expected a number of seconds")
    try:
        return spec.affinity("client-ip", timeout)
    except InvalidArgument as exc:
        raise InvalidArgument("spec.sessionAffinityConfig.clientIP.timeoutSeconds", timeout,
                              exc.message.split(": ", 1)[-1]) from None


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    raw = meta.get("labels") or {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

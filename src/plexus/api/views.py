"""JSON shapes of the API's answers (what `plexus ... --json` prints)."""

from __future__ import annotations

from typing import Any

from plexus.model.types import Container, Endpoint, Network


def network(net: Network, endpoints: int = 0) -> dict[str, Any]:
    return {
        "name": net.name,
        "id": net.id,
        "driver": net.driver,
        "subnets": [s.to_dict() for s in net.subnets],
        "ipv6": net.ipv6,
        "internal": net.internal,
        "mtu": net.mtu,
        "bridge": net.bridge if net.driver == "bridge" else None,
        "labels": net.labels,
        "options": net.options,
        "created": net.created,
        "endpoints": endpoints,
    }


def endpoint(ep: Endpoint) -> dict[str, Any]:
    return {
        "container_id": ep.container_id,
        "name": ep.name,
        "network": ep.network,
        "ifname": ep.ifname,
        "netns": ep.netns,
        "node": ep.node,
        "addresses": [str(a) for a in ep.addresses],
        "gateways": [str(g) for g in ep.gateways],
        "mac": ep.mac,
        "host_ifname": ep.host_ifname,
        "ports": [str(p) for p in ep.ports],
        "aliases": list(ep.aliases),
        "namespace": ep.namespace,
        "labels": ep.labels,
        "state": ep.state,
    }


def container(c: Container, eps: list[Endpoint]) -> dict[str, Any]:
    return {
        "id": c.id,
        "name": c.name,
        "node": c.node,
        "state": c.state,
        "exit_code": c.exit_code,
        "pid": c.pid,
        "netns": c.netns,
        "netns_name": c.netns_name,
        "command": list(c.command),
        "networks": list(c.networks),
        "ports": [str(p) for p in c.ports],
        "labels": c.labels,
        "namespace": c.namespace,
        "created": c.created,
        "endpoints": [endpoint(e) for e in eps],
    }

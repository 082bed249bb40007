"""JSON shapes of the API's answers (what `plexus ... --json` prints)."""

from __future__ import annotations

from typing import Any

from plexus.model.drivers import traits
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
        "bridge": net.bridge if traits(net.driver).links else None,
        **({"vni": net.vni, "block_size": net.block_size} if net.vni else {}),
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
        "borrowed": [str(a) for a in ep.borrowed],  # of another host's block
        "gateways": [str(g) for g in ep.gateways],
        "mac": ep.mac,
        "host_ifname": ep.host_ifname,
        "ports": [str(p) for p in ep.ports],
        "aliases": list(ep.aliases),
        "namespace": ep.namespace,
        "labels": ep.labels,
        "exposes": [str(x) for x in ep.exposes],
        "state": ep.state,
        "owner": ep.owner,
        "bandwidth": ep.bandwidth,
    }


def external_name(container_id: str, eps: list[Endpoint]) -> str:
    """The name `ps` shows for a container another runtime started."""
    return eps[0].name or container_id[:12]


def external(container_id: str, eps: list[Endpoint]) -> dict[str, Any]:
    """A container that another runtime (CNI, Docker, `plexus attach`) started: plexus knows it
    only through its endpoints, so `ps` shows it with those. Its namespace is the one path its
    endpoints name ("" while plexus knows none: a Docker endpoint before Join)."""
    first = eps[0]
    return {
        "id": container_id,
        "name": external_name(container_id, eps),
        "node": first.node,
        "state": "running" if all(e.state == "ready" for e in eps) else "creating",
        "exit_code": None,
        "pid": 0,
        "netns": next((e.netns for e in eps if e.netns), ""),
        "netns_name": "",
        "host_network": False,
        "command": [],
        "networks": [e.network for e in eps],
        "ports": [str(p) for e in eps for p in e.ports],
        "labels": first.labels,
        "namespace": first.namespace,
        "created": first.created,
        "owner": first.owner,
        "endpoints": [endpoint(e) for e in eps],
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
        # `plexus run` makes no namespace for a network on the host's own (driver host).
        "host_network": not c.netns_name,
        "command": list(c.command),
        "networks": list(c.networks),
        "ports": [str(p) for p in c.ports],
        "labels": c.labels,
        "namespace": c.namespace,
        "created": c.created,
        "owner": "plexus",
        "endpoints": [endpoint(e) for e in eps],
    }

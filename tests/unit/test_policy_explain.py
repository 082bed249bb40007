"""``plexus policy explain`` names containers of every host: this host's as `ps` lists them,
another host's by its name (a policy spans hosts, so does the question)."""

from __future__ import annotations

import ipaddress

import pytest

from plexus.errors import Conflict, InvalidArgument, NotFound
from plexus.model.types import Endpoint
from plexus.services.explain import Resolve, explain
from plexus.state.cache import Cache


def _ep(name: str, node: str, address: str) -> Endpoint:
    return Endpoint(container_id=f"{name}-{node}", ifname="eth0", network="ov", node=node,
                    netns="", name=name, namespace="x", labels={"app": name},
                    addresses=(ipaddress.ip_interface(f"{address}/24"),))


def _cache(*eps: Endpoint) -> Cache:
    cache = Cache(node="n1")
    for i, ep in enumerate(eps):
        cache.endpoints[f"k{i}"] = ep
    return cache


def _local_only(cache: Cache) -> Resolve:
    """`ps` of host n1: its own containers only."""
    def resolve(ref: str) -> list[Endpoint]:
        found = [e for e in cache.endpoints.values() if e.node == "n1" and e.name == ref]
        if not found:
            raise NotFound(f"container {ref!r} not found")
        return found

    return resolve


def test_a_container_of_another_host_is_found_by_its_name() -> None:
    cache = _cache(_ep("web", "n1", "10.0.0.2"), _ep("cli", "n2", "10.0.0.18"))
    flow, verdict = explain(cache, _local_only(cache), "cli", "web", "80/tcp", set())
    assert (str(flow.src.address), str(flow.dst.address)) == ("10.0.0.18", "10.0.0.2")
    assert flow.src.workload is not None and flow.src.workload.name == "cli"
    assert verdict.allowed  # no policy


def test_this_hosts_container_wins_and_two_remote_ones_are_ambiguous() -> None:
    cache = _cache(_ep("web", "n1", "10.0.0.2"), _ep("web", "n2", "10.0.0.18"),
                   _ep("db", "n2", "10.0.0.19"), _ep("db", "n3", "10.0.0.34"))
    flow, _ = explain(cache, _local_only(cache), "web", "10.0.0.19", "80/tcp", set())
    assert str(flow.src.address) == "10.0.0.2"
    with pytest.raises(Conflict, match="n2, n3"):
        explain(cache, _local_only(cache), "web", "db", "80/tcp", set())
    with pytest.raises(InvalidArgument, match="nobody"):
        explain(cache, _local_only(cache), "web", "nobody", "80/tcp", set())

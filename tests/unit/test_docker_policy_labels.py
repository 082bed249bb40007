"""A Docker container's policy namespace and labels: learned from dockerd's API during Join
(a fake dockerd on a unix socket answering the two calls the driver makes), translated into
plexus's (``plexus.namespace``; labels policies cannot select left out), and recorded on the
endpoint with its namespace created in the same transaction."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from plexus.agent.wiring import Agent
from plexus.api.docker import names
from plexus.api.docker.network import policy_labels
from plexus.errors import InvalidArgument
from plexus.model import keys
from plexus.services.networks import NetworkSpec
from plexus.store.memory import MemoryStore
from plexus.testing import FakeFirewall, FakeKernel
from tests.unit.test_services import attach, make_agent

NETWORK, ENDPOINT = "n" * 64, "e" * 64


def test_the_namespace_label_is_the_namespace_and_unselectable_labels_are_left_out() -> None:
    got = policy_labels({"plexus.namespace": "prod", "app": "db",
                         "com.docker.compose.config-hash": "f" * 64, "note": "two words"})
    assert got == ("prod", {"app": "db"})
    assert policy_labels({}) == ("", {})
    with pytest.raises(InvalidArgument, match="Prod_1"):
        policy_labels({"plexus.namespace": "Prod_1"})


async def _fake_dockerd(socket: Path, containers: list[dict[str, Any]]) -> web.AppRunner:
    """dockerd as it answers during Join: the joining endpoint listed by the network under
    ``ep-ID`` with the container's name; the container list filtered by name."""
    async def network(request: web.Request) -> web.Response:
        listed = {f"ep-{ENDPOINT}": {"Name": "db", "EndpointID": ENDPOINT}}
        return web.json_response({"Id": request.match_info["id"], "Containers": listed})

    async def containers_json(request: web.Request) -> web.Response:
        wanted = json.loads(request.query["filters"])["name"]
        assert wanted == ["^/db$"] and request.query["all"] == "1"
        return web.json_response(containers)

    app = web.Application()
    app.router.add_get("/v1.41/networks/{id}", network)
    app.router.add_get("/v1.41/containers/json", containers_json)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(socket)).start()
    return runner


async def test_labels_come_from_dockerds_container_list(tmp_path: Path) -> None:
    socket = tmp_path / "docker.sock"
    runner = await _fake_dockerd(socket, [
        {"Names": ["/db-old"], "Labels": {"app": "old"}},  # a regexp may match more
        {"Names": ["/db"], "Labels": {"app": "db", "plexus.namespace": "prod"}},
    ])
    try:
        assert await names.labels(socket, NETWORK, ENDPOINT) == (
            "db", {"app": "db", "plexus.namespace": "prod"})
    finally:
        await runner.cleanup()


async def test_an_unknown_endpoint_is_an_error_not_an_unlabelled_container(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "PAUSE", 0.0)
    socket = tmp_path / "docker.sock"
    runner = await _fake_dockerd(socket, [])
    try:
        with pytest.raises(LookupError, match="eeeeeeeeeeee"):
            await names.labels(socket, NETWORK, ENDPOINT)
        with pytest.raises(LookupError):  # nobody listening
            await names.labels(tmp_path / "none.sock", NETWORK, ENDPOINT)
    finally:
        await runner.cleanup()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = await make_agent(tmp_path, MemoryStore(), FakeKernel(), FakeFirewall())
    try:
        yield a
    finally:
        await a.close()


async def test_an_endpoints_new_namespace_is_created_with_it(agent: Agent) -> None:
    await agent.networks.create(NetworkSpec(name="n", subnets=["10.8.0.0/24"]))
    ep = await agent.endpoints.attach(attach("a"))
    ep = await agent.endpoints.update(ep.store_key, namespace="prod", labels={"app": "db"})
    assert (ep.namespace, ep.labels) == ("prod", {"app": "db"})
    assert await agent.store.get(keys.namespace("prod")) is not None
    assert agent.cache.endpoint(ep.store_key) == ep
    with pytest.raises(InvalidArgument, match="a b"):
        await agent.endpoints.update(ep.store_key, labels={"app": "a b"})
    with pytest.raises(InvalidArgument, match="NS"):
        await agent.endpoints.update(ep.store_key, namespace="NS")
    assert agent.cache.endpoint(ep.store_key) == ep  # nothing written

"""Integration tests need root and run inside ``tests/sandbox`` (the Makefile wraps them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.world import Agent, World


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PLEXUS_SANDBOX") == "1" and os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root inside tests/sandbox (run via `make test`)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "world")
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def agent(world: World) -> Agent:
    return world.add_host("host1")

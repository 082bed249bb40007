"""Integration tests need root and run inside ``tests/sandbox`` (the Makefile wraps them).

A skipped integration test fails unless PLEXUS_ALLOW_SKIPS=1: CI installs every component
(dockerd, podman, containerd, busybox-static...), so a skip there means a broken install or a
broken sandbox that would otherwise pass unnoticed. A developer without some of them sets the
variable to let those tests skip.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.harness.world import Agent, World

ALLOW_SKIPS = "PLEXUS_ALLOW_SKIPS"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PLEXUS_SANDBOX") == "1" and os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root inside tests/sandbox (run via `make test`)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip into a failure that says why, unless skips are allowed."""
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get(ALLOW_SKIPS) == "1":
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped: {reason}\n"
        f"A skipped integration test is a failure (CI installs every component); "
        f"set {ALLOW_SKIPS}=1 to allow skips on a machine that lacks some."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    _fail_skip(report)
    return report


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

"""Integration tests need root and run inside ``tests/sandbox`` (the Makefile wraps them)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("PLEXUS_SANDBOX") == "1" and os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root inside tests/sandbox (run via `make test`)")
    for item in items:
        item.add_marker(skip)

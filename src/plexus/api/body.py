"""Reading request bodies: one JSON object, typed fields, one clear line when a field is wrong."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web

from plexus.errors import InvalidArgument

T = TypeVar("T")


async def read(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise InvalidArgument("body", "(not JSON)", "expected a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", type(body).__name__, "expected a JSON object")
    return body


def get(body: dict[str, Any], key: str, kind: type[T], default: T) -> T:
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise InvalidArgument(key, value, f"expected {kind.__name__}")
    return value


def strings(body: dict[str, Any], key: str) -> list[str]:
    value = get(body, key, list, [])
    if not all(isinstance(v, str) for v in value):
        raise InvalidArgument(key, value, "expected a list of strings")
    return value


def labels(body: dict[str, Any], key: str = "labels") -> dict[str, str]:
    value = get(body, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgument(key, value, "expected an object of strings")
    return value

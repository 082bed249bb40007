"""``plexus label``: a running container's labels, changed on its record and every endpoint in
one transaction, so that policy membership follows at once (the firewall reconciler sees the
endpoints change)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from plexus.errors import Conflict, InvalidArgument
from plexus.model import keys
from plexus.model.types import Container, Endpoint
from plexus.services.context import Context
from plexus.store.base import Compare, Op, Put


def _changed(labels: Mapping[str, str], put: Mapping[str, str],
             drop: Sequence[str]) -> dict[str, str]:
    return {k: v for k, v in {**labels, **put}.items() if k not in drop}


async def relabel(ctx: Context, container: Container | None, eps: Sequence[Endpoint],
                  put: Mapping[str, str], drop: Sequence[str]) -> dict[str, str]:
    """The container's labels after the change (its first endpoint's when plexus did not start
    it)."""
    if not eps and container is None:
        raise InvalidArgument("container", "", "nothing to label")
    compares: list[Compare] = []
    ops: list[Op] = []
    labels: dict[str, str] = {}
    if container is not None:
        key = keys.container(container.node, container.name)
        labels = _changed(container.labels, put, drop)
        compares.append(Compare(key, "value", "==", container.to_json()))
        ops.append(Put(key, replace(container, labels=labels).to_json()))
    for ep in eps:
        new = _changed(ep.labels, put, drop)
        labels = labels or new
        compares.append(Compare(ep.store_key, "value", "==", ep.to_json()))
        ops.append(Put(ep.store_key, replace(ep, labels=new).to_json()))
    result = await ctx.commit(compares, ops)
    if not result.succeeded:
        raise Conflict("the container changed meanwhile; try again")
    await ctx.settle(result.revision)
    return labels

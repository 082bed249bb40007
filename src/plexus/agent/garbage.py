"""Garbage collection and start-up recovery: changes of desired state the agent makes itself.

Reconcilers never write desired state; when they find that reality moved on (a container's
namespace vanished without a detach) or a killed agent left something half-made, they tell this
collector, which goes through the services like any front door:

- at start-up, endpoints still "pending" and containers still "creating" are rolled back (their
  requester got an error, so nobody expects them to exist);
- endpoints whose namespace is gone are released (``release_gone``, from the link reconciler or
  the periodic pass);
- address, block and port claims whose owner no longer exists are deleted (periodic; each delete
  is conditional on the claim being unchanged since it was read).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os

from plexus.errors import PlexusError
from plexus.ipam.plans import plan_release
from plexus.model import keys
from plexus.model.types import Endpoint, IPInterface
from plexus.runtime.containers import ContainerRuntime
from plexus.services import ports
from plexus.services.context import Context
from plexus.services.endpoints import EndpointService
from plexus.store.base import Compare, Delete, Put

log = logging.getLogger("plexus.gc")
CHUNK = 256  # items examined between two yields to the event loop


class Collector:
    def __init__(self, ctx: Context, endpoints: EndpointService,
                 containers: ContainerRuntime) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        self.containers = containers
        self._releasing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.released: list[str] = []

    async def recover(self) -> list[str]:
        """Start-up: roll back what a killed agent left half-made."""
        done = [f"container {n}" for n in await self.containers.roll_back_creating()]
        pending = [e for e in self.ctx.cache.local_endpoints() if e.state == "pending"]
        if pending:
            await self.endpoints.release(pending)
            done += [f"endpoint {e.key}" for e in pending]
        return done

    # -- vanished namespaces -------------------------------------------------------------------

    def release_gone(self, ep: Endpoint) -> None:
        """Release ``ep`` in the background (the caller, a reconciler, must not wait on it)."""
        if ep.store_key in self._releasing:
            return
        self._releasing.add(ep.store_key)
        task = asyncio.create_task(self._release(ep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, ep: Endpoint) -> None:
        try:
            if self.ctx.cache.endpoint(ep.store_key) == ep:
                await self.endpoints.release([ep])
                self.released.append(ep.key)
                log.info("released %s: its network namespace %s is gone", ep.key, ep.netns)
        except PlexusError as exc:
            log.error("releasing %s (namespace gone) failed: %s", ep.key, exc)
        finally:
            self._releasing.discard(ep.store_key)

    async def find_gone(self) -> int:
        """The periodic pass's check of every local endpoint's namespace, in chunks."""
        found = 0
        for i, ep in enumerate(list(self.ctx.cache.local_endpoints())):
            if i % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)
            if ep.state == "ready" and ep.netns and not ep.peer_in_host and \
                    not os.path.exists(ep.netns):
                found += 1
                self.release_gone(ep)
        return found

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- orphan claims -------------------------------------------------------------------------

    async def collect_claims(self) -> list[str]:
        """Address and port claims that name an endpoint of this node that no longer exists.
        The live set is read once the cache holds the listing's revision: a claim and its
        endpoint are written together, so every claim listed names an endpoint the cache then
        has (the watch that feeds the cache may lag the listing; then it is waited for)."""
        mine = keys.endpoints(self.ctx.node)
        collected: list[str] = []
        # One subnet's claims at a time (a listing is one synchronous read of the store).
        subnets, _ = await self.ctx.store.list(keys.SUBNETS)
        for subnet in subnets:
            await asyncio.sleep(0)
            cidr = keys.segment_cidr(subnet.key[len(keys.SUBNETS):])
            addrs, revision = await self.ctx.store.list(keys.ipam_prefix(cidr))
            await self.ctx.seen(revision)
            live = self.ctx.cache.endpoints
            for i, kv in enumerate(addrs):
                if i % CHUNK == CHUNK - 1:
                    await asyncio.sleep(0)
                owned_by_gone = kv.value.startswith(mine) and kv.value not in live
                if owned_by_gone and await self._drop_address(kv.key, kv.value):
                    collected.append(kv.key)
        port_kvs, revision = await self.ctx.store.list(keys.ports(self.ctx.node))
        await self.ctx.seen(revision)
        live = self.ctx.cache.endpoints
        for kv in port_kvs:
            stale = [o for o in ports.owners(kv.value) if o.startswith(mine) and o not in live]
            if stale and await self._drop_port(kv.key, kv.value, kv.mod_revision, stale):
                collected.append(kv.key)
        return collected

    async def _drop_address(self, key: str, owner: str) -> bool:
        cidr = keys.segment_cidr(key[len(keys.IPAM):].split("/", 1)[0])
        address = key.rsplit("/", 1)[1]
        iface: IPInterface = _iface(address, cidr)
        plan = await plan_release(self.ctx.store, [iface], owner)
        return bool(plan.ops) and (await self.ctx.commit(plan.compares, plan.ops)).succeeded

    async def _drop_port(self, key: str, value: str, mod: int, stale: list[str]) -> bool:
        held = {k: v for k, v in json.loads(value).items() if v not in stale}
        op = Put(key, json.dumps(held, sort_keys=True)) if held else Delete(key)
        return (await self.ctx.commit([Compare(key, "mod", "==", mod)], [op])).succeeded


def _iface(address: str, cidr: str) -> IPInterface:
    return ipaddress.ip_interface(f"{address}/{cidr.rsplit('/', 1)[1]}")

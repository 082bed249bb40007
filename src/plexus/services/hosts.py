"""The hosts of a datastore: who they are, whether their agent is alive, and removing a dead one.

An agent registers at start-up in one transaction: its ``Host`` record (underlay address, agent
id, start time) and its liveness key under a lease (``keys.host_lease``). The lease is kept
alive every ``ttl / 3`` seconds; it goes when the agent stops (revoked) or dies (it expires), and
other hosts see the host as down. Nothing is released then: a dead agent's containers keep
working (the kernel state stays) and other hosts keep routing to them. Their addresses go only
when someone removes the host (``plexus host rm``), which is refused while it is alive.

Node names are unique among live agents: the liveness key holds the agent id (a random id kept
in the agent's state directory), so the same agent restarting within the lease's TTL takes its
own key over, and a second agent with the same ``--node`` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from plexus import __version__
from plexus.errors import Conflict, InvalidArgument, NotFound, PlexusError
from plexus.ipam.plans import Plan, plan_release_many
from plexus.model import keys
from plexus.model.types import Endpoint, Host, IPNetwork
from plexus.state.cache import Cache
from plexus.store.base import Compare, Datastore, Delete, Op, Put
from plexus.store.lease import LeaseKeeper

log = logging.getLogger("plexus.hosts")

LEASE_TTL = 10.0  # seconds a dead agent still counts as alive
SEEN_EVERY = 60.0  # seconds between updates of Host.seen (a write to a shared store)
AGENT_ID_FILE = "agent-id"


def agent_id(state_dir: Path) -> str:
    """The state directory's id, made once: the same directory is the same agent."""
    path = state_dir / AGENT_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if found:
            return found
    made = secrets.token_hex(8)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(made + "\n")
    tmp.replace(path)
    return made


@dataclass(frozen=True, slots=True)
class HostView:
    host: Host
    alive: bool
    endpoints: int
    blocks: tuple[IPNetwork, ...] = ()
    blocks_used: int = 0

    def to_dict(self) -> dict[str, object]:
        h = self.host
        return {"name": h.name, "address": h.address, "alive": self.alive,
                "endpoints": self.endpoints, "version": h.version, "started": h.started,
                "seen": h.seen, "agent_id": h.agent_id,
                "blocks": [str(b) for b in self.blocks], "blocks_used": self.blocks_used}


class Registration:
    """This agent's record and lease: ``register`` once, then ``run`` keeps it alive."""

    def __init__(self, store: Datastore, host: Host, ttl: float = LEASE_TTL) -> None:
        self._store = store
        self.host = host
        self.ttl = ttl
        self.lease = 0

    async def register(self) -> None:
        """Refuses (Conflict, naming the other agent) if a live agent of another state directory
        holds this node's name."""
        name = self.host.name
        held = await self._store.get(keys.host_lease(name))
        if held is not None and held.value != self.host.agent_id:
            other = await self._store.get(keys.host(name))
            where = Host.from_json(other.value).address if other else "unknown address"
            raise Conflict(f"node name {name!r} is in use by a live agent ({where}): "
                           "give this one another --node")
        now = time.time()
        self.host = replace(self.host, started=now, seen=now, version=__version__)
        self.lease = await self._store.grant_lease(self.ttl)
        # Compared, so that two agents starting at once with one name cannot both win.
        guard = (Compare.absent(keys.host_lease(name)) if held is None
                 else Compare.unchanged(held, keys.host_lease(name)))
        result = await self._store.txn(
            [guard],
            [Put(keys.host(name), self.host.to_json()),
             Put(keys.host_lease(name), self.host.agent_id, lease=self.lease)],
            [])
        if not result.succeeded:
            await self._store.revoke_lease(self.lease)
            raise Conflict(f"node name {name!r} was claimed by another agent just now")

    async def run(self) -> None:
        """Keep the lease alive until cancelled (``store.lease.LeaseKeeper``) and ``seen``
        fresh; register again if the lease was lost (the store was unreachable for longer than
        the TTL, or someone revoked it)."""
        while True:
            keeper = LeaseKeeper(self._store, self.lease, self.ttl)
            keeper.start()
            try:
                await self._seen_until(keeper.lost)
            finally:
                await keeper.stop()
            log.warning("the lease of node %s is gone: registering again", self.host.name)
            while not await self._reregister():
                await asyncio.sleep(self.ttl / 3)

    async def _seen_until(self, lost: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), SEEN_EVERY)
                return
            self.host = replace(self.host, seen=time.time())
            try:
                await self._store.put(keys.host(self.host.name), self.host.to_json())
            except PlexusError as exc:
                log.warning("node %s: recording it was seen failed: %s", self.host.name,
                            exc.message)

    async def _reregister(self) -> bool:
        try:
            await self.register()
        except PlexusError as exc:
            log.error("node %s: %s", self.host.name, exc.message)
            return False
        return True

    async def close(self) -> None:
        """A clean stop: the host is listed as down at once, not after the TTL."""
        if self.lease:
            with contextlib.suppress(PlexusError):
                await self._store.revoke_lease(self.lease)
            self.lease = 0


# etcd refuses a transaction of more than 128 operations (its --max-txn-ops): a dead host's
# endpoints go in chunks, each with its addresses (about 4 operations an endpoint).
REMOVE_CHUNK = 25


async def _release_plan(store: Datastore, name: str, endpoints: Sequence[Endpoint]) -> Plan:
    """Forget ``endpoints`` of dead host ``name`` and their addresses, guarded on it being
    down: each endpoint goes with its claims, so every step leaves the store consistent."""
    plan = await plan_release_many(
        store, [(a, ep.store_key) for ep in endpoints for a in ep.addresses])
    plan.compares.append(Compare.absent(keys.host_lease(name)))
    plan.ops += [Delete(keys.endpoint(ep.node, ep.container_id, ep.ifname)) for ep in endpoints]
    return plan


async def remove_host(store: Datastore, name: str, self_node: str,
                      endpoints: list[Endpoint], blocks: Sequence[str] = ()) -> int:
    """``plexus host rm``: how many endpoints were released. Refused while the host is alive
    or for the agent's own node. ``blocks``: the keys of the address blocks it holds."""
    if not name or "/" in name:
        raise InvalidArgument("host", name, "a host name")
    if name == self_node:
        raise Conflict(f"host {name!r} is this agent's own node")
    if await store.get(keys.host(name)) is None:
        raise NotFound(f"host {name!r} not found")
    if await store.get(keys.host_lease(name)) is not None:
        raise Conflict(f"host {name!r} is alive (its agent holds a lease): stop it first")
    for i in range(0, len(endpoints), REMOVE_CHUNK):
        plan = await _release_plan(store, name, endpoints[i:i + REMOVE_CHUNK])
        await _commit(store, name, plan.compares, plan.ops)
    last = [Delete(keys.ports(name), prefix=True), Delete(keys.containers(name), prefix=True),
            Delete(keys.host(name))]
    for i in range(0, len(blocks), REMOVE_CHUNK * 4):
        await _commit(store, name, [Compare.absent(keys.host_lease(name))],
                      [Delete(b) for b in blocks[i:i + REMOVE_CHUNK * 4]])
    await _commit(store, name, [Compare.absent(keys.host_lease(name))], last)
    return len(endpoints)


async def _commit(store: Datastore, name: str, compares: Sequence[Compare],
                  ops: Sequence[Op]) -> None:
    if not (await store.txn(compares, ops)).succeeded:
        raise Conflict(f"host {name!r} changed while it was being removed (came back?): "
                       "try again")


def held_blocks(cache: Cache, node: str) -> list[tuple[IPNetwork, IPNetwork]]:
    """(subnet, block) of every address block ``node`` holds."""
    return cache.held_by(node)


def views(cache: Cache) -> list[HostView]:
    """Every host the datastore knows, with liveness, endpoint counts and its blocks (held, and
    in use: holding an address of one of its endpoints), by name."""
    counts: dict[str, int] = {}
    used: dict[str, set[IPNetwork]] = {}
    for ep in cache.endpoints.values():
        counts[ep.node] = counts.get(ep.node, 0) + 1
        for a in ep.addresses:
            for block in cache.blocks_of(a.network, ep.node):
                if a.ip in block:
                    used.setdefault(ep.node, set()).add(block)
    out = []
    for h in sorted(cache.hosts.values(), key=lambda h: h.name):
        held = [block for _, block in held_blocks(cache, h.name)]
        out.append(HostView(h, h.name in cache.alive, counts.get(h.name, 0), tuple(held),
                            len(used.get(h.name, ()))))
    return out


def expired(cache: Cache, now: float, after: float) -> list[str]:
    """Hosts whose agent has held no lease for ``after`` seconds (by their last ``seen``):
    what ``--host-gc-after`` removes."""
    return sorted(h.name for h in cache.hosts.values()
                  if h.name not in cache.alive and h.name != cache.node
                  and now - max(h.seen, h.started) >= after)


async def collect_expired(store: Datastore, cache: Cache, after: float) -> list[str]:
    """Remove every expired host (as ``plexus host rm`` does); the names removed. Another
    host's agent doing the same at once makes one of the two find nothing: not an error."""
    removed = []
    for name in expired(cache, time.time(), after):
        try:
            released = await remove(store, cache, name)
        except (NotFound, Conflict) as exc:
            log.info("host %s not collected: %s", name, exc.message)
            continue
        log.warning("host %s had no live agent for %.0f s: removed, with %d endpoints",
                    name, after, released)
        removed.append(name)
    return removed


async def remove(store: Datastore, cache: Cache, name: str) -> int:
    """``remove_host`` of what the cache knows ``name`` holds: its endpoints and blocks."""
    eps = [ep for ep in cache.endpoints.values() if ep.node == name]
    blocks = [keys.host_block(s, b) for s, b in held_blocks(cache, name)]
    return await remove_host(store, name, cache.node, eps, blocks)

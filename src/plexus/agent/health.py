"""Services' readiness checks (``--health-tcp PORT`` or ``--health-cmd CMD``): each agent checks
the endpoints of its own host, every ``interval`` seconds, and writes a status key
(``keys.service_health``) once one has failed ``threshold`` checks in a row; one passing check
deletes it. Every host's reconcilers read the keys through the cache (``lb.members.serving``),
so a failing container leaves the service's backends and its headless name everywhere within
interval x threshold (plus one watch round trip), and comes back the same way.

An endpoint is taken to be ready until it has failed (no key: ready), so that a service with a
check serves at once, as one without does. A TCP check connects from the host to the
endpoint's address (IPv4 first); a command runs with ``sh -c`` in the container's network
namespace (``nsenter --net``) and passes when it exits 0. A check that takes longer than its
interval (at most 10 s) fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from plexus.errors import PlexusError
from plexus.lb.members import backs, running, selected
from plexus.lb.spec import Health, Service
from plexus.model import keys
from plexus.model.types import Endpoint
from plexus.services.context import Context
from plexus.store.base import Delete, Op, Put

log = logging.getLogger("plexus.health")
TICK = 0.1  # seconds between looks at which checks are due
MAX_TIMEOUT = 10.0
Pair = tuple[str, str]  # (service store key, endpoint store key)


@dataclass
class _State:
    due: float
    fails: int = 0
    task: asyncio.Task[None] | None = None


async def probe(health: Health, ep: Endpoint) -> bool:
    """One check of one endpoint: did it pass?"""
    timeout = min(health.interval, MAX_TIMEOUT)
    if health.port:
        address = ep.address_of(4) or ep.address_of(6)
        if address is None:
            return False
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(str(address), health.port), timeout)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return await _run(health.command, ep.netns, timeout)


async def _run(command: str, netns: str, timeout: float) -> bool:
    enter = ["nsenter", f"--net={netns}", "--"] if netns else []
    proc = await asyncio.create_subprocess_exec(
        *enter, "sh", "-c", command, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(proc.wait(), timeout) == 0
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False


class HealthProber:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._states: dict[Pair, _State] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.run_once()
            except PlexusError as exc:
                log.warning("readiness checks: %s", exc.message)

    async def run_once(self) -> None:
        """Start the checks that are due; forget the endpoints that left."""
        now = time.monotonic()
        wanted = set()
        for pair, svc, ep in self._local_pairs():
            wanted.add(pair)
            state = self._states.setdefault(pair, _State(due=now))
            if state.task is None and now >= state.due:
                state.task = asyncio.create_task(self._check(pair, svc, ep, state))
        for pair in set(self._states) - wanted:
            state = self._states.pop(pair)
            if state.task is not None:
                state.task.cancel()
            if pair in self.ctx.cache.failing:
                await self._write(pair, None)

    def _local_pairs(self) -> list[tuple[Pair, Service, Endpoint]]:
        cache = self.ctx.cache
        found = []
        for key in sorted(cache.checked):
            svc = cache.services[key]
            for ep in selected(cache, svc):
                if ep.node == cache.node and backs(svc, ep) and running(cache, ep):
                    found.append(((key, ep.store_key), svc, ep))
        return found

    async def _check(self, pair: Pair, svc: Service, ep: Endpoint, state: _State) -> None:
        assert svc.health is not None
        try:
            passed = await probe(svc.health, ep)
            state.due = time.monotonic() + svc.health.interval
            state.fails = 0 if passed else state.fails + 1
            failing = pair in self.ctx.cache.failing
            if passed and failing:
                await self._write(pair, None)
            elif state.fails >= svc.health.threshold and not failing:
                await self._write(pair, f"failed {state.fails} checks in a row")
        except (OSError, PlexusError) as exc:
            log.warning("readiness check of %s for %s: %s", ep.name or ep.key, svc.ref, exc)
        finally:
            state.task = None

    async def _write(self, pair: Pair, status: str | None) -> None:
        svc_key, ep_key = pair
        namespace, name = svc_key[len(keys.SERVICES):].split("/", 1)
        key = keys.service_health(namespace, name, ep_key)
        log.info("%s of service %s/%s: %s", ep_key, namespace, name, status or "ready again")
        op: Op = Delete(key) if status is None else Put(key, status)
        await self.ctx.commit([], [op])

    async def close(self) -> None:
        for state in self._states.values():
            if state.task is not None:
                state.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.task
        self._states.clear()

"""``DnsService``: the one object the agent holds. Same verbs whether DNS runs in the agent's
event loop (``workers=0``) or in supervised worker processes (``workers=N``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from plexus.dns.config import DNS_PORT, DnsSettings, resolv_conf_upstreams
from plexus.dns.model import DnsChanges, Explanation
from plexus.dns.records import RecordTable
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions, listen_addresses
from plexus.dns.workers import WorkerPool
from plexus.model.types import Endpoint, Network

log = logging.getLogger("plexus.dns")


class DnsService:
    """``follow``: take the agent-wide upstreams from this resolv.conf and re-read it when it
    changes (checked every ``follow_interval`` seconds), so a DHCP or VPN change on the host
    reaches containers without a restart. Pass it when no ``--dns-upstream`` was given."""

    def __init__(self, settings: DnsSettings | None = None, *, workers: int = 0,
                 options: ServerOptions | None = None, port: int = DNS_PORT,
                 netns: str = "", follow: Path | None = None,
                 follow_interval: float = 5.0) -> None:
        self.settings = settings or DnsSettings()
        self.port = port
        self.netns = netns
        self.follow = follow
        self.follow_interval = follow_interval
        self._follower: asyncio.Task[None] | None = None
        if follow is not None:
            self.settings = dataclasses.replace(self.settings,
                                                upstreams=resolv_conf_upstreams(follow))
        self._table = RecordTable.empty(self.settings)
        self._server: DnsServer | None = None
        self._pool: WorkerPool | None = None
        if workers > 0:
            self._pool = WorkerPool(workers, options)
            self._pool.update(self._table)  # one table, changed in place by apply (no worker yet)
        else:
            self._server = DnsServer(self._table, options)

    @property
    def table(self) -> RecordTable:
        return self._table

    async def start(self) -> None:
        if self._pool is not None:
            await self._pool.start()
        elif self._server is not None:
            await self._server.start()
        if self.follow is not None:
            self._follower = asyncio.get_running_loop().create_task(self._follow(self.follow))

    async def _follow(self, path: Path) -> None:
        while True:
            await asyncio.sleep(self.follow_interval)
            upstreams = resolv_conf_upstreams(path)
            if upstreams and upstreams != self.settings.upstreams:
                log.info("dns: upstreams from %s are now %s", path,
                         ", ".join(map(str, upstreams)))
                self.settings = dataclasses.replace(self.settings, upstreams=upstreams)
                self.install(self._table.rebuilt(self.settings))

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._pool is not None:
            await self._pool.close()
        elif self._server is not None:
            await self._server.close()

    def load(self, networks: Iterable[Network],
             endpoints: Mapping[str, Endpoint] | Iterable[Endpoint]) -> RecordTable:
        """Build the records from every network and endpoint and swap them in (no listener is
        closed; queries in flight finish). For start-up and resyncs: ~35 µs per endpoint, and
        every worker process is sent the whole state. ``endpoints`` maps the keys later
        ``apply`` calls use (the agent: datastore keys); a plain iterable is keyed by
        datastore key."""
        table = RecordTable.build(networks, endpoints, self.settings)
        self.install(table)
        return table

    update = load  # the name before changes could be applied one at a time

    def apply(self, changes: DnsChanges) -> None:
        """Upsert and remove networks and endpoints: O(size of the change), here and in each
        worker process, which is sent only the change. Call it for every change (after the
        transaction committed, from the datastore watch), then ``sync_listeners`` if networks
        changed."""
        if self._pool is not None:
            self._pool.apply(changes)
        elif self._server is not None:
            self._server.apply(changes)

    def install(self, table: RecordTable) -> None:
        self._table = table
        if self._pool is not None:
            self._pool.update(table)
        elif self._server is not None:
            self._server.update(table)

    def wanted_listeners(self) -> list[ListenAddress]:
        return listen_addresses(self._table, self.port, self.netns)

    async def sync_listeners(self) -> list[str]:
        """Listen on every DNS-enabled network's gateways and nowhere else. Returns one message
        per address that could not be bound (and keeps the others); call again to retry."""
        return await self.set_listeners(self.wanted_listeners())

    async def set_listeners(self, wanted: Iterable[ListenAddress]) -> list[str]:
        if self._pool is not None:
            return await self._pool.set_listeners(list(wanted))
        assert self._server is not None
        return await self._server.set_listeners(wanted)

    def explain(self, network: str, name: str, qtype: int | str = "A",
                client: str | None = None) -> Explanation:
        """What would be answered and why, from the records alone (nothing is sent)."""
        return self._table.explain(network, name, qtype, client)

    async def lookup(self, network: str, name: str, qtype: int | str = "A",
                     client: str | None = None) -> Explanation:
        """``explain``, plus the upstream's real answer when the name is forwarded."""
        self._table.explain(network, name, qtype, client)  # NotFound / InvalidArgument early
        if self._pool is not None:
            return await self._pool.lookup(network, name, qtype, client)
        assert self._server is not None
        return await self._server.lookup(network, name, qtype, client)

    async def stats(self) -> dict[str, Any]:
        if self._pool is not None:
            return await self._pool.stats()
        assert self._server is not None
        return self._server.stats()

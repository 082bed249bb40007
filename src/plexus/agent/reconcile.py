"""Make the kernel match the datastore, and the datastore match reality.

Level-triggered: every pass reads desired state and kernel state and applies the difference, so
the same code runs at start-up, after a crash, after someone deleted a link or flushed the table,
and periodically. It never flushes and recreates what is already right: links that exist with
plexus's alias are left alone, so running containers (and their TCP connections) do not notice an
agent restart.

Start-up additionally rolls back what a killed agent left half-done: endpoints still "pending" and
containers still "creating" (their requester got an error, so nobody expects them to exist).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from plexus.agent.containers import ContainerService
from plexus.agent.core import Core, log
from plexus.agent.endpoints import claim_owner
from plexus.dataplane import docker_user
from plexus.dataplane.driver import host_ifname, network_alias, owner_alias
from plexus.errors import PlexusError
from plexus.model import keys
from plexus.store.base import Compare, Delete


@dataclass
class Report:
    rolled_back: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.rolled_back, self.released, self.repaired, self.orphans, self.errors))


class Reconciler:
    def __init__(self, core: Core, containers: ContainerService) -> None:
        self.core = core
        self.containers = containers
        self.endpoints = containers.endpoints

    async def recover(self) -> Report:
        """The start-up pass."""
        report = Report()
        await self.core.load()
        await self._roll_back_creating(report)
        for ep in [e for e in self.core.endpoints.values() if e.state == "pending"]:
            report.rolled_back.append(f"endpoint {ep.key}")
            report.errors += await self.endpoints._teardown(ep)
        await self.converge(report, full_firewall=True)
        return report

    async def _roll_back_creating(self, report: Report) -> None:
        for c in await self.core.containers():
            if c.state == "creating":
                report.rolled_back.append(f"container {c.name}")
                report.errors += await self.containers._remove(c)

    async def converge(self, report: Report | None = None, full_firewall: bool = False) -> Report:
        report = Report() if report is None else report
        await self._release_gone(report)
        await self._ensure_networks(report)
        if any(n.driver == "bridge" for n in self.core.networks.values()):
            await docker_user.ensure_accept_rules()  # dockerd may have (re)started meanwhile
        # One dump per pass (it costs ~0.4 s per 1,000 links in pyroute2). Every link in it was
        # made for an endpoint already in the cache (the cache is written before the kernel), so
        # deciding against the cache *after* the dump never mistakes a new link for an orphan.
        owned = await self.core.dataplane.owned_links()
        await self._ensure_endpoints(owned, report)
        await self._delete_orphan_links(owned, report)
        await self._collect_garbage(report)
        try:
            await self._converge_firewall(full_firewall, report)
        except PlexusError as exc:
            report.errors.append(f"firewall: {exc}")
        # level-triggered: retries listeners that failed to bind
        report.errors += [f"dns: {e}" for e in await self.core.publish_dns(resync=True)]
        return report

    async def _release_gone(self, report: Report) -> None:
        """Endpoints whose network namespace no longer exists: the container is gone without a
        detach (killed runtime, lost DEL). Free their addresses."""
        for ep in list(self.core.endpoints.values()):
            # Not Docker's: it joins an endpoint before runc has made the namespace that its
            # prestart hook then mounts at SandboxKey, and it says goodbye itself (Leave,
            # DeleteEndpoint, or cleanup when dockerd restarts).
            if ep.owner == "docker":
                continue
            if ep.state == "ready" and ep.netns and not os.path.exists(ep.netns):
                report.released.append(ep.key)
                report.errors += await self.endpoints._teardown(ep)

    async def _ensure_networks(self, report: Report) -> None:
        for net in self.core.networks.values():
            try:
                await self.core.dataplane.ensure_network(net)
            except PlexusError as exc:
                report.errors.append(f"network {net.name}: {exc}")

    async def _ensure_endpoints(self, owned: dict[str, str], report: Report) -> None:
        for ep in list(self.core.endpoints.values()):
            net = self.core.networks.get(ep.network)
            if ep.state != "ready" or net is None or net.driver != "bridge":
                continue
            if ep.owner == "docker":
                continue  # Docker moved and renamed the container end; only it can redo that
            if owned.get(ep.host_ifname or host_ifname(ep)) == owner_alias(ep):
                continue  # present and ours: leave it untouched
            try:
                fixed = await self.core.dataplane.ensure_endpoint(net, ep)
                self.core.endpoints[ep.key] = fixed
                await self.core.store.put(
                    keys.endpoint(ep.node, ep.container_id, ep.ifname), fixed.to_json()
                )
                report.repaired.append(ep.key)
            except PlexusError as exc:
                report.errors.append(f"endpoint {ep.key}: {exc}")

    async def _delete_orphan_links(self, owned: dict[str, str], report: Report) -> None:
        wanted = {net.bridge: network_alias(net) for net in self.core.networks.values()}
        for ep in self.core.endpoints.values():
            wanted[ep.host_ifname or host_ifname(ep)] = owner_alias(ep)
        orphans = [name for name, alias in owned.items() if wanted.get(name) != alias]
        for name in orphans:
            if name in self._wanted_now():
                continue  # re-created for a new endpoint while earlier orphans were deleted
            report.orphans.append(name)
            try:
                await self.core.dataplane.delete_link(name)
            except PlexusError as exc:
                report.errors.append(f"link {name}: {exc}")

    def _wanted_now(self) -> set[str]:
        return {ep.host_ifname or host_ifname(ep) for ep in self.core.endpoints.values()}

    async def _collect_garbage(self, report: Report) -> None:
        """Address and port claims whose owning endpoint (on this node) no longer exists. The
        live set is taken after the listing (see converge), and each delete is conditional on
        the claim being unchanged."""
        mine = keys.endpoints(self.core.node)
        listed = []
        for prefix in (keys.IPAM, keys.ports(self.core.node)):
            listed += (await self.core.store.list(prefix))[0]
        live = {
            keys.endpoint(e.node, e.container_id, e.ifname) for e in self.core.endpoints.values()
        }
        stale = [
            kv
            for kv in listed
            if claim_owner(kv.value).startswith(mine) and claim_owner(kv.value) not in live
        ]
        for kv in stale:
            done = await self.core.store.txn(
                [Compare(kv.key, "mod", "==", kv.mod_revision)], [Delete(kv.key)]
            )
            if done.succeeded:
                report.orphans.append(kv.key)

    async def _converge_firewall(self, full: bool, report: Report) -> None:
        if full:
            await self.core.publish(full=True)
            return
        if await self.core.firewall.current() != self.core.fw_applied:
            report.repaired.append("firewall table")
            await self.core.publish(full=True)

    async def run_forever(self) -> None:
        """The periodic pass; each one is bounded and logged when it changed something."""
        while True:
            await asyncio.sleep(self.core.config.reconcile_interval)
            try:
                report = await self.converge()
            except PlexusError as exc:
                log.error("reconcile failed: %s", exc)
                continue
            if report:
                log.info("reconcile: %s", report)

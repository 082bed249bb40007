"""The periodic full pass: the safety net under the watch and the kernel events.

It compares the whole of desired state with the kernel, which the event-driven path never
does: links that went missing or carry the wrong alias are handed back to the link reconciler
(a legacy alias, of an agent before owners, is re-tagged that way), links this agent made that
nothing wants any more (orphans) are deleted (another agent's are not in the snapshot), the
firewall table is compared element by element, overlay devices' FDB entries, neighbours and
routes are compared with the kernel, DNS listeners are retried, vanished namespaces and orphan
claims are collected. It runs at start-up and rarely after that
(``--reconcile-interval``), and yields to the event loop between chunks, so it never holds up
requests for more than a few milliseconds.

The same comparison serves start-up: ``adopt`` tells the link reconciler which objects the
kernel already holds as they should be, so a restarted agent changes nothing that is right.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plexus.agent.garbage import Collector
from plexus.agent.reconcilers.dns import LISTENERS
from plexus.agent.reconcilers.firewall import VERIFY, FirewallReconciler
from plexus.agent.reconcilers.links import LinkReconciler
from plexus.agent.reconcilers.overlay import OverlayReconciler
from plexus.dataplane.drivers import NetworkDriver
from plexus.dataplane.host import LinkTable
from plexus.dataplane.links import untag
from plexus.errors import PlexusError
from plexus.services.context import endpoint_object, network_object
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.fullpass")
CHUNK = 256


@dataclass
class Expected:
    """Links the desired state wants in the host's namespace, and which object wants each."""

    links: dict[str, str] = field(default_factory=dict)  # name -> alias (tagged)
    wanted_by: dict[str, str] = field(default_factory=dict)  # name -> reconciler object key


class FullPass:
    def __init__(self, cache: Cache, drivers: Mapping[str, NetworkDriver], host: LinkTable,
                 links: LinkReconciler, firewall: FirewallReconciler, dns: Reconciler | None,
                 collector: Collector, overlay: OverlayReconciler | None = None) -> None:
        self._cache = cache
        self._drivers = drivers
        self._host = host
        self._links = links
        self._firewall = firewall
        self._dns = dns
        self._collector = collector
        self._overlay = overlay
        self.passes = 0
        self.last: dict[str, Any] = {}

    async def expected(self) -> Expected:
        out = Expected()
        for net in list(self._cache.networks.values()):
            for name, alias in self._drivers[net.driver].network_links(net).items():
                out.links[name], out.wanted_by[name] = alias, network_object(net.name)
        for i, ep in enumerate(list(self._cache.local_endpoints())):
            if i % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)
            on = self._cache.network(ep.network)
            if on is None:
                continue
            for name, alias in self._drivers[on.driver].endpoint_links(ep).items():
                out.links[name], out.wanted_by[name] = alias, endpoint_object(ep.store_key)
        return out

    async def adopt(self) -> int:
        """Start-up: record as applied every object whose links the kernel already has."""
        owned = await self._host.owned_links()
        want = await self.expected()
        missing = {want.wanted_by[n] for n, alias in want.links.items() if owned.get(n) != alias}
        adopted = 0
        for net in self._cache.networks.values():
            if network_object(net.name) not in missing:
                self._links.adopt_network(net)
                adopted += 1
        for ep in self._cache.local_endpoints():
            if endpoint_object(ep.store_key) not in missing:
                self._links.adopt_endpoint(ep)
                adopted += 1
        return adopted

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        owned = await self._host.owned_links()
        # Decided against the cache *after* the snapshot: a link in it was made for an object
        # the cache already had, so a new endpoint's link is never taken for an orphan.
        want = await self.expected()
        drifted = sorted({want.wanted_by[n] for n, a in want.links.items() if owned.get(n) != a})
        for key in drifted:
            self._links.invalidate(key)
        # An orphan by what its alias names, not by its tag: a wanted link that only lacks this
        # agent's tag (legacy) is re-tagged above, not deleted under a running container.
        orphans = [n for n, alias in owned.items() if untag(want.links.get(n)) != untag(alias)]
        errors = await self._delete(orphans)
        self._firewall.enqueue([VERIFY])
        if self._overlay is not None:
            self._overlay.invalidate_all()
        if self._dns is not None:
            self._dns.enqueue([LISTENERS])
        gone = await self._collector.find_gone()
        claims = await self._collector.collect_claims()
        self.passes += 1
        self.last = {
            "duration_ms": round(1000 * (time.monotonic() - started), 1),
            "links_checked": len(owned), "drifted": drifted, "orphans": orphans,
            "namespaces_gone": gone, "claims_collected": claims, "errors": errors,
        }
        if drifted or orphans or gone or claims or errors:
            log.info("full pass: %s", self.last)
        return self.last

    async def _delete(self, orphans: list[str]) -> list[str]:
        errors = []
        for name in orphans:
            try:
                await self._host.delete_link(name, why="not wanted by any network or endpoint")
            except PlexusError as exc:
                errors.append(f"link {name}: {exc}")
        return errors

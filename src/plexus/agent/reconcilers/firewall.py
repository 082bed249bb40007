"""The firewall: plexus's nftables table, changed by element deltas of what changed.

Objects are ``net:NAME`` and ``ep:STORE_KEY``. The reconciler works in batches: everything
queued since its last batch becomes one ``FirewallDelta`` and so one nftables transaction (a
burst of parallel CNI ADDs is one kernel call). It keeps what it applied per endpoint, so a batch
costs O(size of the batch), never O(endpoints).

At start-up (and after any failure) it compares the whole desired state with what the kernel
holds and replaces the table only if they differ: a restarted agent changes nothing in a table
that is right, and a flushed or hand-edited table is repaired.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from plexus.dataplane.nft.firewall import Firewall, FirewallDelta
from plexus.dataplane.nft.state import (
    FirewallState,
    NetRule,
    Publication,
    endpoint_publications,
    net_rule,
    vip_clients,
)
from plexus.model import keys as store_keys
from plexus.model.drivers import traits
from plexus.model.types import IPAddress
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")
VERIFY = "verify"  # the object that asks for a full comparison with the kernel
CHUNK = 256


@dataclass(frozen=True)
class Snapshot:
    state: FirewallState
    parts: dict[str, frozenset[Publication]]  # store key -> what that endpoint publishes


class FirewallReconciler(Reconciler):
    name = "firewall"
    batch = True

    def __init__(self, cache: Cache, firewall: Firewall,
                 on_bridges: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__()
        self._cache = cache
        self._fw = firewall
        self._on_bridges = on_bridges  # the first filtered network appeared (DOCKER-USER)
        self._nets: tuple[NetRule, ...] | None = None  # None: not in step with the kernel
        self._pubs: dict[str, frozenset[Publication]] = {}
        # Multi-homed containers of this host only: container id -> network -> the addresses
        # it holds on its other networks (``NetRule.clients``), kept per container so that an
        # endpoint's change costs O(that container's endpoints).
        self._clients: dict[str, dict[str, frozenset[IPAddress]]] = {}
        self.repairs = 0

    # -- desired state -------------------------------------------------------------------------

    def _net_rules(self) -> tuple[NetRule, ...]:
        clients: dict[str, set[IPAddress]] = {}
        for per_net in self._clients.values():
            for name, addresses in per_net.items():
                clients.setdefault(name, set()).update(addresses)
        nets = (n for n in self._cache.networks.values() if traits(n.driver).filtered)
        return tuple(sorted((net_rule(n, clients.get(n.name, ())) for n in nets),
                            key=lambda r: r.bridge))

    def _container_changed(self, key: str) -> bool:
        """Refresh the multi-homed clients of the container of endpoint ``key`` (this host's
        only); True if they changed."""
        node, _, rest = key[len(store_keys.ENDPOINTS):].partition("/")
        container_id = rest.partition("/")[0]
        if node != self._cache.node or not container_id:
            return False
        new = vip_clients(self._cache.of_container(container_id))
        if new == self._clients.get(container_id, {}):
            return False
        if new:
            self._clients[container_id] = new
        else:
            self._clients.pop(container_id, None)
        return True

    def _all_clients(self) -> None:
        """Every multi-homed container's clients, from the cache (a full comparison)."""
        self._clients = {}
        for ep in self._cache.local_endpoints():
            if ep.container_id not in self._clients:
                found = vip_clients(self._cache.of_container(ep.container_id))
                if found:
                    self._clients[ep.container_id] = found

    def _publications(self, key: str) -> frozenset[Publication]:
        ep = self._cache.endpoint(key)
        if ep is None or ep.node != self._cache.node:
            return frozenset()
        return endpoint_publications(self._cache.network(ep.network), ep)

    def desired(self) -> Snapshot:
        """The whole table, from the cache: O(endpoints), for a refused delta only. With the
        per-endpoint parts it was made of, so that what is adopted as applied is exactly what
        was sent, even if the cache moves on while the kernel is being written."""
        parts = {ep.store_key: self._publications(ep.store_key)
                 for ep in self._cache.local_endpoints()}
        return self._snapshot(parts)

    async def desired_soon(self) -> Snapshot:
        """``desired``, yielding to the event loop every CHUNK endpoints (start-up, the
        periodic comparison): thousands of endpoints never hold up requests."""
        parts: dict[str, frozenset[Publication]] = {}
        for i, ep in enumerate(self._cache.local_endpoints()):
            if i % CHUNK == CHUNK - 1:
                await asyncio.sleep(0)
            # A change while we yield is queued for the next batch, whose delta starts from
            # what is recorded here: nothing is lost either way.
            parts[ep.store_key] = self._publications(ep.store_key)
        return self._snapshot(parts)

    def _snapshot(self, parts: dict[str, frozenset[Publication]]) -> Snapshot:
        self._all_clients()
        parts = {k: v for k, v in parts.items() if v}
        union = frozenset().union(*parts.values()) if parts else frozenset()
        return Snapshot(FirewallState(self._net_rules(), union).canonical(), parts)

    # -- reconciling -----------------------------------------------------------------------------

    async def reconcile_batch(self, keys: list[str]) -> dict[str, Exception | None]:
        if self._nets is None:
            await self.resync()
            return {}
        await self._apply(keys)
        if VERIFY in keys:
            await self._verify()
        return {}

    async def _apply(self, keys: list[str]) -> None:
        assert self._nets is not None
        old_nets = self._nets
        # (no short-circuit: every changed container's clients are refreshed)
        multi_homed = [self._container_changed(k[3:]) for k in keys if k.startswith("ep:")]
        nets_changed = any(k.startswith("net:") for k in keys) or any(multi_homed)
        new_nets = self._net_rules() if nets_changed else old_nets
        changed = {k[3:]: self._publications(k[3:]) for k in keys if k.startswith("ep:")}
        added: set[Publication] = set()
        removed: set[Publication] = set()
        for key, pubs in changed.items():
            old = self._pubs.get(key, frozenset())
            added |= pubs - old
            removed |= old - pubs
        delta = FirewallDelta(old_nets, new_nets, frozenset(added), frozenset(removed - added))
        first_bridge = not old_nets and bool(new_nets)
        sent: list[Snapshot] = []

        def full() -> FirewallState:
            sent.append(self.desired())
            return sent[-1].state

        try:
            in_step = await self._fw.change(delta, full)
        except Exception:
            self._nets = None  # the next batch (a retry) starts from the kernel's state
            raise
        if not in_step:
            self.repairs += 1
            self._adopt(sent[-1])
        else:
            self._nets = new_nets
            for key, pubs in changed.items():
                if pubs:
                    self._pubs[key] = pubs
                else:
                    self._pubs.pop(key, None)
        if first_bridge and self._on_bridges is not None:
            await self._on_bridges()

    async def resync(self) -> bool:
        """Make the kernel hold exactly the desired table; True if it had to change it."""
        want = await self.desired_soon()
        have = await self._fw.current()
        changed = have != want.state
        if changed:
            if have is not None:
                log.warning("firewall table differs from the desired state: replacing it")
            await self._fw.sync(want.state)
        self._adopt(want)
        if want.state.nets and self._on_bridges is not None:
            await self._on_bridges()
        return changed

    def _adopt(self, sent: Snapshot) -> None:
        """Adopt what was sent as applied (per endpoint, as the deltas need it)."""
        self._nets = sent.state.nets
        self._pubs = dict(sent.parts)

    async def _verify(self) -> None:
        """The periodic pass (queued as ``VERIFY``, so it never races a batch): repair the
        table if it drifted, and keep Docker's FORWARD exceptions in place."""
        if await self.resync():
            self.repairs += 1

"""Handing this host's empty address blocks back to the pool (``--block-release-after``).

A host claims a block of a spanning network's subnet when it needs addresses (ipam.hostblocks);
without this it would keep it forever, and a small pool would run out of blocks while most of
them hold nothing. Every ``interval`` the agent looks at the blocks it holds -- only its own:
the cost of a pass is O(this host's blocks), two reads each (the holder key and the bitmap),
whatever the size of the cluster -- and releases each block that has been seen empty (no
address in use but its reserved first one, which is never a bit of the bitmap) at every look
for ``after`` seconds, as Calico does after its grace period.

The release is one transaction that compares the block's bitmap(s) and holder key unchanged
(``plans.plan_block_release``), and every allocation into a block compares the holder key: so
of a release and an allocation racing on one block, only the first to commit succeeds, and an
address is never handed out of a block nobody holds. A borrowed address keeps its block (its
bit is set). The other hosts drop their route to the block when the deletion reaches them (the
overlay reconciler follows ``keys.host_block``).

A host keeps its lowest block of a subnet while it has borrowed addresses of that network: its
VXLAN endpoint address is that block's first address (dataplane/overlay's ``vtep_addresses``),
and the other hosts route the borrowed addresses to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from plexus.errors import PlexusError
from plexus.ipam.plans import plan_block_release
from plexus.model.drivers import traits
from plexus.model.types import IPNetwork
from plexus.state.cache import Cache
from plexus.store.base import Datastore

log = logging.getLogger("plexus.blocks")

Block = tuple[IPNetwork, IPNetwork]  # (subnet, block)


def interval(after: float) -> float:
    """How often to look: a few times per grace period, at most once a minute."""
    return max(0.5, min(after / 4, 60.0))


class BlockReleaser:
    def __init__(self, store: Datastore, cache: Cache, after: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._cache = cache
        self._after = after
        self._clock = clock
        self._empty_since: dict[Block, float] = {}
        self.released: list[Block] = []

    async def run_once(self) -> list[Block]:
        """One look at this host's blocks; the blocks released."""
        now = self._clock()
        held = self._cache.held_by(self._cache.node)
        self._empty_since = {b: t for b, t in self._empty_since.items() if b in held}
        done = []
        for subnet, block in held:
            try:
                if await self._look(subnet, block, now):
                    done.append((subnet, block))
            except PlexusError as exc:
                log.warning("block %s of %s: release failed: %s", block, subnet, exc.message)
        self.released += done
        return done

    async def _look(self, subnet: IPNetwork, block: IPNetwork, now: float) -> bool:
        plan = await plan_block_release(self._store, subnet, block, self._cache.node)
        if plan is None:  # in use, or no longer ours
            self._empty_since.pop((subnet, block), None)
            return False
        since = self._empty_since.setdefault((subnet, block), now)
        if now - since < self._after or self._holds_vtep(subnet, block):
            return False
        self._empty_since.pop((subnet, block), None)
        if not (await self._store.txn(plan.compares, plan.ops)).succeeded:
            return False  # an address was taken meanwhile: it is in use again
        log.info("released block %s of %s: no address in use for %.0f s", block, subnet,
                 self._after)
        return True

    def _holds_vtep(self, subnet: IPNetwork, block: IPNetwork) -> bool:
        """``block`` is this host's lowest of ``subnet`` (its VTEP address) and the host has
        borrowed addresses of that family on the subnet's network. Asked only of a block due
        for release: O(the networks + their loans), not per look."""
        node = self._cache.node
        if self._cache.blocks_of(subnet, node)[:1] != [block]:
            return False
        for net in self._cache.networks.values():
            if traits(net.driver).spans_hosts and any(s.cidr == subnet for s in net.subnets):
                return any(ip.version == subnet.version
                           for ep in self._cache.borrowed_on(net.name) if ep.node == node
                           for ip in ep.borrowed)
        return False

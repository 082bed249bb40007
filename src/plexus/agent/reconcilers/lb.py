"""Services: the frontends of every service (``lb.members``), kept in the kernel
(``ServiceKernel``, the nftables table of ``dataplane.nft.lb``) by changes of just the
frontends that differ.

Objects: ``lb:svc:STORE_KEY`` (a service was created, changed or removed), ``lb:ep:STORE_KEY``
(an endpoint of any host: its labels, state, addresses or named ports) and ``lb:verify`` (the
periodic pass). A batch re-renders only the services its objects touch — an endpoint's change
the services it backed or now backs, of its namespace and network — and hands the kernel one
``lb.model.Change``; UDP conntrack entries that point at a backend that left are flushed
(``forget_udp``), so a UDP client does not keep sending to a gone container. While no service
exists there is no table and no work at all.

If the kernel refuses a change (its table deleted by hand), or the periodic pass finds the table
gone or missing frontend keys (an element deleted by hand), everything is written again from
the cache.
"""

from __future__ import annotations

import logging

from plexus import gcpause
from plexus.dataplane.nft.lb_table import ServiceKernel
from plexus.errors import DataplaneError
from plexus.lb import members
from plexus.lb.members import Members
from plexus.lb.model import Frontend, Proto, diff
from plexus.model.types import IPAddress
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")
PREFIX = "lb:"
SERVICE = PREFIX + "svc:"
ENDPOINT = PREFIX + "ep:"
VERIFY = PREFIX + "verify"
Key = tuple[IPAddress, Proto, int]


class LbReconciler(Reconciler):
    name = "lb"
    batch = True
    batch_max = 1024
    prefixes = (PREFIX,)

    def __init__(self, cache: Cache, kernel: ServiceKernel) -> None:
        super().__init__()
        self._cache = cache
        self._kernel = kernel
        self._members = Members(cache)
        self._applied: dict[str, dict[Key, Frontend]] = {}  # service key -> its frontends
        self._active = False  # the table holds what _applied says
        self.repairs = 0

    async def reconcile_batch(self, keys: list[str]) -> dict[str, Exception | None]:
        if not self._cache.services:
            if self._active or VERIFY in keys:
                await self._kernel.remove()
            self._active = False
            self._applied = {}
            return {}
        if VERIFY in keys and self._active and not await self._kernel.intact():
            log.warning("the services table is gone or lacks elements: writing it again")
            self.repairs += 1
            self._active = False
        if not self._active:
            await self._everything()
            return {}
        affected: set[str] = set()
        for key in keys:
            if key.startswith(SERVICE):
                affected.add(key[len(SERVICE):])
                self._members.service(key[len(SERVICE):])
            elif key.startswith(ENDPOINT):
                affected |= self._members.endpoint(key[len(ENDPOINT):])
        await self._change(affected)
        return {}

    async def _change(self, services: set[str]) -> None:
        old: dict[Key, Frontend] = {}
        new: dict[Key, Frontend] = {}
        for key in sorted(services):
            old.update(self._applied.pop(key, {}))
            mine = self._render(key)
            if mine:
                self._applied[key] = mine
            new.update(mine)
        change = diff(old, new)
        if not change:
            return
        try:
            await self._kernel.change(change)
        except DataplaneError as e:
            log.warning("services change refused, writing the whole table: %s", e.message)
            self._active = False
            await self._everything()
        await self._forget_udp(old, new)  # the backends that left are gone either way

    def _render(self, key: str) -> dict[Key, Frontend]:
        svc = self._cache.services.get(key)
        if svc is None:
            return {}
        return {f.key: f for f in members.frontends(svc, self._members.of(key))}

    async def _everything(self) -> None:
        with gcpause.paused():  # 10,000 services: a million objects (``gcpause``)
            self._members.load()
            self._applied = {k: f for k in self._cache.services if (f := self._render(k))}
        await self._kernel.replace([f for fs in self._applied.values() for f in fs.values()])
        self._active = True
        # Every change queued until now is in what was just written.
        self.drop_queued()

    async def _forget_udp(self, old: dict[Key, Frontend], new: dict[Key, Frontend]) -> None:
        for key, before in old.items():
            if before.proto != "udp":
                continue
            after = new.get(key)
            gone = set(before.backends) - set(after.backends if after is not None else ())
            if gone:
                await self._kernel.forget_udp(before, sorted(gone))

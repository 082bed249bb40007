"""DNS records and listeners, from every host's networks and endpoints.

Objects are ``net:NAME`` and ``ep:STORE_KEY`` of every node (a container on another host of the
same network resolves too). The first batch loads the whole record table (and drops the rest of
what was queued until then, which the table already holds); every later batch is
one ``DnsChanges`` of just the objects it names, applied in place (and sent to the DNS worker
processes as that delta), so a change costs the same with 10 or 10,000 containers. The
listeners (one per gateway of each DNS-enabled network) are synchronised only when networks
changed, and retried (``dns:listeners``) until every address is bound.
"""

from __future__ import annotations

import logging

from plexus.dns import DnsChanges, DnsService
from plexus.errors import DataplaneError
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")
LISTENERS = "dns:listeners"


class DnsReconciler(Reconciler):
    name = "dns"
    batch = True

    def __init__(self, cache: Cache, dns: DnsService) -> None:
        super().__init__()
        self._cache = cache
        self._dns = dns
        self._loaded = False

    async def reconcile_batch(self, keys: list[str]) -> dict[str, Exception | None]:
        nets_changed = self._records(keys)
        if not (nets_changed or LISTENERS in keys):
            return {}
        errors = await self._dns.sync_listeners()
        if errors:
            return {LISTENERS: DataplaneError("; ".join(errors))}
        return {}

    def _records(self, keys: list[str]) -> bool:
        """Bring the records in step; True if networks changed (listeners follow them)."""
        cache = self._cache
        if not self._loaded:
            self._dns.load(cache.networks.values(), dict(cache.endpoints))
            self._loaded = True
            # The rest of the start-up queue (every endpoint of the cluster) is in the table
            # now: applying it again, 128 at a time, each sent to every worker, held the loop
            # for seconds at 50,000 endpoints (bench/cluster.py).
            self.drop_queued()
            return True
        nets = {k[4:]: cache.network(k[4:]) for k in keys if k.startswith("net:")}
        eps = {k[3:]: cache.endpoint(k[3:]) for k in keys if k.startswith("ep:")}
        if nets or eps:
            self._dns.apply(DnsChanges(networks=nets, endpoints=eps))
        return bool(nets)

"""DNS records and listeners, from every host's networks and endpoints.

Objects are ``net:NAME`` and ``ep:STORE_KEY`` of every node (a container on another host of the
same network resolves too). The first batch loads the whole record table (and drops the rest of
what was queued until then, which the table already holds); every later batch is
one ``DnsChanges`` of just the objects it names, applied in place (and sent to the DNS worker
processes as that delta), so a change costs the same with 10 or 10,000 containers. The
listeners (one per gateway of each DNS-enabled network) are synchronised only when networks
changed, and retried (``dns:listeners``) until every address is bound.

Services (``svc:STORE_KEY``) publish NAME, NAME.NAMESPACE and NAME.NAMESPACE.svc.DOMAIN (and
the other forms a container's name has) on their network: the VIPs, or for a headless service
the addresses of its ready endpoints, which follow endpoint changes (``lb.members``). They go
into the record table as endpoints of their own, keyed ``svc:STORE_KEY``, which publish names
only (``dns.names.SERVICE_KEY``: no PTR, never an address's holder).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from plexus.dns import DnsChanges, DnsService
from plexus.dns.names import SERVICE_KEY
from plexus.errors import DataplaneError
from plexus.lb.members import Members
from plexus.lb.spec import Service
from plexus.model.types import Endpoint, IPAddress
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")
LISTENERS = "dns:listeners"
SERVICE = SERVICE_KEY  # svc:STORE_KEY
BACKEND = "svcep:"  # svcep:STORE_KEY: an endpoint may have started or stopped serving


def service_record(svc: Service, addresses: Iterable[IPAddress]) -> Endpoint:
    """What a service publishes, as the record table takes it."""
    ips = tuple(ipaddress.ip_interface(a) for a in dict.fromkeys(addresses))
    return Endpoint(container_id=f"service:{svc.ref}", ifname="svc", network=svc.network,
                    node="", netns="", addresses=ips, name=svc.name,
                    aliases=(f"{svc.name}.{svc.namespace}.svc",), namespace=svc.namespace,
                    state="ready")


def _headless(svc: Service) -> bool:
    return svc.headless


class DnsReconciler(Reconciler):
    name = "dns"
    batch = True
    prefixes = ("net:", "ep:", SERVICE, BACKEND)

    def __init__(self, cache: Cache, dns: DnsService) -> None:
        super().__init__()
        self._cache = cache
        self._dns = dns
        self._loaded = False
        self._headless = Members(cache, _headless)

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
            self._headless.load()
            records = {SERVICE + k: self._published(k) for k in cache.services}
            self._dns.load(cache.networks.values(),
                           {**cache.endpoints, **{k: e for k, e in records.items() if e}})
            self._loaded = True
            # The rest of the start-up queue (every endpoint of the cluster) is in the table
            # now: applying it again, 128 at a time, each sent to every worker, held the loop
            # for seconds at 50,000 endpoints (bench/cluster.py).
            self.drop_queued()
            return True
        nets = {k[4:]: cache.network(k[4:]) for k in keys if k.startswith("net:")}
        eps: dict[str, Endpoint | None] = {
            k[3:]: cache.endpoint(k[3:]) for k in keys if k.startswith("ep:")}
        services = {k[len(SERVICE):] for k in keys if k.startswith(SERVICE)}
        for key in services:
            self._headless.service(key)
        if cache.services:
            backends = [k[len(BACKEND):] for k in keys if k.startswith(BACKEND)]
            for key in [*eps, *backends]:
                services |= self._headless.endpoint(key)
        eps.update((SERVICE + k, self._published(k)) for k in services)
        if nets or eps:
            self._dns.apply(DnsChanges(networks=nets, endpoints=eps))
        return bool(nets)

    def _published(self, key: str) -> Endpoint | None:
        svc = self._cache.services.get(key)
        if svc is None:
            return None
        if svc.headless:
            found = [a.ip for ep in self._headless.of(key) for a in ep.addresses]
            return service_record(svc, found)
        return service_record(svc, svc.vips)

"""Services as gauges, read from the agent's cache at scrape time: each service's endpoints
(those its selector picks, on any host, whatever their state) and the ready ones among them
(those the load balancer sends connections to: ``lb.members.serving``). A service whose ready
count is 0 answers its clients with a reset.

How long the load balancer takes to apply a change is
``plexus_reconcile_duration_seconds{reconciler="lb"}`` (one observation per batch of services
applied; ``observe.agent``), and the tables it had to put back are counted in
``plexus_reconcile_drift_corrected_total{reconciler="lb"}``.

Labels: a service's namespace and name, and its network: bounded by the services stored,
never by containers. Every agent reports every service (services are cluster-wide).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from plexus.lb.members import selected, serving
from plexus.lb.spec import Service
from plexus.model.types import Endpoint
from plexus.state.cache import Cache


def ready(cache: Cache, key: str, svc: Service) -> list[Endpoint]:
    """The endpoints of the service at store key ``key`` that connections are sent to."""
    return [ep for ep in selected(cache, svc) if serving(cache, key, svc, ep)]


class ServiceCollector:
    """``plexus_services``, ``plexus_service_endpoints``, ``plexus_service_endpoints_ready``."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "service", "network"]
        count = GaugeMetricFamily("plexus_services", "Services, by network.",
                                  labels=["network"])
        total = GaugeMetricFamily(
            "plexus_service_endpoints",
            "Endpoints a service's selector picks, on every host, ready or not.", labels=labels)
        up = GaugeMetricFamily(
            "plexus_service_endpoints_ready",
            "Endpoints a service sends connections to (ready, running, passing its readiness "
            "check); 0: its clients are refused.", labels=labels)
        per_network: dict[str, int] = {}
        for key, svc in sorted(self.cache.services.items()):
            per_network[svc.network] = per_network.get(svc.network, 0) + 1
            picked = selected(self.cache, svc)
            at = [svc.namespace, svc.name, svc.network]
            total.add_metric(at, len(picked))
            up.add_metric(at, sum(1 for ep in picked if serving(self.cache, key, svc, ep)))
        for network, n in sorted(per_network.items()):
            count.add_metric([network], n)
        yield from (count, total, up)

"""The agent's own work: reconcile durations and drift corrected per reconciler, and the
latency of every front door's requests and datastore round trip (``timing.Timings`` kept by
``http`` and ``store``).

Labels: reconciler names, HTTP routes (the templates, ``/v1/containers/{name}``, never the
path), CNI commands, Docker plugin calls, datastore engines and operations: all fixed by code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from plexus.observe.timing import Timings, histogram_family
from plexus.state.work import Reconciler


@dataclass
class RequestTimings:
    """What front doors and the store observe, one duration per request."""

    api: Timings = field(default_factory=lambda: Timings(("method", "route", "code")))
    cni: Timings = field(default_factory=lambda: Timings(("command", "result")))
    docker: Timings = field(default_factory=lambda: Timings(("call", "code")))
    store: Timings = field(default_factory=lambda: Timings(("engine", "operation")))


class AgentCollector:
    """``plexus_reconcile_*``, ``plexus_{api,cni,docker}_request_duration_seconds``,
    ``plexus_datastore_*``."""

    def __init__(self, reconcilers: Callable[[], Sequence[Reconciler]],
                 timings: RequestTimings) -> None:
        self.reconcilers = reconcilers
        self.timings = timings

    def collect(self) -> Iterator[Metric]:
        yield from self._reconcilers()
        t = self.timings
        yield t.api.histogram_family("plexus_api_request_duration_seconds",
                                     "API requests (unix socket), by method, route and status.")
        yield t.cni.histogram_family("plexus_cni_request_duration_seconds",
                                     "CNI plugin calls, by command and result (ok, error).")
        yield t.docker.histogram_family("plexus_docker_request_duration_seconds",
                                        "Docker network and IPAM plugin calls, by call.")
        yield t.store.histogram_family("plexus_datastore_request_duration_seconds",
                                       "Datastore round trips, by engine and operation.")
        yield t.store.error_family("plexus_datastore_errors_total",
                                   "Datastore operations that failed, by engine and operation.")

    def _reconcilers(self) -> Iterator[Metric]:
        found = sorted(self.reconcilers(), key=lambda r: r.name)
        yield histogram_family(
            "plexus_reconcile_duration_seconds",
            "Time a reconciler took per object (or per batch of objects).", ["reconciler"],
            (((r.name,), r.durations.to_dict()) for r in found))
        objects = CounterMetricFamily("plexus_reconcile_objects_total",
                                      "Objects reconciled.", labels=["reconciler"])
        drift = CounterMetricFamily(
            "plexus_reconcile_drift_corrected_total",
            "Times the kernel had drifted from the desired state (a link, element or table "
            "changed or removed behind plexus's back) and the reconciler put it back.",
            labels=["reconciler"])
        errors = GaugeMetricFamily("plexus_reconcile_failing_objects",
                                   "Objects currently failing (retried with backoff).",
                                   labels=["reconciler"])
        for r in found:
            objects.add_metric([r.name], r.processed)
            drift.add_metric([r.name], r.drifted + int(getattr(r, "repairs", 0)))
            errors.add_metric([r.name], len(r.errors))
        yield from (objects, drift, errors)

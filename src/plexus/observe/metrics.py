"""The agent's metrics: one registry of collectors that read the agent's state at scrape time.

A scrape first refreshes the collectors that must ask something outside the loop's memory (the
kernel's link and nftables counters, the DNS workers' counters), all at once and each within
``REFRESH_TIMEOUT``; a source that fails or is slow is logged, counted in
``plexus_scrape_errors_total{source}`` and left out of this scrape, and the others are served.
Then the collectors run in the loop (they read the loop's own state, which another thread must
not walk while the loop changes it), and the text is formatted from what they returned on a
worker thread: with 1,000 containers formatting is more than half of a scrape's CPU, and the
loop serves API calls and DNS meanwhile. No multiprocess mode, no HTTP server thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from plexus.errors import PlexusError
from plexus.observe.agent import RequestTimings

log = logging.getLogger("plexus.observe")
REFRESH_TIMEOUT = 5.0  # seconds; below Prometheus's default scrape timeout (10 s)


class Source(Protocol):
    def collect(self) -> Iterator[Metric]: ...


@runtime_checkable
class Refreshing(Protocol):
    async def refresh(self) -> None: ...


class _Adapter(Collector):
    """A registry wants ``Collector`` subclasses; plexus's collectors are plain classes."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return self.source.collect()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.timings = RequestTimings()
        self._refreshing: dict[str, Refreshing] = {}
        self._stale: set[str] = set()  # sources whose refresh failed this scrape
        self.scrape_errors: Counter[str] = Counter()
        self.refresh_seconds: dict[str, float] = {}  # the last scrape's, per source
        self.registry.register(_Adapter(self))

    def add(self, name: str, source: Source) -> None:
        """``name`` labels the source's scrape errors."""
        self.registry.register(_Adapter(_Unless(self, name, source)))
        if isinstance(source, Refreshing):
            self._refreshing[name] = source

    async def render(self) -> bytes:
        names = list(self._refreshing)
        outcomes = await asyncio.gather(*(self._refresh(n) for n in names))
        self._stale = {n for n, ok in zip(names, outcomes, strict=True) if not ok}
        collected = _Collected(list(self.registry.collect()))
        return await asyncio.to_thread(generate_latest, collected)

    async def _refresh(self, name: str) -> bool:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await self._refreshing[name].refresh()
            return True
        except (PlexusError, OSError, TimeoutError) as exc:
            log.warning("metrics: reading %s failed: %s", name, getattr(exc, "message", exc))
            self.scrape_errors[name] += 1
            return False
        finally:
            self.refresh_seconds[name] = time.perf_counter() - started

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("plexus_scrape_errors_total",
                                     "Scrapes that left a source out (it failed or was slow).",
                                     labels=["source"])
        for name in sorted(self._refreshing):
            family.add_metric([name], self.scrape_errors[name])
        took = GaugeMetricFamily("plexus_scrape_source_duration_seconds",
                                 "How long reading each source took in the last scrape "
                                 "(they are read at once).", labels=["source"])
        for name, seconds in sorted(self.refresh_seconds.items()):
            took.add_metric([name], seconds)
        yield from (family, took)


class _Collected(CollectorRegistry):
    """Families already collected, for ``generate_latest`` on another thread."""

    def __init__(self, families: list[Metric]) -> None:
        super().__init__(auto_describe=False)
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class _Unless:
    """A source's families, unless its refresh failed in this scrape (stale numbers would
    pass for fresh ones)."""

    def __init__(self, metrics: Metrics, name: str, source: Source) -> None:
        self.metrics, self.name, self.source = metrics, name, source

    def collect(self) -> Iterator[Metric]:
        if self.name not in self.metrics._stale:
            yield from self.source.collect()

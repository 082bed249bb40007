"""The agent's metrics: one registry of collectors that read the agent's state at scrape time.

A scrape first refreshes the collectors that must ask something outside the loop's memory (the
kernel's link and nftables counters, the DNS workers' counters), all at once and each within
``REFRESH_TIMEOUT``; a source that fails or is slow is logged, counted in
``plexus_scrape_errors_total{source}`` and left out of this scrape, and the others are served.
Then ``generate_latest`` renders everything in the loop (no thread, no multiprocess mode).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
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
        return generate_latest(self.registry)

    async def _refresh(self, name: str) -> bool:
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await self._refreshing[name].refresh()
            return True
        except (PlexusError, OSError, TimeoutError) as exc:
            log.warning("metrics: reading %s failed: %s", name, getattr(exc, "message", exc))
            self.scrape_errors[name] += 1
            return False

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("plexus_scrape_errors_total",
                                     "Scrapes that left a source out (it failed or was slow).",
                                     labels=["source"])
        for name in sorted(self._refreshing):
            family.add_metric([name], self.scrape_errors[name])
        yield family


class _Unless:
    """A source's families, unless its refresh failed in this scrape (stale numbers would
    pass for fresh ones)."""

    def __init__(self, metrics: Metrics, name: str, source: Source) -> None:
        self.metrics, self.name, self.source = metrics, name, source

    def collect(self) -> Iterator[Metric]:
        if self.name not in self.metrics._stale:
            yield from self.source.collect()

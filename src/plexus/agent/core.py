"""What every service of one agent shares: the datastore, the kernel seams, and a cache.

The cache mirrors the datastore's networks and this node's endpoints. The datastore stays the
truth; the cache exists so that rendering the firewall after a change does not re-read every key.
Services update it only after their transaction committed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

from plexus.dataplane.driver import Dataplane
from plexus.dataplane.nft.firewall import Firewall
from plexus.dataplane.nft.state import FirewallState, firewall_state
from plexus.dns import DnsService
from plexus.errors import PlexusError
from plexus.model import keys
from plexus.model.types import Container, Endpoint, IPNetwork, Network
from plexus.store.base import Datastore

log = logging.getLogger("plexus.agent")
DNS_COALESCE = 0.005  # seconds: how long a DNS rebuild waits for more changes

# Podman's default range (10.89.0.0/24 upwards), cut into /24s; a fixed ULA /48 for IPv6.
DEFAULT_POOL4: IPNetwork = ipaddress.ip_network("10.89.0.0/16")
DEFAULT_POOL6: IPNetwork = ipaddress.ip_network("fd89:7c00::/48")


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    socket: Path
    node: str
    store_url: str = ""
    pool4: IPNetwork = DEFAULT_POOL4
    pool4_prefix: int = 24
    pool6: IPNetwork = DEFAULT_POOL6
    pool6_prefix: int = 64
    reconcile_interval: float = 10.0
    docker_plugin_socket: Path | None = None  # None: do not serve the Docker plugin
    docker_api: Path | None = None  # dockerd's API socket, to learn container names
    dns: bool = True
    dns_domain: str = "plexus.internal"
    dns_ttl: int = 5
    dns_upstreams: tuple[str, ...] = ()  # empty: follow the host's /etc/resolv.conf
    dns_workers: int = 1
    txn_retries: int = 50


@dataclass
class Core:
    config: AgentConfig
    store: Datastore
    dataplane: Dataplane
    firewall: Firewall
    networks: dict[str, Network] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    fw_applied: FirewallState | None = None
    fw_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: bool = False
    dns: DnsService | None = None
    _dns_networks: tuple[Network, ...] = ()
    _dns_dirty: bool = False
    _dns_task: asyncio.Task[None] | None = None

    @property
    def node(self) -> str:
        return self.config.node

    async def load(self) -> None:
        """Fill the cache from the datastore."""
        nets, _ = await self.store.list(keys.NETWORKS)
        self.networks = {n.name: n for n in (Network.from_json(kv.value) for kv in nets)}
        eps, _ = await self.store.list(keys.endpoints(self.node))
        self.endpoints = {e.key: e for e in (Endpoint.from_json(kv.value) for kv in eps)}

    async def containers(self) -> list[Container]:
        kvs, _ = await self.store.list(keys.containers(self.node))
        return [Container.from_json(kv.value) for kv in kvs]

    def desired_firewall(self) -> FirewallState:
        live = [e for e in self.endpoints.values() if e.state == "ready"]
        return firewall_state(self.networks.values(), live)

    async def publish(self, full: bool = False) -> None:
        """Push the cache to what serves it: the firewall (element deltas normally, the whole
        table in one atomic batch at start-up or when asked) and the DNS records (an atomic
        swap; listeners follow the networks' gateways)."""
        await self._publish_firewall(full)
        self.publish_dns_soon()

    def publish_dns_soon(self) -> None:
        """Rebuild the DNS records shortly, off the request's path. Rebuilding costs ~40 ms per
        1,000 containers; a burst of changes (parallel CNI ADDs) is folded into one rebuild."""
        if self.dns is None:
            return
        self._dns_dirty = True
        if self._dns_task is None or self._dns_task.done():
            self._dns_task = asyncio.create_task(self._flush_dns())

    async def _flush_dns(self) -> None:
        await asyncio.sleep(DNS_COALESCE)
        while self._dns_dirty:
            self._dns_dirty = False
            try:
                await self.publish_dns()
            except PlexusError as exc:
                log.error("dns update failed: %s", exc)

    async def publish_dns(self, resync: bool = False) -> list[str]:
        """Swap in fresh records; sync listeners when the networks changed (or ``resync``: the
        reconciler's level-triggered retry). Returns the listener errors."""
        if self.dns is None:
            return []
        self.dns.update(self.networks.values(), self.endpoints.values())
        networks = tuple(sorted(self.networks.values(), key=lambda n: n.name))
        if networks == self._dns_networks and not resync:
            return []
        errors = await self.dns.sync_listeners()
        if errors:
            log.warning("dns listeners: %s", "; ".join(errors))
        else:
            self._dns_networks = networks
        return errors

    async def _publish_firewall(self, full: bool) -> None:
        async with self.fw_lock:
            desired = self.desired_firewall()
            if full or self.fw_applied is None:
                await self.firewall.sync(desired)
            elif desired != self.fw_applied:
                await self.firewall.update(self.fw_applied, desired)
            self.fw_applied = desired

    def endpoints_on(self, network: str) -> list[Endpoint]:
        return [e for e in self.endpoints.values() if e.network == network]

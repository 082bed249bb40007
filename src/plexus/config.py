"""The agent's configuration: what `plexus agent` was started with."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from plexus.model.types import IPNetwork

# Podman's default range (10.89.0.0/24 upwards), cut into /24s; a fixed ULA /48 for IPv6.
DEFAULT_POOL4: IPNetwork = ipaddress.ip_network("10.89.0.0/16")
DEFAULT_POOL6: IPNetwork = ipaddress.ip_network("fd89:7c00::/48")
# The periodic full pass is a safety net (kernel events and the watch do the real work), so it
# runs rarely; it never blocks the event loop for long either way.
DEFAULT_RECONCILE_INTERVAL = 300.0


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    socket: Path
    node: str
    store_url: str = ""
    etcd_tls: tuple[str | None, str | None, str | None] = (None, None, None)  # CA, cert, key
    advertise_address: str = ""  # where other hosts reach this one ("": none found)
    agent_id: str = ""  # the state directory's id (services.hosts.agent_id)
    host_gc_after: float = 3600.0  # seconds without a live agent before a host is removed
    # seconds a block of this host with no address in use is kept before it goes back to the
    # pool (services.blocks); 0: never
    block_release_after: float = 300.0
    pool4: IPNetwork = DEFAULT_POOL4
    pool4_prefix: int = 24
    pool6: IPNetwork = DEFAULT_POOL6
    pool6_prefix: int = 64
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL
    docker_plugin_socket: Path | None = None  # None: do not serve the Docker plugin
    docker_api: Path | None = None  # dockerd's API socket, to learn container names
    dns: bool = True
    dns_domain: str = "plexus.internal"
    dns_ttl: int = 5
    dns_upstreams: tuple[str, ...] = ()  # empty: follow the host's /etc/resolv.conf
    dns_workers: int = 1
    txn_retries: int = 50
    flows: bool = True  # the flow log (observe.flows): conntrack events and logged drops
    flow_capacity: int = 10000  # records the ring holds
    flow_rate: int = 5000  # records made a second at most
    flow_export: Path | None = None  # JSON lines appended here too
    link_workers: int = 16  # endpoints whose links are programmed at once
    metrics_address: str = ""  # HOST:PORT of the Prometheus listener ("": none)
    service_cidrs: tuple[IPNetwork, ...] = ()  # empty: the stored range, or a default (lb.vips)

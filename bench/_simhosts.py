"""Simulated hosts of an overlay network, written straight into the datastore (bench/cluster.py).

A simulated host runs no agent: what its agent would have written is written for it, in the
project's own record and key formats, so that a real agent reading the store cannot tell it
from a host with an agent and CNI pods:

- registration: ``Host`` (``keys.host``, its underlay address) and its liveness key
  (``keys.host_lease``, holding an agent id) under a lease: one long lease for all of them,
  since nobody keeps theirs alive;
- per block it holds: the block's claim (``keys.host_block`` -> node);
- per container: its ``Endpoint`` (owner "cni", "ready", one address of the host's blocks, the
  subnet's gateway, a MAC, a CNI netns path), the address's owner record (``keys.ipam_addr``),
  and the bit in the address bitmap of its 256-address block (``keys.ipam_block``, written
  once per bitmap, with every host's bits), and the subnet's cursor.

Addresses are handed out as ``claim_in_host_blocks`` does: the block's first address (the
holder's VTEP address), the subnet's gateway and its network and broadcast addresses are never
an endpoint's. Underlay addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range):
nothing is ever sent to them, the agent only writes them into FDB entries.

Writes go in transactions of at most ``TXN_OPS`` puts (etcd's ``--max-txn-ops`` is 128), a few
at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from plexus import __version__
from plexus.ipam import allocator, blocks
from plexus.model import keys
from plexus.model.types import Endpoint, Host, IPAddress, IPNetwork, Network, Subnet
from plexus.services.endpoints import random_mac
from plexus.store.base import Datastore, Put

TXN_OPS = 128
IN_FLIGHT = 8  # transactions at once
UNDERLAY = ipaddress.ip_network("198.18.0.0/15")
LEASE_TTL = 3600  # seconds: longer than any run


def node_name(i: int) -> str:
    return f"sim{i:05}"


def underlay(i: int) -> IPAddress:
    return UNDERLAY.network_address + 1 + i


@dataclass
class SimHost:
    """One simulated host: its blocks and how many containers it has so far."""

    index: int
    blocks: list[IPNetwork] = field(default_factory=list)
    containers: int = 0

    @property
    def name(self) -> str:
        return node_name(self.index)


@dataclass
class Cluster:
    """What has been written so far for one overlay network: hosts, blocks, bitmaps."""

    net: Network
    block_prefix: int
    lease: int = 0
    hosts: list[SimHost] = field(default_factory=list)
    bitmaps: dict[int, int] = field(default_factory=dict)  # 256-block start (int) -> bits
    next_block: int = 0

    @property
    def subnet(self) -> Subnet:
        return self.net.subnets[0]

    def usable(self, block: IPNetwork) -> Iterator[IPAddress]:
        """A block's addresses an endpoint may have, in order."""
        skip = allocator.unusable(self.subnet.cidr) | {block.network_address,
                                                         self.subnet.gateway}
        return (a for a in block if a not in skip)

    def claim_block(self) -> IPNetwork:
        size = 1 << (32 - self.block_prefix)
        start = self.subnet.cidr.network_address + self.next_block * size
        block = ipaddress.ip_network(f"{start}/{self.block_prefix}")
        if not block.subnet_of(self.subnet.cidr):  # type: ignore[arg-type]
            raise ValueError(f"subnet {self.subnet.cidr} has no block left")
        self.next_block += 1
        return block


def host_ops(cluster: Cluster, host: SimHost) -> list[Put]:
    """A host's registration: its record and its liveness key (under the shared lease)."""
    now = time.time()
    record = Host(host.name, str(underlay(host.index)), secrets.token_hex(8), __version__,
                  started=now, seen=now)
    return [Put(keys.host(host.name), record.to_json()),
            Put(keys.host_lease(host.name), record.agent_id, lease=cluster.lease)]


def _endpoint(cluster: Cluster, host: SimHost, address: IPAddress) -> Endpoint:
    cid = secrets.token_hex(32)
    subnet = cluster.subnet
    return Endpoint(
        container_id=cid, ifname="eth0", network=cluster.net.name, node=host.name,
        netns=f"/var/run/netns/cni-{cid[:8]}-{cid[8:12]}-{cid[12:16]}-{cid[16:20]}-{cid[20:32]}",
        addresses=(ipaddress.ip_interface(f"{address}/{subnet.cidr.prefixlen}"),),
        gateways=(subnet.gateway,) if subnet.gateway is not None else (),
        mac=random_mac(), name=f"pod-{host.index}-{host.containers}", namespace="default",
        state="ready", created=time.time(), owner="cni")


def container_ops(cluster: Cluster, host: SimHost,
                  count: int) -> tuple[list[Put], IPAddress | None]:
    """``count`` more containers on ``host``: endpoints, owner records, new blocks' claims;
    and the last address handed out. The bitmaps are only updated in ``cluster``
    (``bitmap_ops`` writes them)."""
    ops: list[Put] = []
    held = (a for b in host.blocks for a in cluster.usable(b))
    free: Iterator[IPAddress] = itertools.islice(held, host.containers, None)
    address: IPAddress | None = None
    for _ in range(count):
        address = next(free, None)
        if address is None:
            block = cluster.claim_block()
            host.blocks.append(block)
            ops.append(Put(keys.host_block(cluster.subnet.cidr, block), host.name))
            free = cluster.usable(block)
            address = next(free)
        ep = _endpoint(cluster, host, address)
        host.containers += 1
        ops += [Put(ep.store_key, ep.to_json()),
                Put(keys.ipam_addr(cluster.subnet.cidr, address), ep.store_key)]
        bitmap = blocks.block_of(cluster.subnet.cidr, address)
        start = int(bitmap.start)
        cluster.bitmaps[start] = cluster.bitmaps.get(start, 0) | 1 << bitmap.offset(address)
    return ops, address


def bitmap_ops(cluster: Cluster, last: IPAddress | None) -> list[Put]:
    cidr = cluster.subnet.cidr
    ops = [Put(keys.ipam_block(cidr, ipaddress.ip_address(start)), blocks.encode(bits))
           for start, bits in sorted(cluster.bitmaps.items())]
    if last is not None:
        ops.append(Put(keys.ipam_cursor(cidr), str(last)))
    return ops


async def write(store: Datastore, ops: Sequence[Put]) -> int:
    """``ops`` in transactions of ``TXN_OPS``, ``IN_FLIGHT`` at a time; the transactions."""
    chunks = [ops[i:i + TXN_OPS] for i in range(0, len(ops), TXN_OPS)]
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(chunk: Sequence[Put]) -> None:
        async with gate:
            if not (await store.txn([], list(chunk))).succeeded:
                raise RuntimeError("a transaction of plain puts failed")

    await asyncio.gather(*(one(c) for c in chunks))
    return len(chunks)


async def grow(store: Datastore, cluster: Cluster, hosts: int, containers: int) -> int:
    """Bring the cluster to ``hosts`` simulated hosts with ``containers`` each (never fewer
    than it has); the number of keys written."""
    if not cluster.lease:
        cluster.lease = await store.grant_lease(LEASE_TTL)
    ops: list[Put] = []
    for i in range(len(cluster.hosts), hosts):
        host = SimHost(i)
        cluster.hosts.append(host)
        ops += host_ops(cluster, host)
    last: IPAddress | None = None
    for host in cluster.hosts:
        if containers > host.containers:
            made, last = container_ops(cluster, host, containers - host.containers)
            ops += made
    ops += bitmap_ops(cluster, last)
    await write(store, ops)
    return len(ops)

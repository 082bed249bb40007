"""Bring a datastore written by an older plexus to the current key layout (``keys.LAYOUT``).

Layout 1 (plexus 0.1) had no address blocks, port claims without the host address
(``{"endpoint": KEY}`` per port) and Docker's pools under ``/plexus/docker/``. Layout 2 builds
the block bitmaps from the address claims, turns each port claim into the host-address map the
endpoint's own mappings give, and moves the pools. It runs once, in one transaction, before the
agent reads anything; a store with no keys at all is simply stamped.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import defaultdict

from plexus.ipam import blocks
from plexus.model import keys
from plexus.model.types import Endpoint
from plexus.store.base import Compare, Datastore, Delete, KeyValue, Op, Put

log = logging.getLogger("plexus.agent")
OLD_POOLS, OLD_REFUSED = "/plexus/docker/pools/", "/plexus/docker/refused/"


async def migrate(store: Datastore) -> None:
    if await store.get(keys.LAYOUT) is not None:
        return
    kvs, _ = await store.list(keys.ROOT)
    ops = [*_blocks(kvs), *_ports(kvs), *_pools(kvs), Put(keys.LAYOUT, keys.LAYOUT_VERSION)]
    # Only if nobody wrote meanwhile (another agent migrating the same store): then it is done.
    guard = [Compare.absent(keys.LAYOUT)]
    result = await store.txn(guard, ops)
    if result.succeeded and len(ops) > 1:
        log.info("datastore migrated to layout %s (%d writes)", keys.LAYOUT_VERSION, len(ops) - 1)


def _blocks(kvs: list[KeyValue]) -> list[Op]:
    bits: dict[str, int] = defaultdict(int)
    for kv in kvs:
        if not kv.key.startswith(keys.IPAM):
            continue
        segment, _, address = kv.key[len(keys.IPAM):].partition("/")
        subnet = ipaddress.ip_network(keys.segment_cidr(segment))
        ip = ipaddress.ip_address(address)
        block = blocks.block_of(subnet, ip)
        bits[keys.ipam_block(subnet, block.start)] |= 1 << block.offset(ip)
    return [Put(key, blocks.encode(b)) for key, b in bits.items()]


def _ports(kvs: list[KeyValue]) -> list[Op]:
    endpoints = {kv.key: Endpoint.from_json(kv.value) for kv in kvs
                 if kv.key.startswith(keys.ENDPOINTS)}
    ops: list[Op] = []
    for kv in kvs:
        if not kv.key.startswith(keys.PORTS) or '"endpoint"' not in kv.value:
            continue
        owner = str(json.loads(kv.value).get("endpoint", ""))
        protocol, port = kv.key.rsplit("/", 2)[-2:]
        ep = endpoints.get(owner)
        slots = {pm.host_slot for pm in ep.ports if pm.protocol == protocol
                 and any(h == int(port) for h, _ in pm.pairs())} if ep else set()
        held = {s: owner for s in slots}
        ops.append(Put(kv.key, json.dumps(held, sort_keys=True)) if held else Delete(kv.key))
    return ops


def _pools(kvs: list[KeyValue]) -> list[Op]:
    ops: list[Op] = []
    for kv in kvs:
        if kv.key.startswith(OLD_POOLS):
            pool = json.loads(kv.value)
            pid = f"{pool['cidr']}|{pool['sub_pool']}" if pool.get("sub_pool") else pool["cidr"]
            ops += [Delete(kv.key), Put(keys.pool(pid), kv.value)]
        elif kv.key.startswith(OLD_REFUSED):
            ops += [Delete(kv.key), Put(keys.POOLS_REFUSED + kv.key[len(OLD_REFUSED):], kv.value)]
        elif kv.key.startswith(keys.IPAM) and kv.value.startswith("docker:"):
            ops.append(Put(kv.key, keys.pool_claim(kv.value[len("docker:"):])))
    return ops

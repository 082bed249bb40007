"""A datastore written by plexus 0.1 (layout 1) is brought to layout 2 once, in one transaction."""

from __future__ import annotations

import ipaddress
import json

from plexus.agent.migrate import migrate
from plexus.ipam import blocks
from plexus.model import keys, parse
from plexus.model.types import Endpoint
from plexus.store import MemoryStore


async def test_layout_1_gets_blocks_port_maps_and_pools() -> None:
    store = MemoryStore()
    ep = Endpoint(container_id="a", ifname="eth0", network="n", node="h", netns="/x",
                  addresses=(ipaddress.ip_interface("10.8.0.5/24"),),
                  ports=(parse.port_mapping("127.0.0.1:8080:80"),))
    await store.put(ep.store_key, ep.to_json())
    await store.put("/plexus/ipam/10.8.0.0_24/10.8.0.5", ep.store_key)
    await store.put("/plexus/ipam/10.8.0.0_24/10.8.0.9", "docker:10.8.0.0/24")
    await store.put("/plexus/ports/h/tcp/8080", json.dumps({"endpoint": ep.store_key}))
    await store.put("/plexus/docker/pools/10.8.0.0_24", json.dumps({"cidr": "10.8.0.0/24"}))
    await migrate(store)
    bits = await store.get(keys.ipam_block("10.8.0.0/24", "10.8.0.0"))
    assert bits is not None and blocks.decode(bits.value) == (1 << 5) | (1 << 9)
    port = await store.get(keys.port("h", "tcp", 8080))
    assert port is not None and json.loads(port.value) == {"127.0.0.1": ep.store_key}
    assert await store.get(keys.pool("10.8.0.0/24")) is not None
    assert await store.get("/plexus/docker/pools/10.8.0.0_24") is None
    docker = await store.get("/plexus/ipam/10.8.0.0_24/10.8.0.9")
    assert docker is not None and docker.value == keys.pool_claim("10.8.0.0/24")
    revision = await store.revision()
    await migrate(store)  # once only
    assert await store.revision() == revision


async def test_an_empty_store_is_only_stamped() -> None:
    store = MemoryStore()
    await migrate(store)
    kvs, _ = await store.list(keys.ROOT)
    assert [(kv.key, kv.value) for kv in kvs] == [(keys.LAYOUT, keys.LAYOUT_VERSION)]

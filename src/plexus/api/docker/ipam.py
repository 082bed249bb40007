"""Docker's remote IPAM driver (libnetwork docs/ipam.md), translated to plexus's IPAM pools.

All the state and the rules live in ``plexus.services.pools``; this module only reads Docker's
request fields and shapes the answers.
"""

from __future__ import annotations

from typing import Any

from plexus.errors import InvalidArgument
from plexus.services.pools import PoolService

GATEWAY_REQUEST = "com.docker.network.gateway"


class DockerIpam:
    def __init__(self, pools: PoolService) -> None:
        self.pools = pools

    async def request_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        if not body.get("AddressSpace"):
            raise InvalidArgument("AddressSpace", "", "required")
        pool = await self.pools.request(
            str(body.get("Pool") or ""), str(body.get("SubPool") or ""), bool(body.get("V6"))
        )
        return {"PoolID": pool.id, "Pool": pool.cidr, "Data": {}}

    async def release_pool(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.pools.release(str(body.get("PoolID", "")))
        return {}

    async def request_address(self, body: dict[str, Any]) -> dict[str, Any]:
        pid, want = str(body.get("PoolID", "")), str(body.get("Address") or "")
        options = body.get("Options") or {}
        if options.get("RequestAddressType") == GATEWAY_REQUEST:
            address = await self.pools.gateway(pid, want)
        else:
            address = await self.pools.address(pid, want)
        return {"Address": str(address), "Data": {}}

    async def release_address(self, body: dict[str, Any]) -> dict[str, Any]:
        address = str(body.get("Address", "")).split("/")[0]
        await self.pools.release_address(str(body.get("PoolID", "")), address)
        return {}

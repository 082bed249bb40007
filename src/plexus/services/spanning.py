"""Addresses of networks that span hosts come from the asking host's blocks, whichever front door
asks: an endpoint's attach (plexus, CNI) and Docker's IPAM pool alike. Other hosts route each
block to its holder, so an address taken anywhere else in the subnet would be unreachable."""

from __future__ import annotations

from plexus.ipam import hostblocks
from plexus.ipam.plans import NextFree, Plan, claim_in_host_blocks
from plexus.model.drivers import traits
from plexus.model.types import IPAddress, Network, Subnet
from plexus.services.context import Context


def spans_hosts(net: Network | None) -> bool:
    return net is not None and traits(net.driver).spans_hosts


def next_free(ctx: Context, net: Network) -> NextFree | None:
    """How the next free address of ``net`` is planned on this host: from the blocks it holds
    (claiming another when they are full) if ``net`` spans hosts; None: anywhere."""
    if not spans_hosts(net):
        return None
    cache, node = ctx.cache, ctx.node

    async def claim(subnet: Subnet, owner: str) -> Plan:
        prefix = hostblocks.block_prefix(net.block_size, subnet.version)
        return await claim_in_host_blocks(
            ctx.store, subnet, owner, node, cache.blocks_of(subnet.cidr, node),
            cache.blocks.get(subnet.cidr, {}).keys(), prefix)

    return claim


def in_own_blocks(ctx: Context, subnet: Subnet, address: IPAddress) -> bool:
    """Is ``address`` inside one of the blocks of ``subnet`` this host holds?"""
    return any(address in block for block in ctx.cache.blocks_of(subnet.cidr, ctx.node))

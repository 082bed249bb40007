"""Per-host address blocks of networks that span hosts (overlays): pure arithmetic.

A spanning network's subnet is cut into blocks (``--block-size``, default /26: 64 addresses).
A host claims a block when it needs addresses and has none free in the blocks it holds; every
address it hands out comes from its own blocks, so other hosts route one prefix per block to it
and the kernel state per host grows with hosts and blocks, not containers. The claim is one key
per block (``keys.host_block``) written with compare-and-swap in the same transaction as the
first address taken from it: two hosts racing for one block never both get it. A block with
no address in use goes back to the pool after a grace period (``services.blocks``); when a
host's blocks are full and none is free, it borrows an address of another host's block
(``plans.borrow``), which the other hosts route to it on its own.

IPv6 blocks hold as many addresses as IPv4 ones (/26 ↔ /122), as Calico's do.

A block's first address is its holder's VXLAN endpoint address (dataplane/overlay). An IPv6
block's last address is also kept from containers: it is the block's gateway on its holder's
bridge, and containers see their IPv6 address with the *block's* prefix (``interface``), so
that every other block is off-link for them and reached through their host, which routes it
(dataplane/drivers/overlay.py says why; IPv4 keeps the subnet's prefix and proxy ARP).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterator

from plexus.errors import InvalidArgument
from plexus.model.drivers import traits
from plexus.model.types import IPAddress, IPInterface, IPNetwork, Network, Subnet

DEFAULT_BLOCK_SIZE = 26  # an IPv4 prefix length
MAX_BLOCK_SCAN = 65536  # blocks one claim looks at before it gives up


def block_prefix(block_size: int, version: int) -> int:
    """The prefix length of a block of ``version`` for a network's ``--block-size``."""
    size = block_size or DEFAULT_BLOCK_SIZE
    return size if version == 4 else 128 - (32 - size)


def check_block_size(block_size: int, subnets: Collection[IPNetwork]) -> None:
    """InvalidArgument unless every subnet holds at least one block of at least 4 addresses."""
    if not 1 <= block_size <= 30:
        raise InvalidArgument("block-size", str(block_size), "an IPv4 prefix length, 1 to 30")
    for cidr in subnets:
        prefix = block_prefix(block_size, cidr.version)
        if prefix < cidr.prefixlen:
            raise InvalidArgument("block-size", str(block_size),
                                  f"a /{prefix} block does not fit in subnet {cidr}")


def check_gateway(subnet: Subnet, block_size: int) -> None:
    """InvalidArgument if the subnet's gateway (on every host's bridge) is an address some
    block's holder keeps for itself (``reserved``)."""
    if subnet.gateway is None:
        return
    prefix = block_prefix(block_size, subnet.version)
    block = ipaddress.ip_network(f"{subnet.gateway}/{prefix}", strict=False)
    if subnet.gateway in reserved(block):
        kept = "first or last" if subnet.version == 6 else "first"
        raise InvalidArgument("gateway", str(subnet.gateway),
                              f"the {kept} address of a /{prefix} block is kept for its host")


def blocks(subnet: IPNetwork, prefix: int) -> Iterator[IPNetwork]:
    """The blocks of ``subnet``, in address order."""
    return subnet.subnets(new_prefix=prefix)


def free_block(subnet: IPNetwork, prefix: int, taken: Collection[IPNetwork]) -> IPNetwork | None:
    """The first block of ``subnet`` nobody holds (``taken``), or None."""
    for i, block in enumerate(blocks(subnet, prefix)):
        if i >= MAX_BLOCK_SCAN:
            return None
        if block not in taken:
            return block
    return None


def reserved(block: IPNetwork) -> frozenset[IPAddress]:
    """A block's addresses that no container gets: its first (its holder's VXLAN endpoint
    address) and, in an IPv6 block, its last (the block's gateway)."""
    if block.version == 6:
        return frozenset({block.network_address, block_gateway(block)})
    return frozenset({block.network_address})


def block_gateway(block: IPNetwork) -> IPAddress:
    """The gateway of an IPv6 block: its last address, held by its holder's bridge with the
    block's prefix. Not the first (the VTEP address) nor the second (in block 0 that is the
    subnet's own gateway, which every host's bridge holds with the subnet's prefix)."""
    return block.broadcast_address


def per_block(net: Network, version: int) -> bool:
    """Whether ``net``'s addresses of ``version`` are on-link only within their block: IPv6
    on a network that spans hosts."""
    return version == 6 and traits(net.driver).spans_hosts


def block_of(net: Network, address: IPAddress) -> IPNetwork:
    """The block of ``net`` that ``address`` lies in."""
    prefix = block_prefix(net.block_size, address.version)
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def interface(net: Network, iface: IPInterface) -> IPInterface:
    """An endpoint's address (the subnet's prefix, as IPAM records it) as the container's
    interface holds it: with its block's prefix where ``per_block``, else unchanged."""
    if not per_block(net, iface.version):
        return iface
    return ipaddress.ip_interface(f"{iface.ip}/{block_of(net, iface.ip).prefixlen}")


def gateway(net: Network, subnet: Subnet, address: IPAddress) -> IPAddress | None:
    """The gateway of a container with ``address`` of ``subnet``: its block's where
    ``per_block``, else the subnet's (the same on every host's bridge)."""
    if per_block(net, subnet.version):
        return block_gateway(block_of(net, address))
    return subnet.gateway

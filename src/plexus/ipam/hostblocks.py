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
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

from plexus.errors import InvalidArgument
from plexus.model.types import IPNetwork

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

"""Pure block arithmetic: a subnet cut into blocks of ``BLOCK_SIZE`` addresses, each a bitmap.

An allocation reads the block of the cursor and finds a free bit in it; only when that block is
full does it read the next one. So the reads per allocation do not depend on how many addresses
are in use, and two allocators racing on one subnet collide on one block key (compare-and-swap),
never on a listing. Blocks are aligned to the subnet's start; a subnet smaller than a block is one
block. The bitmap is an int, stored as hex; bit ``i`` is the address ``start + i``.

(The per-host blocks of multi-host IPAM are a separate, coarser idea -- a host claiming a /26 of
an overlay's pool -- and can use these bitmaps inside each claimed range.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from plexus.ipam import allocator
from plexus.model.types import IPAddress, IPNetwork

BLOCK_SIZE = 256
# How many blocks one allocation may read before it gives up: 2^20 addresses.
MAX_BLOCK_SCAN = 4096


@dataclass(frozen=True, slots=True)
class Block:
    start: IPAddress
    size: int

    def offset(self, address: IPAddress) -> int:
        return int(address) - int(self.start)

    def address(self, offset: int) -> IPAddress:
        return ipaddress.ip_address(int(self.start) + offset)


def _size(subnet: IPNetwork) -> int:
    return min(BLOCK_SIZE, subnet.num_addresses)


def block_of(subnet: IPNetwork, address: IPAddress) -> Block:
    size = _size(subnet)
    base = int(subnet.network_address)
    start = base + (int(address) - base) // size * size
    return Block(ipaddress.ip_address(start), size)


def decode(value: str | None) -> int:
    return int(value, 16) if value else 0


def encode(bits: int) -> str:
    return format(bits, "x")


def scan(subnet: IPNetwork, pool: IPNetwork,
         cursor: IPAddress | None) -> Iterator[tuple[Block, int]]:
    """(block, first offset to look at) in allocation order: from just after ``cursor``,
    through the pool's blocks, wrapping, and back to the cursor's block from its start."""
    first = block_of(subnet, pool.network_address)
    last = block_of(subnet, pool.broadcast_address)
    size = first.size
    count = (int(last.start) - int(first.start)) // size + 1
    inside = cursor is not None and cursor in pool
    begin = block_of(subnet, cursor) if inside and cursor is not None else first
    index = (int(begin.start) - int(first.start)) // size
    offset = begin.offset(cursor) + 1 if inside and cursor is not None else 0
    for step in range(min(count + 1, MAX_BLOCK_SCAN)):
        at = first.start + ((index + step) % count) * size
        yield Block(at, size), (offset if step == 0 else 0)


def free_address(
    subnet: IPNetwork, pool: IPNetwork, block: Block, bits: int, offset: int,
    reserved: frozenset[IPAddress],
) -> IPAddress | None:
    """The first address of ``block`` from ``offset`` on that is free, in ``pool`` and usable."""
    unusable = allocator.unusable(subnet)
    lo = max(offset, block.offset(pool.network_address))
    hi = min(block.size - 1, block.offset(pool.broadcast_address))
    for i in range(lo, hi + 1):
        if bits >> i & 1:
            continue
        candidate = block.address(i)
        if candidate not in unusable and candidate not in reserved:
            return candidate
    return None

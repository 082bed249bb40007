"""Pure address arithmetic: which address or subnet comes next. No I/O, no store.

Allocation is sequential from a cursor (the last address handed out), wrapping around at the end
of the range, so a just-freed address is not handed straight back to the next container (a stale
ARP/ND entry or a conntrack entry of the old owner would otherwise hit the new one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from plexus.errors import Exhausted, InvalidArgument
from plexus.model.types import IPAddress, IPNetwork

# Upper bound on how far one allocation scans; a range larger than this is sampled from the
# cursor onwards and declared exhausted only after this many taken addresses in a row.
MAX_SCAN = 1 << 20


def first_host(net: IPNetwork) -> IPAddress:
    """The conventional gateway: the first usable address."""
    if net.num_addresses <= 2:
        return net.network_address
    return net.network_address + 1


def unusable(net: IPNetwork) -> set[IPAddress]:
    """Addresses of ``net`` no endpoint may have: the network address (IPv4: also broadcast;
    IPv6: it is the subnet-router anycast address)."""
    if net.num_addresses <= 2:  # /31 and /32 (and /127, /128): every address is a host
        return set()
    out: set[IPAddress] = {net.network_address}
    if net.version == 4:
        out.add(net.broadcast_address)
    return out


def next_free(
    subnet: IPNetwork,
    pool: IPNetwork,
    taken: Iterable[IPAddress],
    cursor: IPAddress | None,
) -> IPAddress:
    """The first address of ``pool`` after ``cursor`` (wrapping) that is neither taken nor
    unusable in ``subnet``. Raises Exhausted naming the pool."""
    blocked = set(taken) | unusable(subnet)
    first, last = int(pool.network_address), int(pool.broadcast_address)
    size = last - first + 1
    start = first if cursor is None or not (first <= int(cursor) <= last) else int(cursor) + 1
    cls = ipaddress.IPv4Address if pool.version == 4 else ipaddress.IPv6Address
    for step in range(min(size, MAX_SCAN)):
        candidate = cls(first + (start - first + step) % size)
        if candidate not in blocked:
            return candidate
    raise Exhausted(f"no free address left in {pool} (subnet {subnet})")


def check_static(subnet: IPNetwork, address: IPAddress, taken: Iterable[IPAddress]) -> None:
    if address not in subnet:
        raise InvalidArgument("ip", str(address), f"not in subnet {subnet}")
    if address in unusable(subnet):
        raise InvalidArgument("ip", str(address), f"reserved address of {subnet}")
    if address in set(taken):
        raise InvalidArgument("ip", str(address), "already in use")


def pick_subnet(pool: IPNetwork, prefixlen: int, avoid: Iterable[IPNetwork]) -> IPNetwork:
    """The first ``/prefixlen`` of ``pool`` that overlaps nothing in ``avoid``."""
    blocked = [n for n in avoid if n.version == pool.version]
    if prefixlen < pool.prefixlen:
        raise InvalidArgument("pool", str(pool), f"smaller than one /{prefixlen}")
    count = 1 << (prefixlen - pool.prefixlen)
    step = 1 << ((32 if pool.version == 4 else 128) - prefixlen)
    base = int(pool.network_address)
    cls = ipaddress.IPv4Network if pool.version == 4 else ipaddress.IPv6Network
    for i in range(min(count, MAX_SCAN)):
        candidate = cls((base + i * step, prefixlen))
        if not any(candidate.overlaps(b) for b in blocked):
            return candidate
    raise Exhausted(f"every /{prefixlen} of pool {pool} overlaps a network or a local route")

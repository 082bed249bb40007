"""Address allocation and release against the datastore, as plans.

A plan is the addresses chosen plus the compares and writes that claim (or release) them. The
caller folds it into the one transaction that also writes the endpoint, so an endpoint and its
addresses appear (or fail) together. Each address is two keys changed together: its owner record
(``keys.ipam_addr``) and its bit in the block bitmap (``keys.ipam_block``, see ``blocks``). Two
allocators that pick the same address collide on the block's compare and one of them plans again.

Reads per allocation: the cursor and one block (more only while blocks are full), whatever the
number of addresses in use.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace

from plexus.errors import Conflict, Exhausted, InvalidArgument
from plexus.ipam import allocator, blocks, hostblocks
from plexus.model import keys
from plexus.model.types import IPAddress, IPInterface, IPNetwork, Network, Subnet
from plexus.store.base import Compare, Datastore, Delete, KeyValue, Op, Put

Who = Callable[[str], str]
"""Names the holder of a claim (an endpoint's store key) for an error message."""


@dataclass
class Plan:
    addresses: list[IPInterface] = field(default_factory=list)
    compares: list[Compare] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    # Addresses taken from a block another host holds (``borrow``).
    borrowed: list[IPAddress] = field(default_factory=list)

    def extend(self, other: Plan) -> None:
        self.addresses += other.addresses
        self.compares += other.compares
        self.ops += other.ops
        self.borrowed += other.borrowed


def _interface(address: IPAddress, subnet: Subnet) -> IPInterface:
    return ipaddress.ip_interface(f"{address}/{subnet.cidr.prefixlen}")


def _set_bit(plan: Plan, subnet: Subnet, kv: KeyValue | None, address: IPAddress,
             owner: str) -> None:
    block = blocks.block_of(subnet.cidr, address)
    key = keys.ipam_block(subnet.cidr, block.start)
    bits = blocks.decode(kv.value if kv else None) | 1 << block.offset(address)
    addr_key = keys.ipam_addr(subnet.cidr, address)
    plan.compares += [Compare.unchanged(kv, key), Compare.absent(addr_key)]
    plan.ops += [Put(key, blocks.encode(bits)), Put(addr_key, owner)]
    plan.addresses.append(_interface(address, subnet))


async def claim_static(store: Datastore, net: Network, address: IPAddress, owner: str,
                       who: Who = str) -> Plan:
    subnet = next((s for s in net.subnets if address in s.cidr), None)
    if subnet is None:
        cidrs = ", ".join(str(s.cidr) for s in net.subnets) or "none"
        raise InvalidArgument("ip", str(address), f"not in network {net.name} (subnets: {cidrs})")
    return await claim_address(store, subnet, address, owner, who=who)


async def claim_address(store: Datastore, subnet: Subnet, address: IPAddress, owner: str,
                        reserved: frozenset[IPAddress] = frozenset(), who: Who = str) -> Plan:
    """A plan claiming exactly ``address`` of ``subnet``. Taken: Conflict naming the holder
    (``who(owner record)``), as a port clash does."""
    if address in allocator.unusable(subnet.cidr):
        raise InvalidArgument("ip", str(address), f"reserved address of {subnet.cidr}")
    if address == subnet.gateway or address in reserved:
        raise Conflict(f"address {address} is already in use by the gateway of {subnet.cidr}")
    holder = await store.get(keys.ipam_addr(subnet.cidr, address))
    if holder is not None:
        raise Conflict(f"address {address} is already in use by {who(holder.value)}")
    block = blocks.block_of(subnet.cidr, address)
    kv = await store.get(keys.ipam_block(subnet.cidr, block.start))
    plan = Plan()
    _set_bit(plan, subnet, kv, address, owner)
    return plan


async def claim_next(store: Datastore, subnet: Subnet, owner: str,
                     reserved: frozenset[IPAddress] = frozenset()) -> Plan:
    """A plan claiming the next free address of ``subnet``'s pool after the cursor."""
    cursor_key = keys.ipam_cursor(subnet.cidr)
    cursor_kv = await store.get(cursor_key)
    cursor = ipaddress.ip_address(cursor_kv.value) if cursor_kv else None
    avoid = reserved | ({subnet.gateway} if subnet.gateway is not None else set())
    for block, offset in blocks.scan(subnet.cidr, subnet.pool, cursor):
        kv = await store.get(keys.ipam_block(subnet.cidr, block.start))
        bits = blocks.decode(kv.value if kv else None)
        address = blocks.free_address(subnet.cidr, subnet.pool, block, bits, offset,
                                      frozenset(avoid))
        if address is not None:
            plan = Plan()
            _set_bit(plan, subnet, kv, address, owner)
            # The cursor is a hint (where to look first), so it needs no compare: racing
            # allocators are kept apart by the block's.
            plan.ops.append(Put(cursor_key, str(address)))
            return plan
    raise Exhausted(f"no free address left in {subnet.pool} (subnet {subnet.cidr})")


NextFree = Callable[[Subnet, str], Awaitable[Plan]]
"""Plans the next free address of a subnet for an owner (``claim_next`` unless a network's
addresses come from per-host blocks)."""


async def plan_allocation(store: Datastore, net: Network, owner: str,
                          static: Sequence[IPAddress] = (), who: Who = str,
                          next_free: NextFree | None = None) -> Plan:
    """One address per IP family the network has: the static one asked for, else the next."""
    plan = Plan()
    stray = [a for a in static if not net.subnets_of(a.version)]
    if stray:
        raise InvalidArgument("ip", str(stray[0]),
                              f"network {net.name} has no IPv{stray[0].version}")
    for version in (4, 6):
        subnets = net.subnets_of(version)
        wanted = [a for a in static if a.version == version]
        if len(wanted) > 1:
            raise InvalidArgument("ip", ",".join(map(str, wanted)), "one address per family")
        if wanted:
            plan.extend(await claim_static(store, net, wanted[0], owner, who))
        elif subnets:
            plan.extend(await _claim_first_free(store, net, subnets, owner, next_free))
    return plan


async def _claim_first_free(store: Datastore, net: Network, subnets: list[Subnet],
                            owner: str, next_free: NextFree | None) -> Plan:
    last: Exhausted | None = None
    for subnet in subnets:
        try:
            if next_free is not None:
                return await next_free(subnet, owner)
            return await claim_next(store, subnet, owner)
        except Exhausted as exc:
            last = exc
    assert last is not None
    raise Exhausted(f"network {net.name}: {last.message}")


async def plan_assigned(store: Datastore, net: Network, owner: str,
                        addresses: Sequence[IPInterface], pool_claims: str = "") -> Plan:
    """Addresses a pool already handed out (Docker passes them to CreateEndpoint): a claim
    whose value starts with ``pool_claims`` is accepted as it is (the pool keeps it); an
    unclaimed address is claimed for the endpoint; anyone else's is a conflict."""
    plan = Plan()
    for iface in addresses:
        subnet = next((s for s in net.subnets if iface.ip in s.cidr), None)
        if subnet is None:
            raise InvalidArgument("address", str(iface), f"not in network {net.name}")
        kv = await store.get(keys.ipam_addr(subnet.cidr, iface.ip))
        if kv is None:
            plan.extend(await claim_address(store, subnet, iface.ip, owner))
            continue
        if not (pool_claims and kv.value.startswith(pool_claims)):
            raise Conflict(f"address {iface.ip} is already in use by {kv.value}")
        plan.compares.append(Compare(kv.key, "value", "==", kv.value))
        plan.addresses.append(iface)
    return plan


async def plan_release(store: Datastore, addresses: Sequence[IPInterface], owner: str) -> Plan:
    """Release the addresses ``owner`` still holds; see ``plan_release_many``."""
    return await plan_release_many(store, [(a, owner) for a in addresses])


async def plan_release_many(store: Datastore,
                            held: Sequence[tuple[IPInterface, str]]) -> Plan:
    """Release each address its owner still holds (an address since given to someone else is
    left alone): owner records deleted, bits cleared, blocks that become empty deleted. Several
    owners at once, so that two addresses of one block are one write of the block."""
    plan = Plan()
    by_block: dict[str, list[tuple[IPInterface, KeyValue]]] = defaultdict(list)
    for iface, owner in held:
        kv = await store.get(keys.ipam_addr(iface.network, iface.ip))
        if kv is not None and kv.value == owner:
            block = blocks.block_of(iface.network, iface.ip)
            by_block[keys.ipam_block(iface.network, block.start)].append((iface, kv))
    for block_key, found in by_block.items():
        block_kv = await store.get(block_key)
        bits = blocks.decode(block_kv.value if block_kv else None)
        for iface, kv in found:
            bits &= ~(1 << blocks.block_of(iface.network, iface.ip).offset(iface.ip))
            plan.compares.append(Compare(kv.key, "value", "==", kv.value))
            plan.ops.append(Delete(kv.key))
        plan.compares.append(Compare.unchanged(block_kv, block_key))
        plan.ops.append(Put(block_key, blocks.encode(bits)) if bits else Delete(block_key))
    return plan


async def claim_in_host_blocks(store: Datastore, subnet: Subnet, owner: str, node: str,
                               held: Sequence[IPNetwork], taken: Collection[IPNetwork],
                               prefix: int) -> Plan:
    """The next free address of the blocks ``node`` holds in ``subnet`` (a spanning network's);
    if they are full, of a block nobody holds, claimed for ``node`` in the same plan; if none is
    left, an address borrowed from another host's block (``borrow``). ``taken`` is every host's
    blocks as the caller last saw them: a block claimed since is found by its key and skipped,
    so a stale view costs a read, not a failed transaction.

    Every plan compares the block's holder key, unchanged: the holder releasing an empty block
    (``plan_block_release``, which compares the bitmap) and an allocation into it are two
    transactions of which only the first to commit succeeds."""
    for block in held:
        plan = await _claim_in_block(store, subnet, owner, block, node)
        if plan is not None:
            return plan
    skip = set(taken) | set(held)
    for _ in range(hostblocks.MAX_BLOCK_SCAN):
        free = hostblocks.free_block(subnet.cidr, prefix, skip)
        if free is None:
            break
        skip.add(free)
        plan = await _claim_free_block(store, subnet, owner, node, free)
        if plan is not None:
            return plan
    if held:
        plan = await borrow(store, subnet, owner, node, sorted(set(taken) - set(held)))
        if plan is not None:
            return plan
    raise Exhausted(f"no free /{prefix} block left in {subnet.cidr} for host {node}"
                    + ("" if held else " (and it holds none, so it cannot borrow an address)"))


async def borrow(store: Datastore, subnet: Subnet, owner: str, node: str,
                 others: Sequence[IPNetwork]) -> Plan | None:
    """A free address of another host's block (Calico's borrowing), for when this host's
    blocks are full and the pool has no free block: the endpoint lives on ``node``, which the
    other hosts (and the block's holder) route that one address to (``Endpoint.borrowed``).
    A block found free meanwhile is claimed instead. Needs ``node`` to hold a block (its VXLAN
    endpoint address is a block's first address: dataplane/overlay)."""
    for block in others[:hostblocks.MAX_BLOCK_SCAN]:
        key = keys.host_block(subnet.cidr, block)
        kv = await store.get(key)
        if kv is None:
            plan = await _claim_free_block(store, subnet, owner, node, block)
        elif kv.value == node:
            plan = await _claim_in_block(store, subnet, owner, block, node)
        else:
            plan = await _claim_in_block(store, subnet, owner, block, kv.value)
            if plan is not None:
                plan.borrowed += [a.ip for a in plan.addresses]
        if plan is not None:
            return plan
    return None


async def _claim_in_block(store: Datastore, subnet: Subnet, owner: str, block: IPNetwork,
                          holder: str) -> Plan | None:
    """The next free address of ``block`` while ``holder`` still holds it; None if it is
    full or no longer ``holder``'s (a stale view)."""
    key = keys.host_block(subnet.cidr, block)
    kv = await store.get(key)
    if kv is None or kv.value != holder:
        return None
    try:
        plan = await claim_next(store, replace(subnet, ip_range=block), owner, _vtep(block))
    except Exhausted:
        return None
    plan.compares.append(Compare.unchanged(kv, key))
    return plan


async def _claim_free_block(store: Datastore, subnet: Subnet, owner: str, node: str,
                            block: IPNetwork) -> Plan | None:
    """``block`` for ``node`` with its first address; None if someone holds it or it has no
    usable address (the gateway's /30, say)."""
    key = keys.host_block(subnet.cidr, block)
    if await store.get(key) is not None:
        return None
    try:
        plan = await claim_next(store, replace(subnet, ip_range=block), owner, _vtep(block))
    except Exhausted:
        return None
    plan.compares.append(Compare.absent(key))
    plan.ops.append(Put(key, node))
    return plan


async def plan_block_release(store: Datastore, cidr: IPNetwork, block: IPNetwork,
                             node: str) -> Plan | None:
    """Hand ``node``'s ``block`` of subnet ``cidr`` back to the pool if no address of it is
    in use (its reserved first address never is: no bit), else None. The plan compares the
    bitmap(s) covering the block unchanged (absent if there is none) and the holder key: an
    allocation into the block that commits first makes it fail, and one that comes after
    finds the holder key gone (``_claim_in_block``). A bitmap shared with a neighbouring
    block that changed meanwhile fails it too: the caller tries again on its next pass."""
    key = keys.host_block(cidr, block)
    held = await store.get(key)
    if held is None or held.value != node:
        return None
    plan = Plan()
    for start in _bitmap_starts(cidr, block):
        bitmap_key = keys.ipam_block(cidr, start)
        kv = await store.get(bitmap_key)
        bitmap = blocks.Block(start, blocks.block_of(cidr, start).size)
        if _bits_in(blocks.decode(kv.value if kv else None), bitmap, block):
            return None
        plan.compares.append(Compare.unchanged(kv, bitmap_key))
    plan.compares.append(Compare.unchanged(held, key))
    plan.ops.append(Delete(key))
    return plan


def _bitmap_starts(cidr: IPNetwork, block: IPNetwork) -> list[IPAddress]:
    """The starts of the allocator's bitmaps (``blocks.BLOCK_SIZE`` addresses) that cover
    ``block``: one, unless a host block is larger than a bitmap."""
    first = blocks.block_of(cidr, block.network_address)
    count = max(1, block.num_addresses // first.size)
    return [first.address(i * first.size) for i in range(count)]


def _bits_in(bits: int, bitmap: blocks.Block, block: IPNetwork) -> bool:
    """Any bit of ``bitmap`` set for an address of ``block``."""
    lo = max(0, bitmap.offset(block.network_address))
    hi = min(bitmap.size - 1, bitmap.offset(block.broadcast_address))
    if hi < lo:
        return False
    return bool(bits >> lo & ((1 << (hi - lo + 1)) - 1))


def _vtep(block: IPNetwork) -> frozenset[IPAddress]:
    """A block's first address is its holder's VXLAN endpoint address (dataplane/overlay); an
    IPv6 block's last is its gateway (``hostblocks.reserved``)."""
    return hostblocks.reserved(block)

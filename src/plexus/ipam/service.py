"""Address allocation against the datastore.

An allocation is a *plan*: the addresses chosen plus the compares and writes that claim them. The
caller folds the plan into the one transaction that also writes the endpoint, so an endpoint and
its addresses appear (or fail) together. Two agents, or two requests of one agent, that pick the
same address collide on ``Compare.absent`` and one of them plans again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from plexus.errors import Exhausted, InvalidArgument
from plexus.ipam import allocator
from plexus.model import keys
from plexus.model.types import IPAddress, IPInterface, Network, Subnet
from plexus.store.base import Compare, Datastore, Op, Put


@dataclass
class Plan:
    addresses: list[IPInterface] = field(default_factory=list)
    compares: list[Compare] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)


async def _taken(store: Datastore, net: Network, subnet: Subnet) -> set[IPAddress]:
    kvs, _ = await store.list(keys.ipam_prefix(subnet.cidr))
    taken = {ipaddress.ip_address(kv.key.rsplit("/", 1)[1]) for kv in kvs}
    if subnet.gateway is not None:
        taken.add(subnet.gateway)
    return taken


async def _claim_static(
    store: Datastore, net: Network, address: IPAddress, owner: str, plan: Plan
) -> None:
    subnet = next((s for s in net.subnets if address in s.cidr), None)
    if subnet is None:
        cidrs = ", ".join(str(s.cidr) for s in net.subnets) or "none"
        raise InvalidArgument("ip", str(address), f"not in network {net.name} (subnets: {cidrs})")
    allocator.check_static(subnet.cidr, address, await _taken(store, net, subnet))
    key = keys.ipam_addr(subnet.cidr, address)
    plan.compares.append(Compare.absent(key))
    plan.ops.append(Put(key, owner))
    plan.addresses.append(ipaddress.ip_interface(f"{address}/{subnet.cidr.prefixlen}"))


async def _claim_next(
    store: Datastore, net: Network, subnets: list[Subnet], owner: str, plan: Plan
) -> None:
    last_error: Exhausted | None = None
    for subnet in subnets:
        cursor_key = keys.ipam_cursor(subnet.cidr)
        cursor_kv = await store.get(cursor_key)
        cursor = ipaddress.ip_address(cursor_kv.value) if cursor_kv else None
        try:
            address = allocator.next_free(
                subnet.cidr, subnet.pool, await _taken(store, net, subnet), cursor
            )
        except Exhausted as exc:
            last_error = exc
            continue
        key = keys.ipam_addr(subnet.cidr, address)
        plan.compares += [Compare.absent(key), Compare.unchanged(cursor_kv, cursor_key)]
        plan.ops += [Put(key, owner), Put(cursor_key, str(address))]
        plan.addresses.append(ipaddress.ip_interface(f"{address}/{subnet.cidr.prefixlen}"))
        return
    assert last_error is not None
    raise Exhausted(f"network {net.name}: {last_error.message}")


async def plan_allocation(
    store: Datastore, net: Network, owner: str, static: Sequence[IPAddress] = ()
) -> Plan:
    """One address per IP family the network has: the static one asked for, else the next."""
    plan = Plan()
    for version in (4, 6):
        subnets = net.subnets_of(version)
        if not subnets:
            continue
        wanted = [a for a in static if a.version == version]
        if len(wanted) > 1:
            raise InvalidArgument("ip", ",".join(map(str, wanted)), "one address per family")
        if wanted:
            await _claim_static(store, net, wanted[0], owner, plan)
        else:
            await _claim_next(store, net, subnets, owner, plan)
    stray = [a for a in static if not net.subnets_of(a.version)]
    if stray:
        raise InvalidArgument(
            "ip", str(stray[0]), f"network {net.name} has no IPv{stray[0].version}"
        )
    return plan


async def plan_assigned(
    store: Datastore, net: Network, owner: str, addresses: Sequence[IPInterface],
    foreign_prefix: str,
) -> Plan:
    """Addresses a front door's own IPAM already chose (Docker passes them to CreateEndpoint).
    A claim that front door's IPAM holds (value starting with ``foreign_prefix``) is accepted as
    it is; an unclaimed address is claimed for the endpoint; anyone else's is a conflict."""
    plan = Plan()
    for iface in addresses:
        if not any(iface.ip in s.cidr for s in net.subnets):
            raise InvalidArgument("address", str(iface), f"not in network {net.name}")
        key = keys.ipam_addr(iface.network, iface.ip)
        kv = await store.get(key)
        if kv is None:
            plan.compares.append(Compare.absent(key))
            plan.ops.append(Put(key, owner))
        elif foreign_prefix and kv.value.startswith(foreign_prefix):
            plan.compares.append(Compare(key, "value", "==", kv.value))
        else:
            raise InvalidArgument("address", str(iface), f"already in use by {kv.value}")
        plan.addresses.append(iface)
    return plan


def claim_keys(addresses: Sequence[IPInterface]) -> list[str]:
    return [keys.ipam_addr(a.network, a.ip) for a in addresses]

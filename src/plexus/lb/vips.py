"""The service range: where VIPs come from, and picking a free one. Pure.

One range per family for the whole cluster, stored once (``keys.SERVICE_RANGE``) so that every
host hands out VIPs from the same place. An agent started with ``--service-cidr`` writes it
(replacing a stored one: services keep the VIPs they have; new ones come from the new range);
otherwise the default below is chosen and stored when the first service of the cluster needs a
VIP, not when an agent starts: an agent that never serves reserves no addresses, and a network
created before the first service is avoided like the host's routes.

Default: the first of 10.96.0.0/16 .. 10.111.0.0/16, 172.30.0.0/16, 172.31.0.0/16 (Kubernetes'
own default is 10.96.0.0/12) that overlaps none of the host's addresses and routes, no network's
subnet and not the agent's IPv4 pool (if every one does, the first, with a warning); for IPv6
the first free of fd00:10:96::/112 .. fd00:10:111::/112. A service gets an IPv6 VIP only when
its network has an IPv6 subnet.

A VIP is claimed by its own key (``keys.service_ip``), written absent-only in the service's
transaction: two hosts creating services at once never get one VIP. The first address (the
network address) and, for IPv4, the last (broadcast) are never handed out.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Container, Iterable

from plexus.errors import InvalidArgument
from plexus.model.types import IPAddress, IPNetwork

CANDIDATES4: tuple[IPNetwork, ...] = (
    *(ipaddress.ip_network(f"10.{n}.0.0/16") for n in range(96, 112)),
    ipaddress.ip_network("172.30.0.0/16"), ipaddress.ip_network("172.31.0.0/16"))
CANDIDATES6: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(f"fd00:10:{n}::/112")
                                           for n in range(96, 112))
MIN_PREFIX = {4: 8, 6: 64}  # larger ranges than these are refused
MAX_PREFIX = {4: 30, 6: 126}


def parse(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``--service-cidr`` (repeatable, or a comma list): one range per family at most."""
    found: dict[int, IPNetwork] = {}
    for value in (v.strip() for text in values for v in text.split(",")):
        if not value:
            continue
        try:
            net = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise InvalidArgument("service-cidr", value, f"not a network: {exc}") from None
        if not MIN_PREFIX[net.version] <= net.prefixlen <= MAX_PREFIX[net.version]:
            raise InvalidArgument("service-cidr", value,
                                  f"expected a prefix length from /{MIN_PREFIX[net.version]} "
                                  f"to /{MAX_PREFIX[net.version]}")
        if net.version in found:
            raise InvalidArgument("service-cidr", value,
                                  f"one range per family; {found[net.version]} is IPv"
                                  f"{net.version} too")
        found[net.version] = net
    return tuple(found[v] for v in sorted(found))


def default(avoid: Iterable[IPNetwork]) -> tuple[tuple[IPNetwork, ...], list[IPNetwork]]:
    """The first candidate of each family that overlaps nothing in ``avoid``, and which of
    them overlap something anyway (every candidate did: a host with a route to all of 10/8
    still starts, with the first candidate and a warning, rather than refusing)."""
    taken = list(avoid)
    out, crowded = [], []
    for candidates in (CANDIDATES4, CANDIDATES6):
        free = next((c for c in candidates
                     if not any(c.version == t.version and c.overlaps(t) for t in taken)), None)
        if free is None:
            free = candidates[0]
            crowded.append(free)
        out.append(free)
    return tuple(out), crowded


def dumps(ranges: Iterable[IPNetwork]) -> str:
    return ",".join(str(r) for r in ranges)


def loads(text: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in text.split(",") if t)


def usable(net: IPNetwork, address: IPAddress) -> bool:
    if address not in net or address == net.network_address:
        return False
    return net.version == 6 or address != net.broadcast_address


def check(ranges: Iterable[IPNetwork], address: IPAddress) -> None:
    """``--ip``: inside the range of its family, and not its first or last address."""
    mine = [r for r in ranges if r.version == address.version]
    if not mine:
        raise InvalidArgument("ip", str(address), f"the service range has no IPv{address.version} "
                              "part (see plexus agent --service-cidr)")
    if not usable(mine[0], address):
        raise InvalidArgument("ip", str(address), f"outside the service range {mine[0]} (or its "
                              "first or last address)")


def pick(net: IPNetwork, taken: Container[IPAddress], rng: random.Random | None = None,
         ) -> IPAddress | None:
    """A free VIP of ``net``, probing from a random place (two hosts picking at once rarely
    pick the same one); None when every address is taken. At most one pass over the range."""
    size = net.num_addresses
    first = int(net.network_address)
    start = (rng or random).randrange(size)
    for i in range(size):
        candidate = ipaddress.ip_address(first + (start + i) % size)
        if usable(net, candidate) and candidate not in taken:
            return candidate
    return None

"""One network's records, and what each endpoint published on it, so that it can be taken back.

``NetRecords.add`` publishes an endpoint (its names in every form, PTR records, the empty
non-terminals above dotted names) and returns a ``Published`` that remembers all of it;
``NetRecords.remove`` takes back exactly that. Both cost O(names of that endpoint): nothing here
walks the other endpoints.

Order. Several endpoints may publish one owner name (a shared alias: round-robin) or hold one
address. Their entries are kept sorted by ``Published.order`` — (container name, key) — whatever
the order they arrived in, so that a table changed one endpoint at a time answers exactly like
one built from scratch (same addresses in the same base order, same PTR targets, same holder of
a duplicated address). Inserting is a bisect; the common case (a name of its own) is an append.

Empty non-terminals (``front.plexus.internal``, ``b.plexus.internal`` above an alias ``a.b``)
are shared by many endpoints, so they are reference-counted; the domain itself holds one
reference of the network's own.
"""

from __future__ import annotations

import bisect
import string
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

from plexus.dns.config import DnsSettings, Upstream, network_upstreams
from plexus.dns.wire import valid_name
from plexus.model.types import Endpoint, IPAddress, IPNetwork, Network

SERVICE_KEY = "svc:"  # the keys of services' records: names only, no PTR, no address holder
Kind = Literal["name", "alias", "id"]
Order = tuple[str, str]  # (container name, key): the order entries of one name are kept in
_HEX = frozenset(string.hexdigits)
_T = TypeVar("_T")
_K = TypeVar("_K")


class Published:
    """One endpoint's records on its network (a plain slots class: a table holds thousands and
    builds them in bulk at start-up)."""

    __slots__ = ("addresses", "container", "container_id", "ents", "holds", "key", "network",
                 "order", "owners", "target")

    def __init__(self, ep: Endpoint, key: str) -> None:
        self.network = ep.network
        self.key = ep.key  # Endpoint.key, shown by explain
        self.order: Order = (ep.name, key)
        self.container_id = ep.container_id
        self.container = ep.name or ep.container_id[:12]
        self.addresses = tuple(dict.fromkeys(a.ip for a in ep.addresses))
        self.owners: tuple[str, ...] = ()
        self.ents: tuple[str, ...] = ()
        self.target = ""  # what its PTR records point at ("" = none)
        # A service's VIP is no container's; a headless service's addresses are its
        # endpoints' own, whose PTR records and views they keep.
        self.holds = not key.startswith(SERVICE_KEY)


Pub = tuple[Published, str, Kind, str]  # endpoint, label, kind, form


def _pub_order(p: Pub) -> Order:
    return p[0].order


def _ep_order(p: Published) -> Order:
    return p.order


class NetRecords:
    """The records one network publishes, and how its queries are forwarded."""

    __slots__ = ("by_address", "ents", "forward", "names", "network", "reverse", "upstreams")

    def __init__(self, network: Network, settings: DnsSettings) -> None:
        self.names: dict[str, list[Pub]] = {}
        self.reverse: dict[IPAddress, list[Published]] = {}  # holders with a PTR target
        self.by_address: dict[IPAddress, list[Published]] = {}  # every holder
        self.ents: dict[str, int] = {settings.domain: 1} if settings.domain else {}
        self.configure(network, settings)

    def configure(self, network: Network, settings: DnsSettings) -> None:
        """Take a new value of the network. The records depend only on its name, which does not
        change, so nothing is re-published."""
        self.network = network
        self.forward = not network.internal
        self.upstreams: tuple[Upstream, ...] = network_upstreams(network) or settings.upstreams

    @property
    def subnets(self) -> tuple[IPNetwork, ...]:
        return tuple(s.cidr for s in self.network.subnets)

    def holder(self, ip: IPAddress) -> Published | None:
        """The endpoint an address belongs to (the last in order if several claim it)."""
        found = self.by_address.get(ip)
        return found[-1] if found else None

    def targets(self, ip: IPAddress) -> tuple[str, ...]:
        return tuple(p.target for p in self.reverse.get(ip, ()))

    # --- changing ----------------------------------------------------------------------------

    def add(self, ep: Endpoint, key: str, domain: str) -> Published:
        pub = Published(ep, key)
        netname = _valid(self.network.name.lower())
        namespace = _valid(ep.namespace.strip().lower())
        labels = list(_labels(ep))
        forms = list(_suffixes(netname, namespace, domain))
        owners: dict[str, None] = {}
        for label, kind in labels:
            for suffix, form in forms:
                owner = label + suffix
                if owner in owners or len(owner) > 253:
                    continue  # the same endpoint through a second label (an alias "web.shop")
                owners[owner] = None
                _insert(self.names.setdefault(owner, []), (pub, label, kind, form), pub.order,
                        _pub_order)
        pub.owners = tuple(owners)
        if domain:
            dotted = [label + sfx for label, _ in labels if "." in label for sfx, _ in forms]
            pub.ents = tuple(_ents(dotted, netname, namespace, domain))
            for ent in pub.ents:
                self.ents[ent] = self.ents.get(ent, 0) + 1
        primary = labels[0][0] if labels else ""
        target = ".".join(p for p in (primary, netname, domain) if p)
        pub.target = target if primary and len(target) <= 253 and pub.holds else ""
        for ip in pub.addresses if pub.holds else ():
            _insert(self.by_address.setdefault(ip, []), pub, pub.order, _ep_order)
            if pub.target:
                _insert(self.reverse.setdefault(ip, []), pub, pub.order, _ep_order)
        return pub

    def remove(self, pub: Published) -> None:
        for owner in pub.owners:
            _remove(self.names, owner, pub.order, _pub_order)
        for ent in pub.ents:
            left = self.ents[ent] - 1
            if left:
                self.ents[ent] = left
            else:
                del self.ents[ent]
        for ip in pub.addresses if pub.holds else ():
            _remove(self.by_address, ip, pub.order, _ep_order)
            if pub.target:
                _remove(self.reverse, ip, pub.order, _ep_order)


def _insert(entries: list[_T], item: _T, order: Order, key: Callable[[_T], Order]) -> None:
    if not entries or key(entries[-1]) < order:
        entries.append(item)
    else:
        entries.insert(bisect.bisect_left(entries, order, key=key), item)


def _remove(index: dict[_K, list[_T]], at: _K, order: Order, key: Callable[[_T], Order]) -> None:
    entries = index[at]
    i = bisect.bisect_left(entries, order, key=key)
    assert key(entries[i]) == order, f"{order} is not published under {at}"
    del entries[i]
    if not entries:
        del index[at]


# --- what an endpoint publishes --------------------------------------------------------------


def _valid(label: str) -> str:
    return label if valid_name(label) else ""


def _labels(ep: Endpoint) -> Iterator[tuple[str, Kind]]:
    seen: set[str] = set()
    candidates: list[tuple[str, Kind]] = [(ep.name, "name")]
    candidates += [(a, "alias") for a in ep.aliases]
    cid = ep.container_id.lower()
    if len(cid) > 12 and set(cid) <= _HEX:
        candidates.append((cid[:12], "id"))
    for raw, kind in candidates:
        label = raw.strip().rstrip(".").lower()
        if label and label not in seen and valid_name(label):
            seen.add(label)
            yield label, kind


def _suffixes(network: str, namespace: str, domain: str) -> Iterator[tuple[str, str]]:
    """(suffix, form) for every form a label is published in; "" is the bare label."""
    yield "", "LABEL"
    if network:
        yield "." + network, "LABEL.NETWORK"
    if domain:
        yield "." + domain, "LABEL.DOMAIN"
        if network:
            yield f".{network}.{domain}", "LABEL.NETWORK.DOMAIN"
    if namespace:
        yield "." + namespace, "LABEL.NAMESPACE"
        if domain:
            yield f".{namespace}.{domain}", "LABEL.NAMESPACE.DOMAIN"


def _ents(owners: list[str], network: str, namespace: str, domain: str) -> dict[str, None]:
    """Empty non-terminals under the domain: they answer NODATA, not NXDOMAIN (RFC 8020)."""
    found: dict[str, None] = {domain: None}
    for middle in (network, namespace):
        if middle:
            found[f"{middle}.{domain}"] = None
    suffix = "." + domain
    for owner in owners:
        if owner.endswith(suffix):
            parts = owner[: -len(suffix)].split(".")
            found.update((".".join(parts[i:]) + suffix, None) for i in range(1, len(parts)))
    return found

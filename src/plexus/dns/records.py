"""The record table: what the DNS server answers, built from networks and endpoints. Pure.

Names. An endpoint (a container's attachment to one network) publishes, on that network, each of
its labels — the container's name, each alias, the 12-character short ID of a hex container ID
(as Docker does) — in these forms (DOMAIN: ``DnsSettings.domain``, default ``plexus.internal``):

    LABEL                      web
    LABEL.NETWORK              web.frontend
    LABEL.DOMAIN               web.plexus.internal
    LABEL.NETWORK.DOMAIN       web.frontend.plexus.internal
    LABEL.NAMESPACE            web.shop                 (endpoints that carry a namespace:
    LABEL.NAMESPACE.DOMAIN     web.shop.plexus.internal  Kubernetes-style POD.NAMESPACE)

and a PTR record for each of its addresses, pointing at ``NAME.NETWORK.DOMAIN``. Several
endpoints publishing one name give all their addresses; the server rotates them per query.

Views. A query is answered from a *view*: the network of the listener it arrived on, plus —
when the source address belongs to a container on that network — every other network that
container is attached to (what aardvark-dns does, and what a container on two networks expects).
Only endpoints on networks of the view are visible: a name of a container that shares no
network with the asker does not resolve. When a name exists on several networks of the view, the
first one that has data of the asked type wins (the listener's network first, then by name),
so the address returned is one the asker can reach.

Outcomes, in order:
 1. a reverse name of a container address in the view: PTR; of another address inside a view
    network's subnet: NXDOMAIN (private reverse lookups do not leak upstream);
 2. a published name: its addresses, or NODATA (NOERROR, empty) for a type it has none of;
 3. a name under DOMAIN that is not published: NXDOMAIN (NODATA for an empty non-terminal such
    as ``frontend.plexus.internal``), with the zone's SOA so resolvers cache it for TTL seconds;
 4. anything else: forwarded to the view's upstreams — REFUSED when every network of the view
    is --internal, SERVFAIL when no upstream is configured.
"""

from __future__ import annotations

import ipaddress
import itertools
import string
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from plexus.dns.config import DnsSettings, Upstream, dns_enabled, network_upstreams
from plexus.dns.wire import (
    CLASS_ANY,
    CLASS_IN,
    QType,
    Rcode,
    qtype_name,
    qtype_value,
    rcode_name,
    reverse_pointer,
)
from plexus.dns.wire import valid_name as _valid_name
from plexus.errors import InvalidArgument, NotFound
from plexus.model.types import Endpoint, IPAddress, IPNetwork, Network

Outcome = Literal["answer", "nodata", "nxdomain", "forward", "refused", "servfail"]
_generations = itertools.count(1)
_HEX = frozenset(string.hexdigits)
_VERSIONS: dict[int, tuple[int, ...]] = {QType.A: (4,), QType.AAAA: (6,), QType.ANY: (4, 6)}


@dataclass(frozen=True, slots=True)
class Match:
    """One endpoint publishing one owner name on one network: the "why" of an answer."""

    name: str  # the owner name, e.g. "web.frontend.plexus.internal"
    network: str
    endpoint: str  # Endpoint.key
    container_id: str
    container: str  # the container's name (or short ID)
    label: str  # the name, alias or short ID the owner name is built from
    kind: Literal["name", "alias", "id"]
    form: str  # "LABEL", "LABEL.NETWORK", "LABEL.NAMESPACE.DOMAIN", ...
    addresses: tuple[IPAddress, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "network": self.network, "endpoint": self.endpoint,
            "container_id": self.container_id, "container": self.container, "label": self.label,
            "kind": self.kind, "form": self.form, "addresses": [str(a) for a in self.addresses],
        }


@dataclass(frozen=True, slots=True)
class Resolution:
    outcome: Outcome
    rcode: int
    reason: str
    addresses: tuple[IPAddress, ...] = ()  # A/AAAA data, in base (unrotated) order
    targets: tuple[str, ...] = ()  # PTR data
    zone: str = ""  # owner of the SOA in a negative answer ("" = no SOA)
    soa: bool = False  # answer the zone's SOA itself (SOA query at the apex)
    matches: tuple[Match, ...] = ()
    upstreams: tuple[Upstream, ...] = ()

    @property
    def local(self) -> bool:
        return self.outcome not in ("forward",)


@dataclass(eq=False, slots=True)
class View:
    """The networks a query is answered from (see the module docstring).

    ``wire_cache`` belongs to the server (ready-made responses keyed by the query bytes after the
    ID); it lives here so that it is dropped with the table it was computed from.
    """

    networks: tuple[str, ...]
    forward: bool
    upstreams: tuple[Upstream, ...]
    wire_cache: dict[bytes, Any] = field(default_factory=dict)

    @property
    def network(self) -> str:
        return self.networks[0]


@dataclass(frozen=True, slots=True)
class Explanation:
    """``plexus dns lookup NAME --network NET``: what would be answered, and why."""

    network: str
    client: str
    view: tuple[str, ...]
    name: str
    qtype: str
    resolution: Resolution
    response: tuple[str, ...] = ()  # records actually received, when ``lookup`` forwarded
    upstream: str = ""  # who answered a forwarded query
    error: str = ""

    @property
    def rcode(self) -> str:
        """The local answer's rcode; a forwarded name's comes from the upstream (``response``)."""
        return "" if self.resolution.outcome == "forward" else rcode_name(self.resolution.rcode)

    def to_dict(self) -> dict[str, Any]:
        r = self.resolution
        return {
            "network": self.network, "client": self.client, "view": list(self.view),
            "name": self.name, "type": self.qtype, "outcome": r.outcome, "rcode": self.rcode,
            "reason": r.reason, "addresses": [str(a) for a in r.addresses],
            "targets": list(r.targets), "matches": [m.to_dict() for m in r.matches],
            "upstreams": [str(u) for u in r.upstreams], "response": list(self.response),
            "upstream": self.upstream, "error": self.error,
        }

    def text(self) -> str:
        r = self.resolution
        lines = [f"{self.name} {self.qtype} on network {self.network}"
                 + (f" from {self.client}" if self.client else "")
                 + f": {r.outcome.upper()}"
                 + (f" ({self.rcode})" if self.rcode not in ("", r.outcome.upper()) else "")]
        lines += [f"  {a}" for a in r.addresses] + [f"  {t}." for t in r.targets]
        lines += [f"  {rec}" for rec in self.response]
        lines.append(f"why: {r.reason}")
        lines += [f"  matched {m.name} ({m.form}, {m.kind} {m.label!r}) -> container "
                  f"{m.container} on {m.network}: {', '.join(map(str, m.addresses)) or '-'}"
                  for m in r.matches]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)


class _Ep:
    """One endpoint as the table needs it (a plain slots class: tables have ~20 names per
    endpoint, and frozen dataclasses are slow to build)."""

    __slots__ = ("addresses", "container", "container_id", "key", "network")

    def __init__(self, ep: Endpoint, addresses: tuple[IPAddress, ...]) -> None:
        self.network = ep.network
        self.key = ep.key
        self.container_id = ep.container_id
        self.container = ep.name or ep.container_id[:12]
        self.addresses = addresses


_Pub = tuple[_Ep, str, Literal["name", "alias", "id"], str]  # endpoint, label, kind, form


def _matches(owner: str, pubs: Sequence[_Pub]) -> tuple[Match, ...]:
    return tuple(Match(owner, e.network, e.key, e.container_id, e.container, label, kind, form,
                       e.addresses) for e, label, kind, form in pubs)


@dataclass(slots=True)
class _NetRecords:
    network: Network
    forward: bool
    upstreams: tuple[Upstream, ...]
    names: dict[str, list[_Pub]] = field(default_factory=dict)
    reverse: dict[IPAddress, list[str]] = field(default_factory=dict)
    ents: set[str] = field(default_factory=set)
    by_address: dict[IPAddress, str] = field(default_factory=dict)  # address -> container_id

    @property
    def subnets(self) -> tuple[IPNetwork, ...]:
        return tuple(s.cidr for s in self.network.subnets)


class RecordTable:
    """Immutable once built; the server swaps a whole new table in on every change."""

    def __init__(self, settings: DnsSettings, nets: dict[str, _NetRecords],
                 memberships: dict[str, tuple[str, ...]], generation: int,
                 sources: tuple[tuple[Network, ...], tuple[Endpoint, ...]] = ((), ())) -> None:
        self.settings = settings
        self.generation = generation
        self.sources = sources  # what it was built from (worker processes rebuild it)
        self._nets = nets
        self._memberships = memberships  # container_id -> its networks, sorted
        self._views: dict[tuple[str, ...], View] = {}
        self._clients: dict[str, dict[str, View]] = {}

    # --- building ----------------------------------------------------------------------------

    @classmethod
    def build(cls, networks: Iterable[Network], endpoints: Iterable[Endpoint],
              settings: DnsSettings | None = None, generation: int | None = None) -> RecordTable:
        """From every network and every endpoint (all nodes: a container on another host of the
        same overlay network resolves too). Endpoints on unknown networks are ignored."""
        settings = settings or DnsSettings()
        networks, endpoints = tuple(networks), tuple(endpoints)
        nets = {n.name: _NetRecords(n, not n.internal, network_upstreams(n) or settings.upstreams)
                for n in networks}
        members: dict[str, set[str]] = defaultdict(set)
        for ep in sorted(endpoints, key=lambda e: (e.name, e.key)):
            net = nets.get(ep.network)
            if net is None or not ep.addresses:
                continue
            members[ep.container_id].add(ep.network)
            _publish(net, ep, settings.domain)
        for net in nets.values():
            if settings.domain:
                net.ents.add(settings.domain)
        memberships = {cid: tuple(sorted(ns)) for cid, ns in members.items()}
        gen = next(_generations) if generation is None else generation
        return cls(settings, nets, memberships, gen, (networks, endpoints))

    @classmethod
    def empty(cls, settings: DnsSettings | None = None) -> RecordTable:
        return cls.build((), (), settings)

    # --- reading -----------------------------------------------------------------------------

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(self._nets)

    def network(self, name: str) -> Network | None:
        net = self._nets.get(name)
        return None if net is None else net.network

    def listen_addresses(self) -> dict[str, tuple[IPAddress, ...]]:
        """Network -> the gateway addresses its DNS listeners belong on."""
        return {name: tuple(s.gateway for s in n.network.subnets if s.gateway is not None)
                for name, n in self._nets.items() if dns_enabled(n.network)}

    def record_count(self) -> int:
        return sum(len(n.names) + len(n.reverse) for n in self._nets.values())

    def upstreams(self) -> tuple[Upstream, ...]:
        """Every upstream any network may forward to."""
        ups = [u for n in self._nets.values() if n.forward for u in n.upstreams]
        return tuple(dict.fromkeys([*self.settings.upstreams, *ups]))

    def view(self, network: str, client: str | IPAddress | None = None) -> View:
        """The view of a query that arrived on ``network``'s listener from ``client``."""
        nets: tuple[str, ...] = (network,)
        if client is not None and network in self._nets:
            try:
                ip = ipaddress.ip_address(str(client).split("%", 1)[0])
            except ValueError:
                ip = None
            cid = None if ip is None else self._nets[network].by_address.get(ip)
            if cid is not None:
                others = tuple(n for n in self._memberships.get(cid, ()) if n != network)
                nets = (network, *others)
        return self._view(nets)

    def _view(self, nets: tuple[str, ...]) -> View:
        view = self._views.get(nets)
        if view is None:
            known = [self._nets[n] for n in nets if n in self._nets]
            forwarding = [n for n in known if n.forward]
            ups = forwarding[0].upstreams if forwarding else ()
            view = self._views[nets] = View(nets, bool(forwarding), ups)
        return view

    def views(self) -> list[View]:
        """Every view handed out so far (the server walks their caches for its counters)."""
        return list(self._views.values())

    def client_views(self, network: str) -> dict[str, View]:
        """Source address (text, as a socket reports it) -> view, for the containers on
        ``network`` that are attached to other networks too. Everyone else gets
        ``view(network)``. Computed once per table; the server's fast path uses it."""
        found = self._clients.get(network)
        if found is None:
            found = {}
            net = self._nets.get(network)
            for ip, cid in (net.by_address.items() if net else ()):
                if len(self._memberships.get(cid, ())) > 1:
                    found[str(ip)] = self.view(network, ip)
            self._clients[network] = found
        return found

    # --- answering ---------------------------------------------------------------------------

    def resolve(self, view: View, name: str, qtype: int, qclass: int = CLASS_IN,
                opaque: bool = False) -> Resolution:
        """The outcome for a lower-cased dotted ``name`` asked in ``view``."""
        if opaque or qclass not in (CLASS_IN, CLASS_ANY):
            return self._forward(view, "not an Internet-class name plexus can publish")
        nets = [self._nets[n] for n in view.networks if n in self._nets]
        if not nets:
            return Resolution("refused", Rcode.REFUSED, f"network {view.network} is not known")
        ip = reverse_pointer(name)
        if ip is not None:
            return self._reverse(view, nets, ip, qtype)
        present = [(n, _matches(name, n.names[name])) for n in nets if name in n.names]
        if present:
            return _answer(present, qtype, self._zone_of(name))
        zone = self._zone_of(name)
        if zone:
            return self._authoritative_miss(nets, name, qtype, zone)
        return self._forward(view, self._elsewhere(name, view) or
                             f"{name or '.'} is not a container name on {_nets_text(view)}")

    def _reverse(self, view: View, nets: Sequence[_NetRecords], ip: IPAddress,
                 qtype: int) -> Resolution:
        for net in nets:
            targets = net.reverse.get(ip)
            if targets:
                if qtype not in (QType.PTR, QType.ANY):
                    return Resolution("nodata", Rcode.NOERROR,
                                      f"{ip} is a container address; only PTR is published")
                return Resolution("answer", Rcode.NOERROR,
                                  f"{ip} is a container address on network {net.network.name}",
                                  targets=tuple(targets))
        inside = next((n for n in nets for s in n.subnets if ip in s), None)
        if inside is not None:
            return Resolution("nxdomain", Rcode.NXDOMAIN,
                              f"{ip} is inside network {inside.network.name}'s subnet but no "
                              "container has it (private reverse lookups are not forwarded)")
        return self._forward(view, f"{ip} is not an address of {_nets_text(view)}")

    def _authoritative_miss(self, nets: Sequence[_NetRecords], name: str, qtype: int,
                            zone: str) -> Resolution:
        if name == zone and qtype in (QType.SOA, QType.ANY):
            return Resolution("answer", Rcode.NOERROR, f"{zone} is plexus's zone", zone=zone,
                              soa=True)
        if any(name in n.ents for n in nets):
            return Resolution("nodata", Rcode.NOERROR,
                              f"{name} has names below it but no records of its own", zone=zone)
        why = self._elsewhere(name, View(tuple(n.network.name for n in nets), False, ()))
        return Resolution("nxdomain", Rcode.NXDOMAIN,
                          why or f"no container publishes {name} on {_nets_text_of(nets)}",
                          zone=zone)

    def _forward(self, view: View, why: str) -> Resolution:
        if not view.forward:
            return Resolution("refused", Rcode.REFUSED,
                              f"{why}; {_nets_text(view)} "
                              f"{'is' if len(view.networks) == 1 else 'are'} internal: "
                              "nothing is forwarded")
        if not view.upstreams:
            return Resolution("servfail", Rcode.SERVFAIL,
                              f"{why}; no upstream resolvers are configured")
        ups = ", ".join(map(str, view.upstreams))
        return Resolution("forward", Rcode.NOERROR, f"{why}; forwarded to {ups}",
                          upstreams=view.upstreams)

    def _zone_of(self, name: str) -> str:
        domain = self.settings.domain
        if domain and (name == domain or name.endswith("." + domain)):
            return domain
        return ""

    def _elsewhere(self, name: str, view: View) -> str:
        others = [n for n, net in self._nets.items()
                  if n not in view.networks and name in net.names]
        if not others:
            return ""
        return (f"{name} exists on network {', '.join(sorted(others))}, which "
                f"{'the asker is' if len(view.networks) > 1 else 'this query is'} not on")

    def explain(self, network: str, name: str, qtype: int | str = "A",
                client: str | None = None) -> Explanation:
        """What ``network``'s listener would answer to ``name`` (asked by ``client``), and why."""
        if network not in self._nets:
            raise NotFound(f"network {network} does not exist (or has no DNS records)")
        code = qtype if isinstance(qtype, int) else _qtype(qtype)
        view = self.view(network, client)
        lowered = name.strip().rstrip(".").lower()
        resolution = self.resolve(view, lowered, code)
        return Explanation(network, client or "", view.networks, lowered, qtype_name(code),
                           resolution)


def _qtype(text: str) -> int:
    try:
        return qtype_value(text)
    except (KeyError, ValueError):
        raise InvalidArgument("query type", text, "expected A, AAAA, PTR, ... or TYPEnnn") from None


def _answer(present: list[tuple[_NetRecords, tuple[Match, ...]]], qtype: int,
            zone: str) -> Resolution:
    versions = _VERSIONS.get(qtype)
    if versions:
        for net, matches in present:
            addresses = _addresses(matches, versions)
            if addresses:
                return Resolution("answer", Rcode.NOERROR,
                                  _why(net, matches, len(addresses)), addresses=addresses,
                                  matches=tuple(matches))
    net, matches = present[0]
    return Resolution("nodata", Rcode.NOERROR,
                      f"{matches[0].name} is published on network {net.network.name} but has no "
                      f"{qtype_name(qtype)} records", zone=zone, matches=tuple(matches))


def _addresses(matches: Sequence[Match], versions: tuple[int, ...]) -> tuple[IPAddress, ...]:
    found = [a for m in matches for a in m.addresses if a.version in versions]
    return tuple(dict.fromkeys(found))


def _why(net: _NetRecords, matches: Sequence[Match], count: int) -> str:
    who = ", ".join(sorted({m.container for m in matches}))
    base = f"{matches[0].name} is published on network {net.network.name} by {who}"
    return base + (f" (round-robin over {count} addresses)" if count > 1 else "")


def _nets_text(view: View) -> str:
    return ("network " if len(view.networks) == 1 else "networks ") + ", ".join(view.networks)


def _nets_text_of(nets: Sequence[_NetRecords]) -> str:
    return _nets_text(View(tuple(n.network.name for n in nets), False, ()))


# --- publishing ------------------------------------------------------------------------------


def _labels(ep: Endpoint) -> Iterator[tuple[str, Literal["name", "alias", "id"]]]:
    seen: set[str] = set()
    candidates: list[tuple[str, Literal["name", "alias", "id"]]] = [(ep.name, "name")]
    candidates += [(a, "alias") for a in ep.aliases]
    cid = ep.container_id.lower()
    if len(cid) > 12 and set(cid) <= _HEX:
        candidates.append((cid[:12], "id"))
    for raw, kind in candidates:
        label = raw.strip().rstrip(".").lower()
        if label and label not in seen and _valid_name(label):
            seen.add(label)
            yield label, kind


def _suffixes(label: str, network: str, namespace: str, domain: str
              ) -> Iterator[tuple[str, str]]:
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


def _publish(net: _NetRecords, ep: Endpoint, domain: str) -> None:
    netname = net.network.name.lower()
    netname = netname if _valid_name(netname) else ""
    namespace = ep.namespace.strip().lower()
    namespace = namespace if _valid_name(namespace) else ""
    addresses = tuple(dict.fromkeys(a.ip for a in ep.addresses))
    info = _Ep(ep, addresses)
    published: set[str] = set()
    labels = list(_labels(ep))
    forms = list(_suffixes("", netname, namespace, domain))
    names = net.names
    for label, kind in labels:
        for suffix, form in forms:
            owner = label + suffix
            if owner in published or len(owner) > 253:
                continue  # the same endpoint through a second label (an alias "web.shop")
            published.add(owner)
            found = names.get(owner)
            if found is None:
                names[owner] = [(info, label, kind, form)]
            else:
                found.append((info, label, kind, form))
    if domain:
        dotted = [label + sfx for label, _ in labels if "." in label for sfx, _ in forms]
        _add_ents(net.ents, dotted, netname, namespace, domain)
    primary = labels[0][0] if labels else ""
    target = ".".join(p for p in (primary, netname, domain) if p)
    for ip in addresses:
        net.by_address[ip] = ep.container_id
        if primary and len(target) <= 253:
            net.reverse.setdefault(ip, []).append(target)


def _add_ents(ents: set[str], owners: Iterable[str], network: str, namespace: str,
              domain: str) -> None:
    """Empty non-terminals under the domain: they answer NODATA, not NXDOMAIN (RFC 8020)."""
    ents.add(domain)
    for middle in (network, namespace):
        if middle:
            ents.add(f"{middle}.{domain}")
    suffix = "." + domain
    for owner in owners:
        if owner.endswith(suffix):
            parts = owner[: -len(suffix)].split(".")
            ents.update(".".join(parts[i:]) + suffix for i in range(1, len(parts)))

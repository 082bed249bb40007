"""The record table: what the DNS server answers, from networks and endpoints. Pure.

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

Changes (design notes). The table is built once at start-up (``build``) and then changed in
place, one batch at a time (``apply(DnsChanges)``), at a cost that follows the size of the batch,
not the number of containers. (It used to be rebuilt from everything on every change, ~35 µs per
endpoint: 175 ms at 5,000 containers, and as much again in every worker process.)
- Every endpoint's publications are remembered (``names.Published``), so that removing it takes
  back exactly what it added: O(its own names). A name shared by many endpoints keeps them in
  one fixed order, so the result does not depend on the order changes arrived in.
- A network's records depend only on its name: changing its options, subnets or --internal
  re-publishes nothing. Adding a network publishes the endpoints that were waiting for it (the
  table keeps endpoints of unknown networks); removing one takes theirs back: O(its endpoints).
- Views are long-lived and updated in place. A change drops the ready-made answers of the views
  that see a changed network (``View.wire_cache``, and their SOA serial moves on); the others
  keep theirs. ``client_views`` is kept up to date for the containers that changed.
- The current networks and endpoints stay in dicts (``sources``), to rebuild the table when the
  settings change and to hand a restarted worker process the whole state.

Threads. Nothing here locks. The server reads the table on the event loop's thread, and
``apply`` must run on that same thread: a change is applied between two packets, as the swap of
a whole table was, so no query ever sees half of one.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from plexus.dns.config import DnsSettings, Upstream, dns_enabled
from plexus.dns.model import DnsChanges, Explanation, Match, Resolution, View
from plexus.dns.names import SERVICE_KEY, NetRecords, Order, Pub, Published
from plexus.dns.wire import (
    CLASS_ANY,
    CLASS_IN,
    QType,
    Rcode,
    qtype_name,
    qtype_value,
    reverse_pointer,
)
from plexus.errors import InvalidArgument, NotFound
from plexus.model import keys
from plexus.model.types import Endpoint, IPAddress, Network

__all__ = ["DnsChanges", "Explanation", "Match", "RecordTable", "Resolution", "View"]

_generations = itertools.count(1)
_VERSIONS: dict[int, tuple[int, ...]] = {QType.A: (4,), QType.AAAA: (6,), QType.ANY: (4, 6)}
Retired = list[dict[bytes, Any]]  # ready-made answer caches a change dropped


def _matches(owner: str, pubs: Sequence[Pub]) -> tuple[Match, ...]:
    return tuple(Match(owner, e.network, e.key, e.container_id, e.container, label, kind, form,
                       e.addresses) for e, label, kind, form in pubs)


def store_key(ep: Endpoint) -> str:
    """The key an endpoint given without one is filed under: its datastore key."""
    return keys.endpoint(ep.node, ep.container_id, ep.ifname)


@dataclass(slots=True)
class _Touched:
    """What one ``apply`` changed: which caches and client views need another look."""

    networks: set[str] = field(default_factory=set)  # whose records or settings changed
    removed: set[str] = field(default_factory=set)  # networks that are gone
    containers: set[str] = field(default_factory=set)
    addresses: set[tuple[str, IPAddress]] = field(default_factory=set)  # (network, address)

    def record(self, pub: Published) -> None:
        self.networks.add(pub.network)
        self.containers.add(pub.container_id)
        self.addresses.update((pub.network, ip) for ip in pub.addresses)


class RecordTable:
    """Built once, then changed in place by ``apply`` (see the module docstring)."""

    def __init__(self, settings: DnsSettings | None = None, generation: int | None = None) -> None:
        self.settings = settings or DnsSettings()
        self.generation = next(_generations) if generation is None else generation
        self._networks: dict[str, Network] = {}
        self._endpoints: dict[str, Endpoint] = {}  # every endpoint, on a known network or not
        self._on_network: dict[str, set[str]] = {}  # network name -> keys of its endpoints
        self._nets: dict[str, NetRecords] = {}
        self._published: dict[str, Published] = {}  # key -> what it published
        self._containers: dict[str, list[Published]] = {}  # container ID -> its publications
        self._views: dict[tuple[str, ...], View] = {}
        self._clients: dict[str, dict[str, View]] = {}

    # --- building and changing ---------------------------------------------------------------

    @classmethod
    def build(cls, networks: Iterable[Network],
              endpoints: Mapping[str, Endpoint] | Iterable[Endpoint],
              settings: DnsSettings | None = None, generation: int | None = None) -> RecordTable:
        """From every network and every endpoint (all nodes: a container on another host of the
        same overlay network resolves too). ``endpoints`` maps the keys ``apply`` will use to
        endpoints; a plain iterable is keyed by datastore key (``store_key``). Endpoints on
        unknown networks publish nothing until their network arrives."""
        table = cls(settings, generation)
        for net in networks:
            table._networks[net.name] = net
            table._nets[net.name] = NetRecords(net, table.settings)
        items = (endpoints.items() if isinstance(endpoints, Mapping)
                 else ((store_key(ep), ep) for ep in endpoints))
        for key, ep in items:
            table._store(key, ep)
        for key in sorted(table._endpoints, key=table._order):  # appends, not inserts
            table._publish(key, None)
        return table

    @classmethod
    def empty(cls, settings: DnsSettings | None = None) -> RecordTable:
        return cls.build((), (), settings)

    def rebuilt(self, settings: DnsSettings) -> RecordTable:
        """The same networks and endpoints under other settings (domain, TTL, upstreams)."""
        return RecordTable.build(self._networks.values(), self._endpoints, settings)

    def apply(self, changes: DnsChanges, generation: int | None = None) -> Retired:
        """Upsert and remove networks and endpoints, in place, O(size of the change). Returns
        the ready-made answer caches it dropped (the server counts their hits)."""
        self.generation = next(_generations) if generation is None else generation
        touched = _Touched()
        for name, net in changes.networks.items():
            self._set_network(name, net, touched)
        for key, ep in changes.endpoints.items():
            self._set_endpoint(key, ep, touched)
        self._refresh_clients(touched)
        return self._invalidate(touched)

    def _set_network(self, name: str, net: Network | None, touched: _Touched) -> None:
        touched.networks.add(name)
        records = self._nets.get(name)
        if net is None:
            if records is not None:
                for key in self._on_network.get(name, ()):
                    self._unpublish(key, touched)
                del self._nets[name]
            self._networks.pop(name, None)
            self._clients.pop(name, None)
            touched.removed.add(name)
        elif records is not None:
            self._networks[name] = net
            records.configure(net, self.settings)
        else:
            self._networks[name] = net
            self._nets[name] = NetRecords(net, self.settings)
            for key in sorted(self._on_network.get(name, ()), key=self._order):
                self._publish(key, touched)

    def _set_endpoint(self, key: str, ep: Endpoint | None, touched: _Touched) -> None:
        old = self._endpoints.get(key)
        if old is not None and ep is not None and _same_records(old, ep):
            self._endpoints[key] = ep  # a state change, say: nothing DNS shows
            return
        if old is not None:
            self._unpublish(key, touched)
            self._unstore(key)
        if ep is not None:
            self._store(key, ep)
            self._publish(key, touched)

    def _store(self, key: str, ep: Endpoint) -> None:
        self._endpoints[key] = ep
        self._on_network.setdefault(ep.network, set()).add(key)

    def _unstore(self, key: str) -> None:
        ep = self._endpoints.pop(key)
        keys_ = self._on_network[ep.network]
        keys_.discard(key)
        if not keys_:
            del self._on_network[ep.network]

    def _order(self, key: str) -> Order:
        return (self._endpoints[key].name, key)

    def _publish(self, key: str, touched: _Touched | None) -> None:
        ep = self._endpoints[key]
        net = self._nets.get(ep.network)
        if net is None or not (ep.addresses or key.startswith(SERVICE_KEY)):
            return  # a service's name stays while it has no address: NODATA, not forwarded
        pub = net.add(ep, key, self.settings.domain)
        self._published[key] = pub
        self._containers.setdefault(pub.container_id, []).append(pub)
        if touched is not None:
            touched.record(pub)

    def _unpublish(self, key: str, touched: _Touched) -> None:
        pub = self._published.pop(key, None)
        if pub is None:
            return
        self._nets[pub.network].remove(pub)
        mine = self._containers[pub.container_id]
        mine.remove(pub)
        if not mine:
            del self._containers[pub.container_id]
        touched.record(pub)

    def _refresh_clients(self, touched: _Touched) -> None:
        """Re-map the source addresses whose container gained or lost a network (or whose
        holder changed) in the client views handed out so far."""
        if not self._clients:
            return
        pairs = set(touched.addresses)
        for cid in touched.containers:
            for pub in self._containers.get(cid, ()):
                pairs.update((pub.network, ip) for ip in pub.addresses)
        for network, ip in pairs:
            found = self._clients.get(network)
            if found is not None:
                self._set_client(found, network, ip)

    def _invalidate(self, touched: _Touched) -> Retired:
        """Drop the answers of every view that sees a changed network; forget the views of
        networks that are gone. O(views): a few per network."""
        retired: Retired = []
        for nets, view in list(self._views.items()):
            if touched.networks.isdisjoint(nets):
                continue
            if view.wire_cache:
                retired.append(view.wire_cache)
                view.wire_cache = {}
            view.serial = self.generation
            view.forward, view.upstreams = self._routing(nets)
            if not touched.removed.isdisjoint(nets):
                del self._views[nets]
        return retired

    # --- reading -----------------------------------------------------------------------------

    @property
    def sources(self) -> tuple[Mapping[str, Network], Mapping[str, Endpoint]]:
        """The current networks (by name) and endpoints (by key), read-only, not copied."""
        return MappingProxyType(self._networks), MappingProxyType(self._endpoints)

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
        nets: tuple[str, ...] | None = None
        if client is not None and network in self._nets:
            try:
                ip = ipaddress.ip_address(str(client).split("%", 1)[0])
            except ValueError:
                ip = None
            nets = None if ip is None else self._client_networks(network, ip)
        return self._view(nets or (network,))

    def _client_networks(self, network: str, ip: IPAddress) -> tuple[str, ...] | None:
        """The view of a container on several networks, asking from ``ip`` (else None)."""
        net = self._nets.get(network)
        holder = None if net is None else net.holder(ip)
        if holder is None:
            return None
        joined = {p.network for p in self._containers.get(holder.container_id, ())}
        if len(joined) < 2:
            return None
        return (network, *sorted(joined - {network}))

    def _view(self, nets: tuple[str, ...]) -> View:
        view = self._views.get(nets)
        if view is None:
            forward, upstreams = self._routing(nets)
            view = self._views[nets] = View(nets, forward, upstreams, self.generation)
        return view

    def _routing(self, nets: tuple[str, ...]) -> tuple[bool, tuple[Upstream, ...]]:
        forwarding = [self._nets[n] for n in nets if n in self._nets and self._nets[n].forward]
        return bool(forwarding), (forwarding[0].upstreams if forwarding else ())

    def views(self) -> list[View]:
        """Every view handed out so far (the server walks their caches for its counters)."""
        return list(self._views.values())

    def client_views(self, network: str) -> dict[str, View]:
        """Source address (text, as a socket reports it) -> view, for the containers on
        ``network`` that are attached to other networks too. Everyone else gets
        ``view(network)``. The server's fast path holds on to this dict: it is computed once
        per network and then kept up to date in place by ``apply``."""
        found = self._clients.get(network)
        if found is None:
            found = self._clients[network] = {}
            net = self._nets.get(network)
            for ip in (net.by_address if net else ()):
                self._set_client(found, network, ip)
        return found

    def _set_client(self, found: dict[str, View], network: str, ip: IPAddress) -> None:
        nets = self._client_networks(network, ip)
        if nets is None:
            found.pop(str(ip), None)
        else:
            found[str(ip)] = self._view(nets)

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

    def _reverse(self, view: View, nets: Sequence[NetRecords], ip: IPAddress,
                 qtype: int) -> Resolution:
        for net in nets:
            targets = net.targets(ip)
            if targets:
                if qtype not in (QType.PTR, QType.ANY):
                    return Resolution("nodata", Rcode.NOERROR,
                                      f"{ip} is a container address; only PTR is published")
                return Resolution("answer", Rcode.NOERROR,
                                  f"{ip} is a container address on network {net.network.name}",
                                  targets=targets)
        inside = next((n for n in nets for s in n.subnets if ip in s), None)
        if inside is not None:
            return Resolution("nxdomain", Rcode.NXDOMAIN,
                              f"{ip} is inside network {inside.network.name}'s subnet but no "
                              "container has it (private reverse lookups are not forwarded)")
        return self._forward(view, f"{ip} is not an address of {_nets_text(view)}")

    def _authoritative_miss(self, nets: Sequence[NetRecords], name: str, qtype: int,
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


def _answer(present: list[tuple[NetRecords, tuple[Match, ...]]], qtype: int,
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


def _why(net: NetRecords, matches: Sequence[Match], count: int) -> str:
    who = ", ".join(sorted({m.container for m in matches}))
    base = f"{matches[0].name} is published on network {net.network.name} by {who}"
    return base + (f" (round-robin over {count} addresses)" if count > 1 else "")


def _nets_text(view: View) -> str:
    return ("network " if len(view.networks) == 1 else "networks ") + ", ".join(view.networks)


def _nets_text_of(nets: Sequence[NetRecords]) -> str:
    return _nets_text(View(tuple(n.network.name for n in nets), False, ()))



def _same_records(a: Endpoint, b: Endpoint) -> bool:
    """True when ``b`` publishes exactly what ``a`` did (it differs in state, ports...)."""
    return (a.network, a.name, a.aliases, a.namespace, a.container_id, a.ifname, a.addresses) \
        == (b.network, b.name, b.aliases, b.namespace, b.container_id, b.ifname, b.addresses)

"""What goes into the record table and what comes out of it: plain data, picklable (worker
processes receive ``DnsChanges`` and send ``Explanation`` back)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from plexus.dns.config import Upstream
from plexus.dns.wire import rcode_name
from plexus.errors import InvalidArgument
from plexus.model.types import Endpoint, IPAddress, Network

Outcome = Literal["answer", "nodata", "nxdomain", "forward", "refused", "servfail"]


@dataclass(frozen=True, slots=True)
class DnsChanges:
    """One batch of changes for ``RecordTable.apply`` / ``DnsService.apply``.

    ``networks``: network name -> its new value, or None when it was removed.
    ``endpoints``: a key the caller chooses -> the endpoint's new value, or None when it was
    removed. The key must be unique across every node (the agent passes the endpoint's datastore
    key); ``Endpoint.key`` is not (two hosts may both have ``CONTAINER/eth0``). An upsert of a
    key that exists replaces that endpoint; a removal of an unknown key does nothing.

    Both mappings are copied: a batch cannot change after it was handed over.
    """

    networks: Mapping[str, Network | None] = field(default_factory=dict)
    endpoints: Mapping[str, Endpoint | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "networks", dict(self.networks))
        object.__setattr__(self, "endpoints", dict(self.endpoints))
        for name, net in self.networks.items():
            if net is not None and net.name != name:
                raise InvalidArgument("dns network change", name,
                                      f"is keyed by a name other than its own ({net.name!r})")

    def __bool__(self) -> bool:
        return bool(self.networks or self.endpoints)


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
    """The networks a query is answered from (see ``plexus.dns.records``).

    A view lives as long as its networks do; the table updates it in place. ``wire_cache``
    belongs to the server (ready-made responses keyed by the query bytes after the ID); it lives
    here so that the table can drop it, and ``serial`` (the SOA serial of negative answers) is
    moved on, whenever a change touches one of the view's networks.
    """

    networks: tuple[str, ...]
    forward: bool
    upstreams: tuple[Upstream, ...]
    serial: int = 0
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

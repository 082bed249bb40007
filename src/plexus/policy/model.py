"""What every kind of policy becomes: one small model the evaluator (``evaluate``) and the
compiler to nftables both read, so that Kubernetes NetworkPolicy, CiliumNetworkPolicy and the
cluster-wide tiers differ only in their parsers.

A policy selects its *subjects* (endpoints) and holds rules per direction. A rule has an action,
peers (the other end: endpoints by selector, address blocks, entities) and ports; no peers means
every peer and no ports every port. Tiers are evaluated in order: admin (AdminNetworkPolicy, by
priority, first matching rule decides, Pass skips to the next tier), namespaced (NetworkPolicy and
CiliumNetworkPolicy: deny rules win, then the union of allows of the policies that isolate the
subject, default allow when none does), baseline (BaselineAdminNetworkPolicy, first match).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from plexus.model.types import IPAddress, IPNetwork
from plexus.policy.selectors import EVERYTHING, LabelSelector

PROTOCOLS = ("tcp", "udp", "sctp")
NS_NAME_LABEL = "kubernetes.io/metadata.name"
AUDIT_ANNOTATION = "plexus.io/audit"


class Direction(enum.Enum):
    INGRESS = "ingress"
    EGRESS = "egress"


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    PASS = "pass"


class Tier(enum.IntEnum):
    ADMIN = 0
    NAMESPACED = 1
    BASELINE = 2


class Entity(enum.Enum):
    """Cilium's entities: ``world`` is every address that is neither an endpoint nor a host of
    the cluster, ``host`` the local host, ``cluster`` every endpoint and host, ``all`` all."""

    WORLD = "world"
    HOST = "host"
    CLUSTER = "cluster"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class EndpointSelector:
    """Endpoints by their labels and their namespace: by the namespace's labels
    (``namespaces``), or, when that is None, in the one namespace ``namespace`` ("" for any)."""

    pods: LabelSelector = EVERYTHING
    namespaces: LabelSelector | None = None
    namespace: str = ""

    def describe(self) -> str:
        where = (f"namespaces {self.namespaces.describe()}" if self.namespaces is not None
                 else f"namespace {self.namespace}" if self.namespace else "any namespace")
        return f"endpoints {self.pods.describe()} in {where}"


@dataclass(frozen=True, slots=True)
class CidrPeer:
    """Addresses of ``cidr`` but not of ``excepts``. ``endpoints`` says whether endpoints'
    own addresses match too (NetworkPolicy's ipBlock: yes; Cilium's CIDR rules: no, they
    select only what lies outside the cluster)."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()
    endpoints: bool = True

    def contains(self, address: IPAddress) -> bool:
        return (address.version == self.cidr.version and address in self.cidr
                and not any(address in e for e in self.excepts))

    def describe(self) -> str:
        return f"{self.cidr}" + "".join(f" except {e}" for e in self.excepts)


@dataclass(frozen=True, slots=True)
class EntityPeer:
    entity: Entity

    def describe(self) -> str:
        return f"entity {self.entity.value}"


Peer = EndpointSelector | CidrPeer | EntityPeer


@dataclass(frozen=True, slots=True)
class PortMatch:
    """A protocol ("tcp", "udp", "sctp", or "" for any) and a port: a number with an optional
    inclusive ``end``, a name resolved against the destination endpoint's ports, or neither
    (every port of the protocol)."""

    protocol: str = "tcp"
    port: int = 0
    end: int = 0
    name: str = ""

    def describe(self) -> str:
        what = self.name or (f"{self.port}-{self.end}" if self.end else str(self.port or "*"))
        return f"{what}/{self.protocol or 'any'}"


@dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    name: str  # where it stands in its document: "ingress[0]", or the rule's own name
    peers: tuple[Peer, ...] = ()  # none: every peer
    ports: tuple[PortMatch, ...] = ()  # none: every port and protocol


@dataclass(frozen=True, slots=True)
class Policy:
    kind: str
    namespace: str  # "" for a cluster-wide policy
    name: str
    tier: Tier
    subject: EndpointSelector
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    isolates: frozenset[Direction] = frozenset()  # namespaced tier: default deny that way
    priority: int = 0  # admin tier: lower first
    audit: bool = False
    document: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ref(self) -> str:
        """How the CLI names it: NS/NAME, or NAME for a cluster-wide policy."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def rules(self, direction: Direction) -> tuple[Rule, ...]:
        return self.ingress if direction is Direction.INGRESS else self.egress

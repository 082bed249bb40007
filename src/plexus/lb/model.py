"""What the kernel must hold for services: the seam between the control plane and the dataplane.

The control plane (``agent.reconcilers.lb``) turns stored services and the endpoints their
selectors match into ``Frontend`` values; the dataplane (``dataplane.nft.lb``) renders them into
``table inet plexus_services`` and changes only the frontends that differ between two states.
Plain frozen data, comparable and hashable, so "what changed" is a set difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from plexus.model.types import IPAddress

Proto = Literal["tcp", "udp"]


@dataclass(frozen=True, slots=True, order=True)
class Backend:
    """One ready endpoint of a service port: where a connection is DNATed to."""

    address: IPAddress
    port: int


@dataclass(frozen=True, slots=True, order=True)
class Published:
    """A host port that leads to a service port (``--publish``, a NodePort): ``address`` None
    means every local address of the host."""

    address: IPAddress | None
    port: int


@dataclass(frozen=True, slots=True)
class Frontend:
    """One service port on one VIP family: (vip, proto, port) and the backends behind it.

    ``service`` is "NAMESPACE/NAME", ``name`` the service port's name ("" when unnamed).
    ``backends`` holds the ready endpoints only, sorted; empty means the service has no ready
    endpoint and its clients get a TCP RST / ICMP unreachable. ``affinity`` is the client-IP
    affinity timeout in seconds, 0 for none. A headless service has no frontend at all.
    """

    service: str
    name: str
    proto: Proto
    vip: IPAddress
    port: int
    backends: tuple[Backend, ...] = ()
    affinity: int = 0
    published: tuple[Published, ...] = ()

    @property
    def key(self) -> tuple[IPAddress, Proto, int]:
        return (self.vip, self.proto, self.port)


Frontends = Mapping[tuple[IPAddress, Proto, int], Frontend]


def index(frontends: Iterable[Frontend]) -> dict[tuple[IPAddress, Proto, int], Frontend]:
    return {f.key: f for f in frontends}


@dataclass(frozen=True, slots=True)
class Change:
    """The frontends to remove, and those to add or replace, between two states."""

    removed: tuple[Frontend, ...]
    changed: tuple[Frontend, ...]

    def __bool__(self) -> bool:
        return bool(self.removed or self.changed)


def diff(old: Frontends, new: Frontends) -> Change:
    removed = tuple(f for k, f in old.items() if k not in new)
    changed = tuple(f for k, f in new.items() if old.get(k) != f)
    return Change(removed, changed)

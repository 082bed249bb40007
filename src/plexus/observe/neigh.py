"""The neighbour entries that verify's probes make, taken back.

Why: a probe between two containers of one segment makes two ARP/ND entries, one in each
container (the source resolves the destination; the destination learns the source from its
request and answers with it). A full mesh of N containers makes N x (N - 1) of them, and the
kernel's neighbour tables count every namespace's entries against one limit
(net.ipv4.neigh.default.gc_thresh3, 1024 by default, set in the root namespace only), which
entries younger than 5 s never make room under: checked on kernel 6.18, where 50 containers on
one bridge probed at once got 1,022 answers and 1,428 silences, and left new connections of
every container on the host failing until the entries aged. So verify probes the pairs of one
segment in rounds that make at most ``BUDGET`` entries, and deletes them after each round
(RTM_DELNEIGH, through one netlink socket per namespace opened once). An entry that a
container's own traffic was using is learnt again by one ARP exchange on its next packet.
"""

from __future__ import annotations

import resource
import socket
import struct
from collections.abc import Callable, Iterable

from plexus.dataplane import rawnl, rtnl
from plexus.errors import PlexusError
from plexus.model.types import IPAddress

BUDGET = 384  # neighbour entries one round of probes may make (the table holds 1,024)
RTM_DELNEIGH = 29
NDA_DST = 1
_NDMSG = struct.Struct("=BxxxiHBB")  # family, pad, index, state, flags, type
_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")

Entry = tuple[str, str, IPAddress]  # netns path, interface name, neighbour address


def max_open() -> int:
    """Channels to keep open: a quarter of the agent's descriptor limit, at most 1,024 (a
    round's tiles cycle through every destination, so fewer than their namespaces would
    reopen a channel, a thread and a socket, for nearly every round)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(64, min(1024, soft // 4))


def delneigh_request(seq: int, index: int, address: IPAddress) -> bytes:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    raw = address.packed  # 4 or 16 bytes: aligned as it is
    body = _NDMSG.pack(family, index, 0, 0, 0) + _ATTR.pack(_ATTR.size + len(raw), NDA_DST) + raw
    flags = rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK
    return _HDR.pack(_HDR.size + len(body), RTM_DELNEIGH, flags, seq, 0) + body


class Neighbours:
    """Netlink channels into containers' namespaces, each opened on first use (a thread
    enters the namespace) and kept while it is among the MAX_OPEN most recently used, to
    delete the entries of a round. Not thread-safe: one caller thread at a time."""

    def __init__(self) -> None:
        self._max = max_open()
        self._channels: dict[str, rawnl.Channel | None] = {}
        self._indexes: dict[tuple[str, str], int | None] = {}

    def forget(self, entries: Iterable[Entry]) -> int:
        """Delete these entries (missing ones are no error); how many namespaces it reached."""
        by_ns: dict[str, list[tuple[str, IPAddress]]] = {}
        for netns, ifname, address in set(entries):
            by_ns.setdefault(netns, []).append((ifname, address))
        done = 0
        for netns, items in by_ns.items():
            ch = self._channel(netns)
            if ch is None:
                continue
            builds = [self._build(ch, netns, ifname, address) for ifname, address in items]
            wanted = [b for b in builds if b is not None]
            if wanted:
                try:
                    ch.call_all(wanted)
                    done += 1
                except (OSError, PlexusError):
                    self._channels[netns] = None  # the namespace went away: leave it be
        return done

    def _build(self, ch: rawnl.Channel, netns: str, ifname: str,
               address: IPAddress) -> Callable[[int], bytes] | None:
        key = (netns, ifname)
        if key not in self._indexes:
            try:
                self._indexes[key] = rawnl.link_index(ch, ifname)
            except (OSError, PlexusError):
                self._indexes[key] = None
        index = self._indexes[key]
        return None if index is None else (lambda seq: delneigh_request(seq, index, address))

    def _channel(self, netns: str) -> rawnl.Channel | None:
        if netns in self._channels:
            ch = self._channels.pop(netns)  # and back at the end: the most recently used
        else:
            if len(self._channels) >= self._max:
                oldest = self._channels.pop(next(iter(self._channels)))
                if oldest is not None:
                    oldest.close()
            try:
                ch = rawnl.Channel.open(netns)
            except (OSError, PlexusError):
                ch = None
        self._channels[netns] = ch
        return ch

    def close(self) -> None:
        for ch in self._channels.values():
            if ch is not None:
                ch.close()
        self._channels.clear()

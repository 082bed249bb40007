"""The flow log: every connection a container makes or receives, and every packet policy or
isolation drops, as records with names and verdicts, in a bounded ring (``plexus flows``).

Sources (``observe.kernel`` reads them): conntrack events, a record when a connection begins
and one when it ends (with bytes and packets: conntrack accounting); and the packets the
nftables tables log to one nfnetlink_log group where they drop (or, audit, would drop) them.
No packet reaches Python but those logged, and the tables log at most ``render.LOG_RATE`` a second
(``dataplane.nft.render.LOG_GROUP`` is the group).

Bounded everywhere: the ring holds ``capacity`` records; at most ``rate`` records a second
are made (the rest are counted in ``FlowLog.stats`` as ``suppressed``), a follower that does
not read loses records (``lagged``), and connections open at once are tracked up to
``capacity`` (older ones end without a duration). ``observe.flowmetrics`` serves these counts.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import re
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from plexus.errors import InvalidArgument
from plexus.model.types import Endpoint, IPAddress
from plexus.observe.nfwire import CtEvent, Logged, Tuple5

VERDICTS = ("forwarded", "dropped", "audit")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a flow: its address and port, and the container there (if any)."""

    address: str
    port: int
    name: str = ""
    namespace: str = ""
    network: str = ""
    node: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Flow:
    time: float
    host: str
    event: str  # start, end (a connection); drop, audit (a logged packet)
    proto: str
    src: Side
    dst: Side
    direction: str  # egress (from a local container), ingress (to one), or both
    verdict: str  # forwarded, dropped, audit (would have been dropped)
    reason: str = ""  # what dropped it: "policy Kind ns/name", "isolation"
    bytes: int = 0
    packets: int = 0
    duration: float | None = None  # seconds, on an end record

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Filter:
    """What ``plexus flows`` asks for; an end matches a container name or an address."""

    src: str = ""
    dst: str = ""
    port: int = 0
    verdict: str = ""
    since: float = 0.0  # a time (seconds since the epoch); 0: all

    @classmethod
    def parse(cls, src: str = "", dst: str = "", port: str | int = "", verdict: str = "",
              since: str = "", now: float | None = None) -> Filter:
        return cls(src, dst, _port(port), _verdict(verdict),
                   (now or time.time()) - parse_duration(since) if since else 0.0)

    def matches(self, f: Flow) -> bool:
        return ((not self.src or self.src in (f.src.name, f.src.address))
                and (not self.dst or self.dst in (f.dst.name, f.dst.address))
                and (not self.port or self.port in (f.dst.port, f.src.port))
                and (not self.verdict or f.verdict == self.verdict)
                and f.time >= self.since)


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise InvalidArgument("since", text, "not a duration (e.g. 30s, 5m, 2h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _port(value: str | int) -> int:
    if value in ("", 0):
        return 0
    try:
        port = int(value)
    except ValueError:
        raise InvalidArgument("port", str(value), "not a port number") from None
    if not 1 <= port <= 65535:
        raise InvalidArgument("port", str(value), "not in 1-65535")
    return port


def _verdict(value: str) -> str:
    if value and value not in VERDICTS:
        raise InvalidArgument("verdict", value, f"not one of {', '.join(VERDICTS)}")
    return value


class Directory:
    """Address -> endpoint, rebuilt from the agent's cache on a miss when it may have changed:
    the number of endpoints differs from the last build (a container just started: its first
    connections must not pass for the host's own), or a second has passed (an endpoint replaced
    by another). Most misses are the host's own traffic: they rebuild at most once a second."""

    def __init__(self, endpoints: Callable[[], Collection[Endpoint]], node: str) -> None:
        self._endpoints = endpoints
        self.node = node
        self._by_address: dict[IPAddress, Endpoint] = {}
        self._built = -1.0
        self._size = -1  # endpoints at the last build

    def find(self, address: IPAddress, now: float) -> Endpoint | None:
        ep = self._by_address.get(address)
        if ep is None:
            endpoints = self._endpoints()
            if now - self._built >= 1.0 or len(endpoints) != self._size:
                self._by_address = {i.ip: e for e in endpoints for i in e.addresses}
                self._built, self._size = now, len(endpoints)
                ep = self._by_address.get(address)
        return ep

    def side(self, address: IPAddress, port: int, now: float) -> Side:
        ep = self.find(address, now)
        if ep is None:
            return Side(str(address), port)
        return Side(str(address), port, ep.name, ep.policy_namespace, ep.network, ep.node,
                    dict(ep.labels))


class FlowLog:
    def __init__(self, directory: Directory, *, capacity: int = 10000, rate: int = 5000,
                 reason_of: Callable[[str, int], str] | None = None,
                 export: Path | None = None) -> None:
        self._dir = directory
        self._ring: collections.deque[Flow] = collections.deque(maxlen=capacity)
        self._open: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._capacity = capacity
        self._rate = rate
        self._window = (0, 0)  # (second, records made in it)
        self._reason_of = reason_of or (lambda prefix, mark: prefix)
        self._followers: set[asyncio.Queue[Flow]] = set()
        self._export: TextIO | None = export.open("a", buffering=1) if export else None
        self.stats: collections.Counter[str] = collections.Counter()
        self.verdicts: collections.Counter[str] = collections.Counter()  # records made
        # The kernel sockets feeding the log (source -> inode, ``observe.kernel`` fills it): the
        # kernel counts, per socket, the messages it dropped when the socket's buffer was full.
        self.sockets: dict[str, int] = {}

    # -- ingest ----------------------------------------------------------------------------

    def connection(self, ev: CtEvent, now: float | None = None) -> Flow | None:
        now = time.time() if now is None else now
        duration = None
        if ev.new:
            self._open[ev.id] = now
            while len(self._open) > self._capacity:
                self._open.popitem(last=False)
        else:
            began = self._open.pop(ev.id, None)
            duration = None if began is None else round(now - began, 6)
        dst = ev.reply.src if ev.reply is not None else ev.orig.dst  # after DNAT
        dport = ev.reply.sport if ev.reply is not None else ev.orig.dport
        src, dside = self._dir.side(ev.orig.src, ev.orig.sport, now), \
            self._dir.side(dst, dport, now)
        if not (src.name or dside.name):
            return None  # the host's own traffic: no container in it
        return self._add(Flow(now, self._dir.node, "start" if ev.new else "end", ev.orig.proto,
                              src, dside, _direction(src, dside, self._dir.node), "forwarded",
                              "", ev.bytes, ev.packets, duration), now)

    def packet(self, lg: Logged, now: float | None = None) -> Flow | None:
        now = time.time() if now is None else now
        t: Tuple5 | None = lg.packet
        if t is None:
            return None
        src, dst = self._dir.side(t.src, t.sport, now), self._dir.side(t.dst, t.dport, now)
        kind = lg.prefix.split(" ", 1)[0]
        verdict, event = ("audit", "audit") if kind == "audit" else ("dropped", "drop")
        return self._add(Flow(now, self._dir.node, event, t.proto, src, dst,
                              _direction(src, dst, self._dir.node), verdict,
                              self._reason_of(lg.prefix, lg.mark)), now)

    def room(self, now: float) -> bool:
        """Whether this second's budget of records has room; if not, the event is counted as
        suppressed without being parsed (a flood then costs the agent almost nothing)."""
        second, made = self._window
        if int(now) == second and made >= self._rate:
            self.stats["suppressed"] += 1
            return False
        return True

    def _add(self, flow: Flow, now: float) -> Flow | None:
        second, made = self._window
        if int(now) != second:
            second, made = int(now), 0
        if made >= self._rate:
            self.stats["suppressed"] += 1
            self._window = (second, made)
            return None
        self._window = (second, made + 1)
        self._ring.append(flow)
        self.stats[flow.event] += 1
        self.verdicts[flow.verdict] += 1
        for q in self._followers:
            if q.full():
                self.stats["lagged"] += 1
            else:
                q.put_nowait(flow)
        if self._export is not None:
            self._export.write(json.dumps(flow.json(), separators=(",", ":")) + "\n")
        return flow

    # -- reading ---------------------------------------------------------------------------

    def query(self, flt: Filter, limit: int = 1000) -> list[Flow]:
        found = [f for f in self._ring if flt.matches(f)]
        return found[-limit:] if limit else found

    def follow(self, size: int = 1000) -> asyncio.Queue[Flow]:
        q: asyncio.Queue[Flow] = asyncio.Queue(maxsize=size)
        self._followers.add(q)
        return q

    def unfollow(self, q: asyncio.Queue[Flow]) -> None:
        self._followers.discard(q)

    def sizes(self) -> dict[str, int]:
        """The ring's fill and bound, followers, and connections tracked as open."""
        return {"records": len(self._ring), "capacity": self._capacity,
                "followers": len(self._followers), "open": len(self._open)}

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._ring))

    def close(self) -> None:
        if self._export is not None:
            self._export.close()
            self._export = None


def _direction(src: Side, dst: Side, node: str) -> str:
    out = src.name and src.node == node, dst.name and dst.node == node
    return {(True, True): "both", (True, False): "egress", (False, True): "ingress"}.get(
        (bool(out[0]), bool(out[1])), "")


def address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None

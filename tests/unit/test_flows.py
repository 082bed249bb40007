"""The flow log's parts without a kernel: wire parsers on hand-built messages, filters,
the ring's bounds and the rate limit."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from plexus.errors import InvalidArgument
from plexus.model.types import Endpoint
from plexus.observe import nfwire as w
from plexus.observe.flows import Directory, Filter, FlowLog, parse_duration

ip = ipaddress.ip_address


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | 0x8000, b"".join(parts))


def tuple_attr(kind: int, src: str, dst: str, sport: int, dport: int) -> bytes:
    return nest(kind, nest(w.CTA_TUPLE_IP, attr(w.CTA_IP_V4_SRC, ip(src).packed),
                           attr(w.CTA_IP_V4_DST, ip(dst).packed)),
                nest(w.CTA_TUPLE_PROTO, attr(w.CTA_PROTO_NUM, bytes([6])),
                     attr(w.CTA_PROTO_SRC_PORT, struct.pack(">H", sport)),
                     attr(w.CTA_PROTO_DST_PORT, struct.pack(">H", dport))))


def counters(kind: int, packets: int, size: int) -> bytes:
    return nest(kind, attr(w.CTA_COUNTERS_PACKETS, struct.pack(">Q", packets)),
                attr(w.CTA_COUNTERS_BYTES, struct.pack(">Q", size)))


def message(kind: int, body: bytes, family: int = 2) -> bytes:
    payload = struct.pack("=BBH", family, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload


def test_a_destroy_event_says_the_tuples_and_counters() -> None:
    body = (tuple_attr(w.CTA_TUPLE_ORIG, "10.0.0.2", "192.0.2.1", 40000, 8080)
            + tuple_attr(w.CTA_TUPLE_REPLY, "10.0.0.9", "10.0.0.2", 80, 40000)
            + counters(w.CTA_COUNTERS_ORIG, 5, 700) + counters(w.CTA_COUNTERS_REPLY, 4, 300)
            + attr(w.CTA_ID, struct.pack(">I", 77)))
    data = message((w.NFNL_SUBSYS_CTNETLINK << 8) | w.IPCTNL_MSG_CT_DELETE, body)
    (kind, _, _, payload), = w.messages(data)
    ev = w.ct_event(kind, payload)
    assert ev is not None and not ev.new and ev.id == 77
    assert ev.orig.dport == 8080 and ev.reply is not None and str(ev.reply.src) == "10.0.0.9"
    assert (ev.packets, ev.bytes) == (9, 1000)


def test_a_logged_packet_says_its_prefix_mark_and_ports() -> None:
    packet = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 17, 0, 0]) + ip("10.0.0.3").packed + \
        ip("10.0.0.4").packed + struct.pack(">HH", 5353, 53)
    body = attr(w.NFULA_PREFIX, b"deny\0") + attr(w.NFULA_MARK, struct.pack(">I", 14)) + \
        attr(w.NFULA_PAYLOAD, packet)
    (kind, _, family, payload), = w.messages(message((w.NFNL_SUBSYS_ULOG << 8), body))
    lg = w.logged(kind, family, payload)
    assert lg is not None and lg.prefix == "deny" and lg.mark == 14
    assert lg.packet == w.Tuple5(ip("10.0.0.3"), ip("10.0.0.4"), "udp", 5353, 53)


def test_filters_parse_and_refuse_with_the_field() -> None:
    assert parse_duration("5m") == 300 and parse_duration("250ms") == 0.25
    for kwargs, word in (({"since": "soon"}, "since"), ({"verdict": "ok"}, "verdict"),
                         ({"port": "0x50"}, "port")):
        with pytest.raises(InvalidArgument, match=word):
            Filter.parse(**kwargs)


def _log(rate: int = 100, capacity: int = 10) -> FlowLog:
    ep = Endpoint("c1", "eth0", "net", "n1", "/x", addresses=(
        ipaddress.ip_interface("10.0.0.2/24"),), name="web", labels={"app": "web"})
    return FlowLog(Directory(lambda: [ep], "n1"), capacity=capacity, rate=rate)


def _event(i: int, new: bool = True, src: str = "10.0.0.2") -> w.CtEvent:
    t = w.Tuple5(ip(src), ip("10.0.0.9"), "tcp", 1000 + i, 80)
    return w.CtEvent(new, i, t, None)


def test_records_name_local_containers_and_skip_the_hosts_own_traffic() -> None:
    log = _log()
    f = log.connection(_event(1), now=100.0)
    assert f is not None and f.src.name == "web" and f.direction == "egress"
    assert log.connection(_event(2, src="192.0.2.1"), now=100.0) is None
    end = log.connection(_event(1, new=False), now=102.5)
    assert end is not None and end.duration == 2.5
    assert [x.event for x in log.query(Filter(src="web"))] == ["start", "end"]


def test_the_ring_and_the_rate_are_bounded_and_counted() -> None:
    log = _log(rate=5, capacity=3)
    made = [log.connection(_event(i), now=200.0) for i in range(8)]
    assert sum(1 for m in made if m is not None) == 5 and log.stats["suppressed"] == 3
    assert len(log.query(Filter(), limit=0)) == 3  # the ring keeps the newest
    assert log.connection(_event(9), now=201.0) is not None  # a new second


def test_a_container_that_just_started_is_named_within_the_second() -> None:
    """Its first connection comes right after the directory was last built (for another
    miss): the number of endpoints changed, so the miss rebuilds it."""
    eps: list[Endpoint] = []
    log = FlowLog(Directory(lambda: eps, "n1"))
    assert log.connection(_event(1), now=300.0) is None  # nobody there yet: the host's own
    eps.append(Endpoint("c1", "eth0", "net", "n1", "/x", addresses=(
        ipaddress.ip_interface("10.0.0.2/24"),), name="web"))
    f = log.connection(_event(2), now=300.1)
    assert f is not None and f.src.name == "web"


def test_the_ipv4_fast_path_reads_what_the_general_parser_reads() -> None:
    raw = tuple_attr(w.CTA_TUPLE_ORIG, "10.0.0.2", "192.0.2.1", 40000, 8080)
    view = memoryview(raw)[4:]  # the nest's content
    assert w._tuple(view) == w._tuple_any(view) == w.Tuple5(
        ip("10.0.0.2"), ip("192.0.2.1"), "tcp", 40000, 8080)
    six = nest(w.CTA_TUPLE_ORIG,
               nest(w.CTA_TUPLE_IP, attr(w.CTA_IP_V6_SRC, ip("fd00::2").packed),
                    attr(w.CTA_IP_V6_DST, ip("fd00::9").packed)),
               nest(w.CTA_TUPLE_PROTO, attr(w.CTA_PROTO_NUM, bytes([17])),
                    attr(w.CTA_PROTO_SRC_PORT, struct.pack(">H", 5353)),
                    attr(w.CTA_PROTO_DST_PORT, struct.pack(">H", 53))))
    assert w._tuple(memoryview(six)[4:]) == w.Tuple5(ip("fd00::2"), ip("fd00::9"), "udp",
                                                      5353, 53)


def test_events_over_the_rate_are_counted_without_being_read() -> None:
    log = _log(rate=2)
    assert log.room(300.0)
    for i in range(2):
        log.connection(_event(i), now=300.0)
    assert not log.room(300.0) and log.stats["suppressed"] == 1
    assert log.room(301.0)

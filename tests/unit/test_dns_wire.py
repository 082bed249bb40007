"""DNS wire format: parsing what clients send, building what they receive (dnspython is the
independent oracle), and fuzzing the parser and the server's answer path with hypothesis."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plexus.dns.config import DnsSettings, Upstream
from plexus.dns.records import RecordTable
from plexus.dns.server import DnsServer, _Forward
from plexus.dns.wire import (
    AA,
    QR,
    RA,
    RD,
    TC,
    Edns,
    QType,
    Rcode,
    WireError,
    address_rr,
    build_query,
    encode_name,
    error_response,
    labels_to_text,
    parse_message,
    parse_records,
    qtype_name,
    qtype_value,
    read_name,
    response,
    reverse_pointer,
    truncated_copy,
    valid_name,
)
from plexus.testing.dns import endpoint, network


def query(name: str, qtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, qtype, **kw).to_wire()  # type: ignore[arg-type]


# --- parsing --------------------------------------------------------------------------------


def test_parse_plain_query() -> None:
    msg = parse_message(query("Web.Example.", "AAAA"))
    assert msg.question is not None
    assert (msg.question.name, msg.question.qtype, msg.question.qclass) == ("web.example", 28, 1)
    assert msg.edns is None and msg.flags & RD and not msg.is_response
    assert msg.question.raw[:4] == b"\x03Web"  # case kept for the echo
    assert msg.udp_limit == 512


def test_parse_edns_with_options_and_do() -> None:
    wire = query("a.example", "A", use_edns=0, payload=4096, want_dnssec=True,
                 options=[dns.edns.GenericOption(10, b"\x01" * 8)])
    msg = parse_message(wire)
    assert msg.edns == Edns(4096, 0, True)
    assert msg.udp_limit == 1232  # never more than we advertise
    assert parse_message(query("a", "A", use_edns=0, payload=100)).udp_limit == 512
    assert msg.size == len(wire)


def test_parse_rejects_garbage() -> None:
    with pytest.raises(WireError) as short:
        parse_message(b"\x00\x01\x00")
    assert short.value.header is None
    with pytest.raises(WireError) as bad:
        parse_message(struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x05abc")
    assert bad.value.header == (7, 0x0100)
    with pytest.raises(WireError):
        parse_message(struct.pack("!HHHHHH", 7, 0, 2, 0, 0, 0) + encode_name("a") * 2)
    with pytest.raises(WireError):  # counts larger than the message
        parse_message(query("a") [:2] + b"\x01\x00\x00\x01\xff\xff\xff\xff\xff\xff"
                      + query("a")[12:])


def test_two_opt_records_are_a_format_error() -> None:
    wire = bytearray(query("a", "A", use_edns=0))
    opt = bytes(wire[-11:])
    wire[11] = 2
    with pytest.raises(WireError):
        parse_message(bytes(wire) + opt)


def test_compression_pointers_backwards_only() -> None:
    base = b"\x00" * 12 + b"\x03www\x07example\x00"
    labels, end = read_name(base + b"\x03foo\xc0\x10", len(base))
    assert labels == (b"foo", b"example") and end == len(base) + 6
    with pytest.raises(WireError):  # points at itself
        read_name(b"\x00" * 12 + b"\xc0\x0c", 12)
    with pytest.raises(WireError):  # points forward
        read_name(b"\x00" * 12 + b"\xc0\x0e\x00\x00", 12)
    # a two-step loop: 12 -> label, pointer at 16 back to 14, which is inside the label run
    with pytest.raises(WireError):
        read_name(b"\x00" * 12 + b"\x01a\x01b\xc0\x0e", 12)
    with pytest.raises(WireError):  # extended label type 0b01
        read_name(b"\x00" * 12 + b"\x41a\x00", 12)


def test_name_length_limits() -> None:
    long = ".".join(["a" * 63] * 4)
    with pytest.raises(ValueError):
        encode_name(long)
    assert valid_name(".".join(["a" * 63] * 3)) and not valid_name("a" * 64)
    wire = b"\x00" * 12 + b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"
    with pytest.raises(WireError):
        read_name(wire, 12)


def test_opaque_labels() -> None:
    assert labels_to_text([b"Web", b"EXAMPLE"]) == ("web.example", False)
    assert labels_to_text([b"a.b"])[1]
    assert labels_to_text([b"caf\xc3\xa9"])[1]
    assert labels_to_text([b"with space"])[1]
    assert labels_to_text([]) == ("", False)


def test_reverse_pointer() -> None:
    assert reverse_pointer("4.3.2.1.in-addr.arpa") == ipaddress.ip_address("1.2.3.4")
    v6 = ipaddress.ip_address("2001:db8::1")
    assert reverse_pointer(v6.reverse_pointer) == v6
    for bad in ("3.2.1.in-addr.arpa", "x.3.2.1.in-addr.arpa", "1.ip6.arpa",
                "300.3.2.1.in-addr.arpa", "example.com"):
        assert reverse_pointer(bad) is None


def test_qtype_names() -> None:
    assert qtype_name(28) == "AAAA" and qtype_name(999) == "TYPE999"
    assert qtype_value("aaaa") == 28 and qtype_value("TYPE999") == 999
    with pytest.raises(KeyError):
        qtype_value("NOPE")


# --- building -------------------------------------------------------------------------------


def test_response_is_what_dnspython_expects() -> None:
    msg = parse_message(query("Web", "A", use_edns=0, want_dnssec=True))
    wire = response(msg, Rcode.NOERROR, [address_rr(ipaddress.ip_address("10.0.0.1"), 5)])
    r = dns.message.from_wire(wire)
    assert r.id == msg.id and r.flags & dns.flags.QR and r.flags & dns.flags.AA
    assert r.flags & dns.flags.RD and r.flags & dns.flags.RA
    assert r.answer[0] == dns.rrset.from_text("Web.", 5, "IN", "A", "10.0.0.1")
    assert r.question[0].name.to_text() == "Web."  # the question's case is echoed
    assert r.edns == 0 and r.payload == 1232 and r.ednsflags & dns.flags.DO


def test_truncation_keeps_whole_records_and_sets_tc() -> None:
    msg = parse_message(query("many", "A"))
    answers = [address_rr(ipaddress.ip_address(f"10.0.{i // 250}.{i % 250}"), 5)
               for i in range(100)]
    wire = response(msg, Rcode.NOERROR, answers, limit=msg.udp_limit)
    assert len(wire) <= 512
    r = dns.message.from_wire(wire)
    assert r.flags & dns.flags.TC
    assert 0 < len(r.answer[0]) < 100
    full = dns.message.from_wire(response(msg, Rcode.NOERROR, answers))
    assert len(full.answer[0]) == 100 and not full.flags & dns.flags.TC


def test_badvers_and_error_responses() -> None:
    msg = parse_message(query("x", "A", use_edns=0))
    r = dns.message.from_wire(response(msg, Rcode.BADVERS, aa=False))
    assert r.rcode() == dns.rcode.BADVERS
    err = dns.message.from_wire(error_response(42, RD, Rcode.FORMERR))
    assert err.id == 42 and err.rcode() == dns.rcode.FORMERR and err.flags & dns.flags.RD


def test_truncated_copy_of_a_forwarded_answer() -> None:
    msg = parse_message(query("big.example", "TXT", use_edns=0))
    upstream = dns.message.make_response(dns.message.from_wire(query("big.example", "TXT")))
    cut = truncated_copy(upstream.to_wire(), msg)
    r = dns.message.from_wire(cut)
    assert r.flags & dns.flags.TC and not r.answer and r.edns == 0


def test_build_query_round_trips() -> None:
    wire = build_query("example.com", QType.MX, 99, edns=Edns(1232, 0, True))
    q = dns.message.from_wire(wire)
    assert q.id == 99 and q.question[0].rdtype == dns.rdatatype.MX and q.payload == 1232


def test_parse_records_of_a_real_response() -> None:
    q = dns.message.from_wire(query("example.com", "A"))
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("example.com.", 30, "IN", "CNAME", "www.example.com."))
    r.answer.append(dns.rrset.from_text("www.example.com.", 30, "IN", "A", "203.0.113.1"))
    r.answer.append(dns.rrset.from_text("www.example.com.", 30, "IN", "AAAA", "2001:db8::1"))
    r.answer.append(dns.rrset.from_text("example.com.", 30, "IN", "MX", "10 mx.example.com."))
    r.authority.append(dns.rrset.from_text("example.com.", 30, "IN", "SOA",
                                           "ns. host. 1 2 3 4 5"))
    r.additional.append(dns.rrset.from_text("example.com.", 30, "IN", "TXT", '"hi"'))
    msg, records = parse_records(r.to_wire())
    assert [str(x) for x in records] == [
        "example.com. 30 IN CNAME www.example.com.",
        "www.example.com. 30 IN A 203.0.113.1",
        "www.example.com. 30 IN AAAA 2001:db8::1",
        "example.com. 30 IN MX 10 mx.example.com.",
        "example.com. 30 IN SOA ns. host. 1 2 3 4 5",
        "example.com. 30 IN TXT 026869",
    ]
    assert msg.flags & QR


# --- fuzzing --------------------------------------------------------------------------------

_SERVER = DnsServer(RecordTable.build(
    [network("front", "10.1.0.0/24")],
    [endpoint(f"web{i}", "front", f"10.1.0.{10 + i}", aliases=["web"]) for i in range(5)],
    DnsSettings(upstreams=(Upstream(ipaddress.ip_address("203.0.113.1")),))))
_SEEDS = [
    query("web", "A"), query("web.front.plexus.internal", "AAAA", use_edns=0),
    query("10.0.1.10.in-addr.arpa", "PTR"), query("example.com", "MX", use_edns=0, payload=512),
    query("nope.plexus.internal", "ANY"), query("plexus.internal", "SOA"),
]


def _check_answer_path(data: bytes) -> None:
    """Whatever the bytes, the server's answer path returns bytes (a well-formed DNS message
    or nothing), a forwarding job, or None, and never raises."""
    view = _SERVER.table.view("front", "10.1.0.10")
    reply = _SERVER._prepare(data, view, udp=True, cache_key=data[2:])
    if isinstance(reply, bytes) and reply:
        parsed = parse_message(reply)  # our own output always parses...
        assert parsed.is_response
        if len(reply) >= 12 and parsed.question is not None:
            dns.message.from_wire(reply, question_only=True)  # ...and so says dnspython
    else:
        assert reply is None or reply == b"" or isinstance(reply, _Forward)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_parser_random_bytes_only_raise_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        parse_message(data)
    _check_answer_path(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "count"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
        elif op == "count" and len(data) >= 12:
            field = draw(st.sampled_from([4, 6, 8, 10]))
            data[field:field + 2] = struct.pack("!H", draw(st.integers(0, 0xFFFF)))
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_queries_never_crash_the_answer_path(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except WireError as exc:
        assert exc.header is None or len(data) >= 12
    else:
        assert msg.size <= len(data)
    _check_answer_path(data)


@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1,
                        max_size=63), max_size=4))
def test_name_encoding_round_trips(labels: list[str]) -> None:
    name = ".".join(labels)
    wire = b"\x00" * 12 + encode_name(name)
    got, end = read_name(wire, 12)
    assert labels_to_text(got) == (name, False) and end == len(wire)


def test_flag_constants_agree_with_dnspython() -> None:
    assert (QR, AA, TC, RD, RA) == (dns.flags.QR, dns.flags.AA, dns.flags.TC, dns.flags.RD,
                                    dns.flags.RA)

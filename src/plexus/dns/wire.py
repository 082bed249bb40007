"""DNS wire format: exactly what a container resolver that forwards everything else needs.

RFC 1035 §4 (messages, names, compression), RFC 6891 (EDNS0), RFC 7766 (TCP framing lives in
``server``). Everything here is pure and bounded:

- a name is at most 255 octets; compression pointers must point strictly before the previous
  jump target, so following them always terminates (and a hop limit stops the rest);
- every count in the header is checked against the bytes actually present, so a forged
  ``ARCOUNT=65535`` costs one failed read, not a loop;
- every failure is a ``WireError``; nothing else escapes ``parse_message`` (the fuzz tests hold
  it to that).

Names are handled as *lower-cased* (ASCII only, as DNS case-insensitivity is ASCII only) dotted
text without the trailing dot. A label that contains a dot or a byte outside printable ASCII
cannot be written that way, so such a question is marked ``opaque``: it never matches a
container and is simply forwarded as the bytes it was.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_U16 = struct.Struct("!H")
_SOA_FIXED = struct.Struct("!IIIII")

QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010
RCODE_MASK = 0x000F

CLASS_IN = 1
CLASS_ANY = 255
MAX_NAME = 255
MAX_LABEL = 63
MAX_HOPS = 64
MIN_UDP = 512
# The EDNS buffer size we advertise and the most we put in one UDP response: DNS flag day 2020's
# 1232, which fits in the IPv6 minimum MTU without fragmentation.
EDNS_UDP_SIZE = 1232
MAX_TCP_MESSAGE = 65535
QUESTION_OFFSET = 12  # a name pointer to the question's name is 0xC00C
_PTR_TO_QNAME = b"\xc0\x0c"
_OPT_FORMAT = struct.Struct("!BHHIH")  # root name, type OPT, class=size, ttl=ext, rdlen
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b != ord("."))  # label bytes dotted text can carry


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16  # EDNS extended rcode: upper 8 bits in the OPT record


class QType(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    HINFO = 13
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    NAPTR = 35
    DS = 43
    RRSIG = 46
    NSEC = 47
    DNSKEY = 48
    HTTPS = 65
    SVCB = 64
    OPT = 41
    AXFR = 252
    ANY = 255
    CAA = 257


_QTYPE_NAMES = {int(t): t.name for t in QType}
_RCODE_NAMES = {int(r): r.name for r in Rcode}


def qtype_name(value: int) -> str:
    """``A``, ``AAAA``, ... or RFC 3597's ``TYPE1234`` for the rest (a bounded label set)."""
    return _QTYPE_NAMES.get(value, f"TYPE{value}")


def qtype_value(name: str) -> int:
    """The inverse of ``qtype_name``; raises ValueError for an unknown mnemonic."""
    upper = name.upper()
    if upper.startswith("TYPE") and upper[4:].isdigit():
        return int(upper[4:]) & 0xFFFF
    return int(QType[upper])


def rcode_name(value: int) -> str:
    return _RCODE_NAMES.get(value, f"RCODE{value}")


class WireError(ValueError):
    """A message that cannot be parsed. ``header`` is (id, flags) when at least the header was
    readable, so that a FORMERR can be sent back; None means: drop it silently."""

    def __init__(self, reason: str, header: tuple[int, int] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header


@dataclass(frozen=True, slots=True)
class Edns:
    udp_size: int
    version: int = 0
    do: bool = False

    @property
    def limit(self) -> int:
        """How large a UDP response to this requester may be."""
        return max(MIN_UDP, min(self.udp_size, EDNS_UDP_SIZE))


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower-cased, dotted, no trailing dot; "" is the root
    qtype: int
    qclass: int
    raw: bytes  # the question as sent (name as written + type + class), echoed in responses
    opaque: bool = False  # a label that dotted text cannot carry (see the module docstring)


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    flags: int
    question: Question | None
    edns: Edns | None
    counts: tuple[int, int, int, int]
    size: int = 0  # bytes the message occupies (anything after it is trailing garbage)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK

    @property
    def udp_limit(self) -> int:
        return MIN_UDP if self.edns is None else self.edns.limit


# --- names -----------------------------------------------------------------------------------


def read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Labels of the (possibly compressed) name at ``offset`` and the offset just after it."""
    labels: list[bytes] = []
    total = 1
    after = -1
    floor = offset  # every pointer must land strictly below the last place we jumped to
    hops = 0
    size = len(data)
    while True:
        if offset >= size:
            raise WireError("name runs past the end of the message")
        length = data[offset]
        if length == 0:
            return tuple(labels), (offset + 1 if after < 0 else after)
        kind = length & 0xC0
        if kind == 0xC0:
            if offset + 1 >= size:
                raise WireError("truncated compression pointer")
            target = ((length & 0x3F) << 8) | data[offset + 1]
            if after < 0:
                after = offset + 2
            hops += 1
            if target >= floor or hops > MAX_HOPS:
                raise WireError("compression pointer loops or points forward")
            floor = offset = target
            continue
        if kind:
            raise WireError("unknown label type")
        end = offset + 1 + length
        if end > size:
            raise WireError("label runs past the end of the message")
        total += length + 1
        if total > MAX_NAME:
            raise WireError("name longer than 255 octets")
        labels.append(data[offset + 1 : end])
        offset = end


def labels_to_text(labels: Sequence[bytes]) -> tuple[str, bool]:
    """(lower-cased dotted name, opaque) — see the module docstring for ``opaque``."""
    opaque = any(label.translate(None, _PLAIN) for label in labels)
    return b".".join(labels).lower().decode("latin-1"), opaque


def encode_name(name: str) -> bytes:
    """Dotted text (trailing dot optional) to uncompressed wire form; ValueError if it cannot."""
    name = name.rstrip(".") if name != "." else ""
    out = bytearray()
    if name:
        for label in name.split("."):
            raw = label.encode("ascii")
            if not raw or len(raw) > MAX_LABEL:
                raise ValueError(f"bad label {label!r} in {name!r}")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name {name!r} is longer than 255 octets")
    return bytes(out)


def valid_name(name: str) -> bool:
    try:
        encode_name(name)
    except (ValueError, UnicodeEncodeError):
        return False
    return True


def reverse_pointer(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a full in-addr.arpa / ip6.arpa name stands for, or None."""
    try:
        if name.endswith(".in-addr.arpa"):
            parts = name[: -len(".in-addr.arpa")].split(".")
            if len(parts) == 4 and all(p.isdigit() and len(p) <= 3 for p in parts):
                return ipaddress.IPv4Address(".".join(reversed(parts)))
        elif name.endswith(".ip6.arpa"):
            nibbles = name[: -len(".ip6.arpa")].split(".")
            if len(nibbles) == 32 and all(len(n) == 1 for n in nibbles):
                return ipaddress.IPv6Address(int("".join(reversed(nibbles)), 16))
    except ValueError:
        return None
    return None


# --- parsing ---------------------------------------------------------------------------------


def _skip_rr(data: bytes, offset: int) -> tuple[int, int, int, int]:
    """(offset after the RR, type, class, ttl) — the RR's owner name is read, then skipped."""
    _, offset = read_name(data, offset)
    if offset + 10 > len(data):
        raise WireError("resource record header runs past the end")
    rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, offset)
    end = offset + 10 + rdlen
    if end > len(data):
        raise WireError("rdata runs past the end")
    return end, rtype, rclass, ttl


def parse_message(data: bytes) -> Message:
    """Parse a query (or the header and question of a response). Raises WireError."""
    if len(data) < HEADER.size:
        raise WireError("shorter than a DNS header")
    ident, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    header = (ident, flags)
    try:
        question, offset = _parse_question(data, qd)
        edns = None
        for index in range(an + ns + ar):
            start = offset
            offset, rtype, rclass, ttl = _skip_rr(data, offset)
            if rtype == QType.OPT and index >= an + ns:
                if edns is not None or data[start] != 0:
                    raise WireError("more than one OPT record, or one not owned by the root")
                edns = Edns(rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000))
    except WireError as exc:
        raise WireError(exc.reason, header) from None
    return Message(ident, flags, question, edns, (qd, an, ns, ar), offset)


def _parse_question(data: bytes, qd: int) -> tuple[Question | None, int]:
    if qd == 0:
        return None, HEADER.size
    if qd > 1:
        raise WireError("more than one question")  # RFC 9619
    labels, offset = read_name(data, HEADER.size)
    if offset + 4 > len(data):
        raise WireError("question runs past the end")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    name, opaque = labels_to_text(labels)
    raw = data[HEADER.size : offset + 4]
    return Question(name, qtype, qclass, raw, opaque), offset + 4


# --- building --------------------------------------------------------------------------------


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = CLASS_IN) -> bytes:
    """One resource record; ``owner`` is a wire name (or the 0xC00C pointer to the question)."""
    return owner + _RR_FIXED.pack(rtype, rclass, ttl & 0xFFFFFFFF, len(rdata)) + rdata


def address_rr(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ttl: int) -> bytes:
    rtype = QType.A if ip.version == 4 else QType.AAAA
    return rr(_PTR_TO_QNAME, rtype, ttl, ip.packed)


def ptr_rr(target: str, ttl: int) -> bytes:
    return rr(_PTR_TO_QNAME, QType.PTR, ttl, encode_name(target))


def soa_rr(zone: str, ttl: int, serial: int) -> bytes:
    """A synthetic SOA for ``zone``: its MINIMUM (and TTL) bound how long resolvers may cache a
    negative answer (RFC 2308), so both follow the record TTL."""
    rdata = (
        encode_name(f"ns.{zone}" if zone else "ns")
        + encode_name(f"hostmaster.{zone}" if zone else "hostmaster")
        + _SOA_FIXED.pack(serial & 0xFFFFFFFF, 3600, 600, 86400, ttl)
    )
    return rr(encode_name(zone), QType.SOA, ttl, rdata)


def opt_rr(do: bool, ext_rcode: int = 0) -> bytes:
    ttl = (ext_rcode << 24) | (0x8000 if do else 0)
    return _OPT_FORMAT.pack(0, QType.OPT, EDNS_UDP_SIZE, ttl, 0)


def response(
    query: Message,
    rcode: int,
    answers: Sequence[bytes] = (),
    authority: Sequence[bytes] = (),
    *,
    aa: bool = True,
    ra: bool = True,
    limit: int = MAX_TCP_MESSAGE,
) -> bytes:
    """A response to ``query``: the question echoed, the records that fit in ``limit`` bytes.

    When not every answer fits, TC is set and the answers that did fit are kept (resolvers that
    cannot fall back to TCP, such as older musl, still get something usable); the authority
    section is dropped then. An OPT record is added when the query had one (RFC 6891 §7).
    """
    q = query.question
    flags = QR | (query.flags & (OPCODE_MASK | RD | CD))
    flags |= (AA if aa else 0) | (RA if ra else 0)
    opt = b""
    if query.edns is not None:
        opt = opt_rr(query.edns.do, rcode >> 4)
    body = bytearray(HEADER.size)
    if q is not None:
        body += q.raw
    budget = limit - len(body) - len(opt)
    kept = _fit(answers, budget)
    truncated = kept < len(answers)
    auth: Sequence[bytes] = ()
    if not truncated:
        used = sum(len(a) for a in answers)
        if used + sum(len(a) for a in authority) <= budget:
            auth = authority
    for a in answers[:kept]:
        body += a
    for a in auth:
        body += a
    body += opt
    flags |= (TC if truncated else 0) | (rcode & RCODE_MASK)
    HEADER.pack_into(body, 0, query.id, flags, 1 if q else 0, kept, len(auth), 1 if opt else 0)
    return bytes(body)


def _fit(records: Sequence[bytes], budget: int) -> int:
    used = 0
    for index, record in enumerate(records):
        used += len(record)
        if used > budget:
            return index
    return len(records)


def error_response(ident: int, flags: int, rcode: int, question: bytes = b"") -> bytes:
    """A bare error response (FORMERR, NOTIMP, ...) from a header we could at least read."""
    out = QR | (flags & (OPCODE_MASK | RD | CD)) | RA | (rcode & RCODE_MASK)
    return HEADER.pack(ident, out, 1 if question else 0, 0, 0, 0) + question


def truncated_copy(message: bytes, query: Message) -> bytes:
    """A forwarded response that is too large for the requester's UDP buffer, cut down to the
    header (with TC) and the question, so that the requester retries over TCP."""
    _, flags, *_ = HEADER.unpack_from(message)
    q = query.question.raw if query.question else b""
    opt = opt_rr(query.edns.do) if query.edns is not None else b""
    return HEADER.pack(query.id, flags | TC, 1 if q else 0, 0, 0, 1 if opt else 0) + q + opt


def with_id(message: bytes, ident: int) -> bytes:
    return _U16.pack(ident) + message[2:]


def message_id(message: bytes) -> int:
    return int(_U16.unpack_from(message)[0])


def build_query(name: str, qtype: int, ident: int = 0, *, rd: bool = True,
                edns: Edns | None = None, qclass: int = CLASS_IN) -> bytes:
    """A query, for health checks, ``lookup`` and tests."""
    ar = 0 if edns is None else 1
    out = HEADER.pack(ident, RD if rd else 0, 1, 0, 0, ar)
    out += encode_name(name) + struct.pack("!HH", qtype, qclass)
    if edns is not None:
        out += _OPT_FORMAT.pack(0, QType.OPT, edns.udp_size,
                                (edns.version << 16) | (0x8000 if edns.do else 0), 0)
    return out


# --- reading records (for ``lookup`` and for tests) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    section: str  # "answer", "authority", "additional"
    name: str
    rtype: int
    ttl: int
    data: str  # presentation form for the common types, hex for the rest

    def __str__(self) -> str:
        return f"{self.name or '.'}. {self.ttl} IN {qtype_name(self.rtype)} {self.data}"


def parse_records(data: bytes) -> tuple[Message, list[Record]]:
    """Every record of a response, in presentation form (OPT excluded)."""
    msg = parse_message(data)
    _, an, ns, ar = msg.counts
    offset = HEADER.size + (len(msg.question.raw) if msg.question else 0)
    records: list[Record] = []
    sections = ["answer"] * an + ["authority"] * ns + ["additional"] * ar
    for section in sections:
        labels, after_name = read_name(data, offset)
        end, rtype, _, ttl = _skip_rr(data, offset)
        if rtype != QType.OPT:
            rdata_at = after_name + 10
            text = _rdata_text(data, rtype, rdata_at, end)
            records.append(Record(section, labels_to_text(labels)[0], rtype, ttl, text))
        offset = end
    return msg, records


def _rdata_text(data: bytes, rtype: int, start: int, end: int) -> str:
    rdata = data[start:end]
    try:
        if rtype == QType.A and len(rdata) == 4:
            return str(ipaddress.IPv4Address(rdata))
        if rtype == QType.AAAA and len(rdata) == 16:
            return str(ipaddress.IPv6Address(rdata))
        if rtype in (QType.CNAME, QType.PTR, QType.NS):
            return _name_at(data, start) + "."
        if rtype == QType.MX:
            return f"{_U16.unpack_from(data, start)[0]} {_name_at(data, start + 2)}."
        if rtype == QType.SOA:
            mname, at = read_name(data, start)
            rname, at = read_name(data, at)
            fixed = _SOA_FIXED.unpack_from(data, at)
            names = f"{labels_to_text(mname)[0]}. {labels_to_text(rname)[0]}."
            return f"{names} {' '.join(str(v) for v in fixed)}"
    except (WireError, struct.error, ValueError):
        pass
    return rdata.hex()


def _name_at(data: bytes, offset: int) -> str:
    return labels_to_text(read_name(data, offset)[0])[0]


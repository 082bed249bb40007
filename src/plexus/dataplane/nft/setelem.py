"""Set and map element changes sent to nf_tables over netlink directly, as one transaction.

Why not libnftables (measured, bench/policy.py, 1,000 policies): before it runs any command,
libnftables fills its cache from the kernel: every chain of the table (3,000 with 1,000
policies), every named object (3,000 counters) and the elements of its interval sets. A batch
of one element then costs 5-20 ms, a label change's 4,000 elements 40 ms, almost none of it
the elements. An element delta needs none of that cache: its set, key and data are known. So
deltas go here, as ``NFT_MSG_NEWSETELEM``/``NFT_MSG_DELSETELEM`` messages between
``NFNL_MSG_BATCH_BEGIN`` and ``_END``: one nf_tables transaction, applied whole or not at all,
as a libnftables batch is. Declarations, chains and whole tables stay with libnftables.

Encoding (include/uapi/linux/netfilter/nf_tables.h; checked against ``nft -j list`` in
tests/integration/test_nft_setelem.py):
- A key field is padded to 4 bytes (an nft register) when the key is a concatenation; a single
  field is its own size. ``mark`` is a host-order u32 (big-endian in an interval set, whose
  backend compares keys bytewise: read back wrong otherwise), ``inet_proto`` one byte,
  ``inet_service`` a big-endian u16, addresses in network order.
- An interval map keyed by a concatenation (the kernel's pipapo backend) takes an element as
  its first key and ``NFTA_SET_ELEM_KEY_END``, the last; a non-range field has the same value
  in both. Single-field interval sets (rbtree: start and end elements, merged by libnftables)
  are not written here: ``writable`` says which sets are.
- An attribute's length is 16 bits, so one message carries at most ``CHUNK`` elements.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plexus.dataplane import netns
from plexus.errors import DataplaneError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_DESTROYSETELEM = 12, 14, 30
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
# Attributes: the element list, an element, data and verdicts.
LIST_TABLE, LIST_SET, LIST_ELEMENTS, LIST_ELEM = 1, 2, 3, 1
ELEM_KEY, ELEM_DATA, ELEM_KEY_END = 1, 2, 10
DATA_VALUE, DATA_VERDICT = 1, 2
VERDICT_CODE, VERDICT_CHAIN = 1, 2
NF_ACCEPT, NFT_RETURN, NFT_GOTO = 1, -5, -4
FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1}
CHUNK = 400  # elements per message: 400 x ~80 bytes stays under a 64 KiB attribute
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h (not in Python's socket)
SNDBUF = 64 << 20  # a batch travels in one datagram: room for ~500k elements
TIMEOUT = 30.0

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_BE32 = struct.Struct(">I")
_VERDICT = struct.Struct(">i")
_BE16 = struct.Struct(">H")

VERDICTS = {"return": NFT_RETURN, "accept": NF_ACCEPT}  # data of a verdict map; else a chain


@dataclass(frozen=True, slots=True)
class SetType:
    """What a set's elements are: key field types, and the data (None: a plain set;
    "verdict"; a value type such as "mark"; or a concatenation of them)."""

    key: tuple[str, ...]
    data: str | tuple[str, ...] | None = None
    interval: bool = False

    @property
    def writable(self) -> bool:
        return not self.interval or len(self.key) > 1


# -- encoding (pure) ---------------------------------------------------------------------------


def _attr(kind: int, value: bytes) -> bytes:
    raw = _ATTR.pack(_ATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _field(kind: str, value: object, interval: bool = False) -> bytes:
    if kind == "mark":  # host order, but big-endian in an interval set (compared bytewise)
        return (_BE32 if interval else _U32).pack(int(value))  # type: ignore[call-overload]
    if kind == "inet_proto":
        return bytes([PROTOCOLS[value] if isinstance(value, str) else int(value)])  # type: ignore[call-overload]
    if kind == "inet_service":
        return _BE16.pack(int(value))  # type: ignore[call-overload]
    if kind in ("ipv4_addr", "ipv6_addr"):
        return _packed(value)
    if kind == "raw96":
        return _raw96(value)
    raise DataplaneError(f"no netlink encoding for set field type {kind!r}")


def key_bytes(t: SetType, key: object, end: bool = False) -> bytes:
    """The key (or, ``end``, the interval's last key) as the kernel compares it."""
    values = key if isinstance(key, tuple) else (key,)
    if len(values) != len(t.key):
        raise DataplaneError(f"key {key!r} does not have the fields {t.key}")
    if len(values) == 1:
        return _field(t.key[0], _end(values[0], end), t.interval)
    out = b""
    for kind, value in zip(t.key, values, strict=True):
        raw = _field(kind, _end(value, end), t.interval)
        out += raw + b"\0" * (-len(raw) % 4)
    return out


def _end(value: object, end: bool) -> object:
    """A range field (anything with ``first`` and ``last``, e.g. ``policy.cells.PortRange``)
    gives its first value to the key and its last to the key's end."""
    if hasattr(value, "first") and hasattr(value, "last"):
        return value.last if end else value.first
    return value


def _data(t: SetType, data: object) -> bytes:
    if t.data == "verdict":
        verdict = str(data)
        if verdict in VERDICTS:
            return _nest(DATA_VERDICT, _attr(VERDICT_CODE, _VERDICT.pack(VERDICTS[verdict])))
        return _nest(DATA_VERDICT, _attr(VERDICT_CODE, _VERDICT.pack(NFT_GOTO)),
                     _attr(VERDICT_CHAIN, verdict.encode() + b"\0"))
    assert t.data is not None
    if isinstance(t.data, str):
        return _attr(DATA_VALUE, _field(t.data, data))
    return _attr(DATA_VALUE, key_bytes(SetType(t.data), data))


def element(t: SetType, key: object, data: object, with_data: bool) -> bytes:
    parts = [_nest(ELEM_KEY, _attr(DATA_VALUE, key_bytes(t, key)))]
    if t.interval:
        parts.append(_nest(ELEM_KEY_END, _attr(DATA_VALUE, key_bytes(t, key, end=True))))
    if with_data and t.data is not None:
        parts.append(_nest(ELEM_DATA, _data(t, data)))
    return _nest(LIST_ELEM, *parts)


# The hot path: a label change writes thousands of elements, and building each from nested
# attributes cost ~4 us (15 ms for 4,000, measured). A fixed-size key and value make every
# attribute length a constant, so one struct per set type packs a whole element at once.
# Multi-byte big-endian fields are byte-swapped first and packed in host order.
_FIELDS: dict[str, tuple[str, str, Callable[[Any], Any] | None]] = {
    # type -> (struct code alone, in a concatenation, converter; None: the value as it is)
    "mark": ("I", "I", None),
    "inet_proto": ("B", "B3x", lambda v: PROTOCOLS[v] if isinstance(v, str) else int(v)),
    "inet_service": ("H", "H2x", lambda v: socket.htons(int(v))),
    "ipv4_addr": ("4s", "4s", lambda v: _packed(v)),
    "ipv6_addr": ("16s", "16s", lambda v: _packed(v)),
    "raw96": ("12s", "12s", lambda v: _raw96(v)),  # 96 bits of a header (``@nh,96,96``)
}
Packer = Callable[[Any, Any], bytes]


def _raw96(value: Any) -> bytes:
    """12 bytes as the packet holds them: bytes, or a number as nft lists them (big-endian)."""
    if isinstance(value, bytes):
        return value
    # nft lists such a key as a number while it fits 64 bits, else as a hex string
    number = int(value, 0) if isinstance(value, str) else int(value)
    return number.to_bytes(12, "big")


def _packed(address: Any) -> bytes:
    if isinstance(address, bytes):  # packed already
        return address
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return address.packed
    return ipaddress.ip_address(address).packed


def _layout(fields: tuple[str, ...]) -> tuple[str, int, list[Callable[[Any], Any] | None]]:
    """Struct codes of a key or data value, its attribute's length (header included) and the
    converter of each field."""
    codes = "".join(str(_FIELDS[k][0 if len(fields) == 1 else 1]) for k in fields)
    return codes, _ATTR.size + struct.calcsize("=" + codes), [_FIELDS[k][2] for k in fields]


def _data_fields(t: SetType, with_data: bool) -> tuple[str, ...]:
    if not with_data or t.data is None:
        return ()
    return (t.data,) if isinstance(t.data, str) else t.data


@functools.cache
def _packer(t: SetType, with_data: bool) -> Packer | None:
    dfields = _data_fields(t, with_data)
    if any(k not in _FIELDS for k in (*t.key, *dfields)):  # verdicts: ``element``
        return None
    codes, value, convert = _layout(t.key)
    pad = -value % 4
    nest = _ATTR.size + value + pad
    keys = 2 if t.interval else 1
    dcodes, dvalue, dconvert = _layout(dfields) if dfields else ("", 0, [])
    dpad = -dvalue % 4
    dnest = _ATTR.size + dvalue + dpad if dfields else 0
    packer = struct.Struct("=HH" + f"HHHH{codes}{pad}x" * keys +
                           (f"HHHH{dcodes}{dpad}x" if dfields else ""))
    head = (_ATTR.size + nest * keys + dnest, LIST_ELEM | NLA_F_NESTED,
            nest, ELEM_KEY | NLA_F_NESTED, value, DATA_VALUE)
    data_head = (dnest, ELEM_DATA | NLA_F_NESTED, dvalue, DATA_VALUE) if dfields else ()
    single, dsingle = len(t.key) == 1, len(dfields) == 1

    def data_values(data: Any) -> list[Any]:
        values = (data,) if dsingle else data
        return [v if c is None else c(v) for c, v in zip(dconvert, values, strict=True)]

    if t.interval:
        return _interval_packer(t, packer, head, data_head, nest, value, data_values)
    fixed = (*head,)

    def converted(key: Any) -> Any:
        raw = (key,) if single else key
        return [v if c is None else c(v) for c, v in zip(convert, raw, strict=True)]

    # Marks only: as they are (a full sync packs 100,000 slots).
    values: Callable[[Any], Any] = tuple if all(c is None for c in convert) and not single \
        else converted
    if not dfields:
        return lambda key, data: packer.pack(*fixed, *values(key))
    if dsingle and dconvert[0] is None:
        return lambda key, data: packer.pack(*fixed, *values(key), *data_head, data)
    return lambda key, data: packer.pack(*fixed, *values(key), *data_head, *data_values(data))


def _interval_packer(t: SetType, packer: struct.Struct, head: tuple[int, ...],
                     data_head: tuple[int, ...], nest: int, value: int,
                     data_values: Callable[[Any], list[Any]]) -> Packer:
    """Ranges and big-endian marks (``_field``): the rarer, slower case."""
    convert = [(lambda v: socket.htonl(int(v))) if k == "mark" else _FIELDS[k][2]
               for k in t.key]
    end_head = (nest, ELEM_KEY_END | NLA_F_NESTED, value, DATA_VALUE)

    def pack(key: Any, data: Any) -> bytes:
        values = key if isinstance(key, tuple) else (key,)
        first = [v if c is None else c(v) for c, v in
                 zip(convert, (_end(v, False) for v in values), strict=True)]
        last = [v if c is None else c(v) for c, v in
                zip(convert, (_end(v, True) for v in values), strict=True)]
        return packer.pack(*head, *first, *end_head, *last,
                           *data_head, *(data_values(data) if data_head else ()))

    return pack


def _message(kind: int, flags: int, seq: int, family: int, body: bytes, res: int = 0) -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(res)) + body
    return _HDR.pack(_HDR.size + len(payload), kind, flags, seq, 0) + payload


@dataclass(frozen=True, slots=True)
class Change:
    """Elements to delete (``add`` False) or add in one set. ``how``: "flush" deletes every
    element of the set (``elements`` ignored); "destroy" deletes those of ``elements`` that
    exist (a delete of a missing element fails the whole transaction; needs kernel 6.3)."""

    set: str
    type: SetType
    add: bool
    elements: Mapping[object, object]  # key -> data (ignored for a delete or a plain set)
    how: str = ""


def batch(family: str, table: str, changes: Sequence[Change], first_seq: int) -> tuple[
        bytes, list[int]]:
    """The datagram of one transaction, and the sequence numbers that expect an answer."""
    fam = FAMILIES[family]
    seq = first_seq
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, b"", NFNL_SUBSYS_NFTABLES)]
    seqs: list[int] = []
    head = _attr(LIST_TABLE, table.encode() + b"\0")
    for ch in changes:
        set_head = head + _attr(LIST_SET, ch.set.encode() + b"\0")
        if ch.how == "flush":  # a delete naming no element empties the set
            seq += 1
            out.append(_message(_kind(NFT_MSG_DELSETELEM), NLM_F_REQUEST | NLM_F_ACK, seq, fam,
                                set_head))
            seqs.append(seq)
            continue
        msg = NFT_MSG_NEWSETELEM if ch.add else \
            NFT_MSG_DESTROYSETELEM if ch.how == "destroy" else NFT_MSG_DELSETELEM
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if ch.add else 0)
        with_data = ch.add and ch.type.data is not None
        pack = _packer(ch.type, with_data) or functools.partial(element, ch.type,
                                                                 with_data=with_data)
        for part in _chunks(list(ch.elements.items()), CHUNK):
            seq += 1
            elems = b"".join([pack(k, d) for k, d in part])
            out.append(_message(_kind(msg), flags, seq, fam,
                                set_head + _nest(LIST_ELEMENTS, elems)))
            seqs.append(seq)
    seq += 1
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, b"", NFNL_SUBSYS_NFTABLES))
    return b"".join(out), seqs


def _kind(msg: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | msg


def _chunks(items: list[tuple[object, object]], size: int) -> Iterator[
        list[tuple[object, object]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def answers(data: bytes) -> Iterator[tuple[int, int]]:
    """(sequence number, errno) of every acknowledgement or error in ``data``."""
    pos = 0
    while pos + _HDR.size <= len(data):
        length, kind, _, seq, _ = _HDR.unpack_from(data, pos)
        if length < _HDR.size:
            break
        if kind == NLMSG_ERROR and length >= _HDR.size + 4:
            yield seq, -struct.unpack_from("=i", data, pos + _HDR.size)[0]
        pos += (length + 3) & ~3


# -- the channel -----------------------------------------------------------------------------


class ElementChannel:
    """One NETLINK_NETFILTER socket in one namespace; ``send`` blocks (run it off the loop)."""

    def __init__(self, netns_path: str | None = None) -> None:
        def make() -> socket.socket:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)

        self._sock = make() if netns_path is None else netns.run_in_netns(netns_path, make)
        self._sock.settimeout(TIMEOUT)
        for forced, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF),
                              (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, forced, SNDBUF)
            except OSError:  # without CAP_NET_ADMIN: up to the system's limit
                self._sock.setsockopt(socket.SOL_SOCKET, plain, SNDBUF)
        self._sock.bind((0, 0))
        self._seq = int.from_bytes(os.urandom(2), "big") << 8

    def send(self, family: str, table: str, changes: Iterable[Change]) -> None:
        """One transaction; DataplaneError, naming the set, if the kernel refuses it."""
        todo = [c for c in changes if c.elements or c.how == "flush"]
        if not todo:
            return
        data, seqs = batch(family, table, todo, self._seq)
        self._seq = (self._seq + len(seqs) + 2) % 0x7FFF0000
        self._drain()
        try:
            self._sock.send(data)
        except OSError as exc:
            raise DataplaneError(f"nftables element batch not sent: {exc.strerror}") from exc
        self._wait(seqs, todo)

    def _drain(self) -> None:
        """Answers left from an earlier batch (one that failed midway) are not this one's."""
        for _ in range(1024):  # bounded
            if not self._pending():
                return
            self._sock.recv(1 << 20)

    def _pending(self) -> bool:
        """An answer waits to be read (the socket has a timeout: a read would wait for one)."""
        return bool(select.select([self._sock], [], [], 0)[0])

    def _wait(self, seqs: list[int], todo: list[Change]) -> None:
        """Every message of the batch is answered (an error, or the acknowledgement asked
        for), all at the end of the batch: read them all, so that none is left for the next
        batch to mistake for its own; the first error is the batch's."""
        waiting = set(seqs)
        first = seqs[0]
        error: tuple[int, int] | None = None
        for _ in range(len(seqs) + 64):
            if error is not None and not self._pending():
                break  # after an error, what did not come will not
            try:
                data = self._sock.recv(1 << 20)
            except OSError as exc:
                raise DataplaneError(f"no answer to an nftables element batch: {exc}") from exc
            for seq, code in answers(data):
                if seq not in waiting:
                    continue  # not this batch's
                waiting.discard(seq)
                if code and error is None:
                    error = (seq, code)
            if not waiting:
                break
        if error is not None:
            seq, code = error
            raise DataplaneError(f"nftables refused elements of set {_set_of(todo, seq - first)}: "
                                 f"{os.strerror(code)} ({errno.errorcode.get(code)})")
        if waiting:
            raise DataplaneError("nftables element batch: acknowledgements missing")

    def close(self) -> None:
        self._sock.close()


def _set_of(todo: list[Change], index: int) -> str:
    """The set of the ``index``-th message of a batch."""
    for ch in todo:
        n = 1 if ch.how == "flush" else -(-len(ch.elements) // CHUNK)
        if index < n:
            return ch.set
        index -= n
    return "?"

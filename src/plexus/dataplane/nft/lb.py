"""Services in the kernel: ``table inet plexus_services``. Pure renderers: the table's fixed
body and its few shared chains in nft's syntax, and the map elements of one placed frontend
(``lb_slots.Placed``). The applier is ``lb_table.ServiceTable``.

Layout: data in maps, a fixed set of chains (checked on kernel 6.18, nft 1.0.6)
-------------------------------------------------------------------------------
No chain belongs to a service. Before any batch, libnftables lists every chain of the ruleset
into its cache, whatever table the batch is for: with a chain per service (kube-proxy's
nftables layout, and this table's first one), 10,000 services made every nft batch on the host
cost 30-37 ms, in every table, and a full sync 11.8 s (bench/services.py). So a frontend is
only elements, written over netlink (``setelem``), and a packet finds its backend through maps:

1. ``services`` (nat prerouting and output, priority -110): ``vips4``/``vips6`` map
   ``daddr . l4proto . dport`` to the frontend's number ``F`` in ``meta mark``
   (``ports4``/``ports6``: ``l4proto . dport`` for ports published on every local address),
   then ``meta mark & 0x3fff vmap @pick``.
2. ``F`` is ``OURS | id << 14 | class << 10 | (N - 1)``: the frontend's id, its client-IP
   affinity class (0: none; each distinct timeout has one) and its number of backends N. The
   low 14 bits lead, through ``pick``, to one chain per (N, class) in use: ``pick_N`` or
   ``pick_N_aff_T``, made when first needed and shared by every frontend of that shape.
3. ``pick_N`` draws ``numgen random mod N`` into ``ct mark``, maps ``id . draw`` through
   ``slots`` to the backend's number B (in ``ct mark`` again), and DNATs to
   ``backends4``/``backends6``'s B: address . port.
4. ``pick_N_aff_T`` first asks ``aff4``/``aff6`` (``id . saddr`` to B, timeout T, written by the
   packet path) for the client's backend, refreshes the entry and DNATs there; a client it does
   not know (or whose backend is gone) gets slot ``jhash(saddr) mod N`` (so that its first
   connections, sent at once before the entry exists, agree) and is remembered. A gone backend's
   entries are deleted by the applier after the change. An IPv6 client is keyed by the last 96
   bits of its address (``@nh,96,96``), not all 128: nft 1.0.6 gives a map update whose key is
   longer than 16 bytes a data register that overlaps the key's tail (checked with
   ``--debug=netlink``: ``id . ip6 saddr`` was stored with its last 4 bytes replaced by B, so no
   lookup ever matched). Two clients that differ only in their first 32 bits share one entry (one
   backend), nothing worse.

A new connection to a service costs a handful of hash lookups (two in ``vips``, ``pick``,
``slots``, ``backends``; with affinity ``aff`` too) whatever the number of services or backends
(kube-proxy's nftables mode: one vmap, one numgen vmap; its iptables mode walks a chain per
service); a new connection that is no service's, the misses of ``vips``/``ports``/``noep``
(the route lookup of ``fib daddr type local`` only after a hit). Only the first packet of a
connection passes NAT chains, and the refusal chain sees new connections only.

Why two registers, and why marks: a map key that concatenates ``numgen`` must be declared
``typeof``, and the rule that writes ``aff4`` from the packet path has no JSON form in nft
1.0.6 (so the body is written in nft's syntax); with the draw first stored in ``ct mark``, every
map has a plain type. ``meta mark`` and ``ct mark`` are scratch here, as in ``table inet
plexus_policy`` (which sets both itself later, in forward): ``unmark_prerouting`` and
``unmark_output`` (filter, priority -90: after NAT, before the routing decision of a forwarded
packet) zero them on a packet that carries ``OURS``. A locally sent first packet is routed
again by NAT with ``F`` as its mark: a host whose policy routing matches marks with bit 31 set
would see it.

Numbers: ids are 17 bits (131,071 frontends: a service has one per port and family), N at most
1,024 (a frontend with more backends uses the first 1,024 in address order), 15 distinct
affinity timeouts, backend numbers 32 bits and never reused between two full writes of the
table (which empty the affinity maps), so an affinity entry never leads to a newcomer.

No backends: the frontend's keys go to the sets ``noep4``/``noep6`` and
``noports4``/``noports6``; ``filter_prerouting``/``filter_output`` (priority -110) send them to
``refuse``: TCP RST, ICMP port unreachable, at once instead of a timeout.

Hairpin (a backend, or a neighbour on its bridge, calling the service): the answer must come
back through the host to be un-DNATed, so such a connection is masqueraded; ``table inet
plexus`` does it for every DNATed connection whose source lies in a subnet of the bridge it
leaves by (its ``bridge_nets`` sets, the same rule that serves published ports). This table
needs no element per backend for it (it had one, 100,000 of them at 10,000 services x 10). With
br_netfilter on, a backend drawn for itself needs hairpin mode on its bridge port (the link
layer's job, as for published ports).

A connection to a VIP (not a local address) gets ct label 65 (``render.VIA_VIP``), so that
``table inet plexus`` applies isolation between networks to it as to a direct connection.
Loopback destinations are never DNATed for published ports (the reply could not come back).
DNAT happens in prerouting, so ``table inet plexus_policy`` (forward) judges the backend.

The trap of the host reaching a VIP: a host socket routes *before* the output hook runs, so
``connect()`` to a VIP without any route fails at once with ENETUNREACH and no rule ever sees
the packet. The host's default route covers the service range (the output chain then DNATs and
the kernel routes again); a host without one needs a route to the range.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

from plexus.dataplane.nft.render import VIA_VIP
from plexus.dataplane.nft.setelem import SetType
from plexus.lb.model import Frontend
from plexus.model.types import IPAddress

TABLE = "plexus_services"
FAMILY = "inet"
PRIO_DSTNAT, PRIO_FILTER, PRIO_UNMARK = -110, -110, -90
LAYOUT = "layout_2"  # an empty chain naming this layout: a table without it is replaced whole

# The frontend number F in meta mark (see the module notes).
OURS = 1 << 31
ID_SHIFT, CLASS_SHIFT = 14, 10
MAX_ID = (1 << 17) - 1
MAX_BACKENDS = 1 << CLASS_SHIFT
MAX_CLASSES = 15
PICK_MASK = (1 << ID_SHIFT) - 1
ID_MASK = MAX_ID << ID_SHIFT
AFFINITY_SIZE = 1 << 20  # clients remembered per family

Elements = dict[str, dict[object, object]]  # set name -> key -> data (None in a plain set)
ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
IP = {4: "ip", 6: "ip6"}
NFPROTO = {4: "ipv4", 6: "ipv6"}
SETS: dict[str, SetType] = {
    **{f"vips{v}": SetType((ADDR[v], "inet_proto", "inet_service"), "mark") for v in (4, 6)},
    **{f"ports{v}": SetType(("inet_proto", "inet_service"), "mark") for v in (4, 6)},
    **{f"noep{v}": SetType((ADDR[v], "inet_proto", "inet_service")) for v in (4, 6)},
    **{f"noports{v}": SetType(("inet_proto", "inet_service")) for v in (4, 6)},
    **{f"backends{v}": SetType(("mark",), (ADDR[v], "inet_service")) for v in (4, 6)},
    "aff4": SetType(("mark", "ipv4_addr"), "mark"),
    "aff6": SetType(("mark", "raw96"), "mark"),
    "slots": SetType(("mark", "mark"), "mark"),
    "pick": SetType(("mark",), "verdict"),
}
# Written by the packet path: a full write empties them, nothing else adds to them.
DYNAMIC = ("aff4", "aff6")
# The client's part of an affinity key (and ``aff6``'s declaration, which needs ``typeof``).
CLIENT = {4: "ip saddr", 6: "@nh,96,96"}
TYPEOF = {"aff6": "meta mark . @nh,96,96 : meta mark"}
SIZED = ("vips4", "vips6", "ports4", "ports6", "noep4", "noep6", "noports4", "noports6")


def frontend_mark(fid: int, klass: int, n: int) -> int:
    return OURS | fid << ID_SHIFT | klass << CLASS_SHIFT | (n - 1)


def pick_chain(n: int, timeout: int) -> str:
    return f"pick_{n}_aff_{timeout}" if timeout else f"pick_{n}"


# -- elements (pure) -------------------------------------------------------------------------


def elements(f: Frontend, fid: int, slots: Iterable[tuple[int, bytes, int]],
             mark: int) -> Elements:
    """What leads packets to ``f``: its keys to ``mark`` (or to refusal, without backends), its
    slots and backends (``slots``: (backend number, packed address, port) in draw order).
    Addresses are packed bytes: ``ipaddress``'s hash is a Python call, and a full sync hashes
    hundreds of thousands of keys."""
    v = f.vip.version
    placed = list(slots)
    keys: list[object] = [(packed(f.vip), f.proto, f.port)]
    any_keys: list[object] = []
    for p in f.published:
        if p.address is None:
            any_keys.append((f.proto, p.port))
        elif p.address.version == v:  # an address of the other family cannot lead here
            keys.append((packed(p.address), f.proto, p.port))
    if not placed:
        out: Elements = {f"noep{v}": dict.fromkeys(keys)}
        if any_keys:
            out[f"noports{v}"] = dict.fromkeys(any_keys)
        return out
    out = {f"vips{v}": dict.fromkeys(keys, mark),
           "slots": {(fid << ID_SHIFT, i): b for i, (b, _, _) in enumerate(placed)},
           f"backends{v}": {b: (a, port) for b, a, port in placed}}
    if any_keys:
        out[f"ports{v}"] = dict.fromkeys(any_keys, mark)
    return out


@functools.lru_cache(maxsize=1 << 16)
def packed(address: IPAddress) -> bytes:
    return address.packed


def merge(parts: Iterable[Elements]) -> Elements:
    out: Elements = {}
    for part in parts:
        for name, elems in part.items():
            out.setdefault(name, {}).update(elems)
    return out


def minus(a: Elements, b: Elements) -> Elements:
    """The elements of ``a`` that ``b`` lacks or holds with other data."""
    missing = object()
    out: Elements = {}
    for name, elems in a.items():
        other = b.get(name, {})
        kept = {k: d for k, d in elems.items() if other.get(k, missing) != d}
        if kept:
            out[name] = kept
    return out


# -- the fixed body, in nft's syntax (pure) --------------------------------------------------


def _q(name: str) -> str:
    return f"{FAMILY} {TABLE} {name}"


def render_body(hooked: bool = True) -> str:
    """The table without elements: sets, chains and the shared chains' rules; its base chains
    too if ``hooked`` (else ``render_hooks`` adds them once the elements are in)."""
    lines = [f"add table {FAMILY} {TABLE}"]
    for name, t in SETS.items():
        lines.append(_declare(name, t))
    for name in ("services", "noendpoints", "refuse", LAYOUT):
        lines.append(f"add chain {_q(name)}")
    lines += [f"add rule {_q(chain)} {rule}" for chain, rule in _rules()]
    return "\n".join(lines) + "\n" + (render_hooks() if hooked else "")


HOOKS = (("nat_prerouting", "nat", "prerouting", PRIO_DSTNAT),
         ("nat_output", "nat", "output", PRIO_DSTNAT),
         ("filter_prerouting", "filter", "prerouting", PRIO_FILTER),
         ("filter_output", "filter", "output", PRIO_FILTER),
         ("unmark_prerouting", "filter", "prerouting", PRIO_UNMARK),
         ("unmark_output", "filter", "output", PRIO_UNMARK))


def render_hooks() -> str:
    """The base chains (emptied first, so that writing them again is harmless): until they
    exist, the table acts on nothing."""
    lines = []
    for name, kind, hook, prio in HOOKS:
        lines.append(f"add chain {_q(name)} {{ type {kind} hook {hook} priority {prio}; "
                     "policy accept; }")
        lines.append(f"flush chain {_q(name)}")
    lines += [f"add rule {_q(chain)} {rule}" for chain, rule in _hooks()]
    return "\n".join(lines) + "\n"


def _declare(name: str, t: SetType) -> str:
    kind = "set" if t.data is None else "map"
    if name in TYPEOF:
        return (f"add {kind} {_q(name)} {{ typeof {TYPEOF[name]}; flags timeout; "
                f"size {AFFINITY_SIZE}; }}")
    data = "" if t.data is None else \
        " : " + (t.data if isinstance(t.data, str) else " . ".join(t.data))
    extra = f" flags timeout; size {AFFINITY_SIZE};" if name in DYNAMIC else ""
    return f"add {kind} {_q(name)} {{ type {' . '.join(t.key)}{data};{extra} }}"


_L4 = "meta l4proto { tcp, udp }"
_LOCAL = {4: "fib daddr type local ip daddr != 127.0.0.0/8",
          6: "fib daddr type local ip6 daddr != ::1"}


def _rules() -> Iterator[tuple[str, str]]:
    """Set lookups before ``fib`` (a route lookup): a new connection that is no service's
    pays hash lookups only."""
    for v in (4, 6):
        ip, fam = IP[v], f"meta nfproto {NFPROTO[v]}"
        keyed = f"{ip} daddr . meta l4proto . th dport"
        any_addr = "meta l4proto . th dport"
        # A VIP (not a local address): isolation between networks still applies (VIA_VIP).
        yield "services", (f"{_L4} {keyed} @vips{v} fib daddr type != local "
                           f"ct label set {VIA_VIP}")
        yield "services", (f"{_L4} meta mark set {keyed} map @vips{v} "
                           f"meta mark & {PICK_MASK:#x} vmap @pick")
        yield "services", (f"{fam} {_L4} {any_addr} @ports{v} {_LOCAL[v]} "
                           f"meta mark set {any_addr} map @ports{v} "
                           f"meta mark & {PICK_MASK:#x} vmap @pick")
        yield "noendpoints", f"{_L4} {keyed} @noep{v} goto refuse"
        yield "noendpoints", f"{fam} {_L4} {any_addr} @noports{v} {_LOCAL[v]} goto refuse"
    yield "refuse", "meta l4proto tcp reject with tcp reset"
    yield "refuse", "reject with icmpx type port-unreachable"


def _hooks() -> Iterator[tuple[str, str]]:
    for hook in ("prerouting", "output"):
        yield f"nat_{hook}", "jump services"
        # Only a connection's first packet can be refused: the others skip the lookups (and
        # the FIB lookup of ``fib daddr type local``), whatever traffic passes the host.
        yield f"filter_{hook}", "ct state new jump noendpoints"
        yield f"unmark_{hook}", (f"meta mark & {OURS:#x} == {OURS:#x} "
                                 "meta mark set 0 ct mark set 0")


def render_pick(n: int, timeout: int) -> str:
    """The shared chain of frontends with ``n`` backends (and affinity ``timeout``)."""
    name = pick_chain(n, timeout)
    lines = [f"add chain {_q(name)}", f"flush chain {_q(name)}"]  # again: no rule twice
    for v in (4, 6):
        ip, own = IP[v], f"meta mark & {ID_MASK:#x}"
        # With affinity, a new client's backend is a hash of its address, not a draw: its
        # first connections, sent at once, all miss the map before the first one writes it,
        # and must not land on different backends (a random draw did, 1 time in 30).
        pick = f"jhash {ip} saddr mod {n}" if timeout else f"numgen random mod {n}"
        draw = (f"meta nfproto {NFPROTO[v]} {_L4} ct mark set {pick} "
                f"ct mark set {own} . ct mark map @slots")
        dnat = f"dnat {ip} to ct mark map @backends{v}"
        if not timeout:
            lines.append(f"add rule {_q(name)} {draw} {dnat}")
            continue
        client = f"{own} . {CLIENT[v]}"
        remember = f"update @aff{v} {{ {client} timeout {timeout}s : ct mark }}"
        lines.append(f"add rule {_q(name)} meta nfproto {NFPROTO[v]} {_L4} "
                     f"ct mark set {client} map @aff{v} {remember} {dnat}")
        lines.append(f"add rule {_q(name)} {draw} {remember} {dnat}")
    return "\n".join(lines) + "\n"


def render_teardown() -> str:
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"

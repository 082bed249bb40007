"""Services in the kernel: ``table inet plexus_services``, rendered from ``lb.model.Frontend``
values; pure renderers (the applier is ``lb_table.ServiceTable``).

Layout (the shape of kube-proxy's nftables mode; checked on kernel 6.18, nft 1.0.6)
-----------------------------------------------------------------------------------
- ``vips4``/``vips6``: verdict maps ``addr . inet_proto . inet_service : goto <frontend chain>``
  holding every VIP and every port published on one host address; ``ports4``/``ports6``:
  ``inet_proto . inet_service : goto ...`` for ports published on every local address (the rule
  checks ``fib daddr type local``). The base chains ``nat_prerouting`` and ``nat_output``
  (priority -110, before ``table inet plexus``'s published ports at -100) jump to ``services``,
  four rules with one map lookup each: the first packet costs the same with 10 or 10,000
  services. NAT chains see only a connection's first packet.
- A frontend chain (``svc <proto> <port> <vip>``) draws a backend the way kube-proxy's
  iptables mode does, without any set: rule i is ``numgen random mod (N-i) == 0`` and DNATs to
  backend i, the last rule DNATs unconditionally; each backend gets 1/N of the connections, a
  draw walks N/2 rules on average (the number of backends of *that* service, never the number
  of services). Why not kube-proxy-nftables' one rule with an anonymous map
  (``numgen random mod N map { 0 : addr . port, ... }``, which nft 1.0.6's JSON accepts): every
  anonymous set is a set of the table, and creating sets costs time linear in the sets the
  table already has (measured: 1,000 services x 10 in 1.0 s, 3,000 in 6.6 s). A named map
  keyed by the draw is no way out either: its key would have to be declared ``typeof numgen``,
  which nft 1.0.6's JSON parser cannot do ("integer" and "mark" keys are refused). So the only
  sets are the table's fixed ones, whatever the number of services.
- Affinity (``Frontend.affinity`` seconds) as kube-proxy does it: one chain and one set per
  backend; the set (``flags timeout``; nft 1.0.6's JSON parser refuses the flag "dynamic", and
  the kernel accepts ``update`` on a timeout set without it) holds the clients sent there,
  refreshed by ``update @set { ip saddr }`` on each new connection; the frontend chain sends a
  known client to its backend's chain before drawing. The timeout is part of the set and chain
  names, so changing it replaces them instead of needing an in-place change. These are the only
  per-service sets, so their creation cost (above) grows with the affinity services only.
- No backends: the frontend has no chain; its keys are in the sets ``noep4``/``noep6`` and
  ``noports4``/``noports6``, which the filter chains ``filter_prerouting``/``filter_output``
  (priority -110) send to ``reject``: TCP RST, ICMP port unreachable. ``reject`` works in the
  prerouting hook on this kernel, so no forward/input split is needed, and a client without a
  route still gets its answer.
- Hairpin: the ``services`` chain sets ct label 64 when the source is a backend of the
  frontend asked for (set ``hairpin4``: ``vip . proto . port . backend``, and the published
  keys likewise; ``hairpin_any4`` for ports published on every address), and
  ``nat_postrouting`` masquerades such connections, so the backend's answer comes back through
  the host to be un-DNATed. This is broader than kube-proxy (which masquerades only when the
  chosen backend is the source): a backend reaching *another* backend on the same bridge would
  otherwise be answered straight over the bridge from an address it never called (unless
  br_netfilter is on). Keyed by the frontend, an element belongs to one frontend only, so a
  change never has to count who else uses it. Why a ct label and not a mark:
  ``table inet plexus_policy`` rewrites the packet mark and the ct mark of the connections it
  judges, between prerouting and postrouting.
  Other clients on a backend's own bridge are masqueraded by ``table inet plexus``
  (``bridge_nets``); this table alone does not cover them. With br_netfilter on (a new network
  namespace here starts with bridge-nf-call-iptables=1 once the module is loaded), a packet
  from a container to a VIP whose backend sits on the same bridge is DNATed at *bridge* level
  and bridged, not routed: a backend drawn for itself then needs hairpin mode on its bridge
  port (the link layer's job, as for published ports), or the SYN vanishes without a trace
  after the DNAT (checked: no forward hook, no conntrack entry).
- Loopback addresses are never DNATed for published ports (``127.0.0.0/8``, ``::1``): the
  reply could not come back, as kube-proxy's nftables mode also decides.
- Policy (``table inet plexus_policy``, forward -5) sees the backend after DNAT, since DNAT here
  happens in prerouting/output.

The trap of the host reaching a VIP
-----------------------------------
A socket on the host routes *before* the output hook runs: ``connect()`` to a VIP without any
route fails at once with ENETUNREACH, and no nft rule ever sees the packet. The host needs a
route covering the service range; its default route does (the output chain then DNATs and the
kernel reroutes to the backend's bridge, the source staying the default route's address, which
the backend answers through the host). A host without a default route needs a route to the
service range (e.g. to one of its bridges). Containers route through the host and need
nothing.

What a chain per service costs (nft 1.0.6; bench/services.py)
------------------------------------------------------------
Before any batch, libnftables lists every chain of the ruleset into its cache, whatever table
the batch is for: with 10,000 services loaded, adding one element to a set of *another* table
took 30-37 ms (0-1 ms with 100,000 elements and no chains; load average ~5 on 2 cores). So a
one-service change here costs tens of milliseconds at that size, and so does every batch of
``table inet plexus`` and ``plexus_policy`` on the same host. The full sync is ~220,000
commands: 6.2 s of CPU for 10,000 x 10 (4.5 s of it libnftables' JSON parsing and evaluation).
Ways out, not taken here: a netlink writer for deltas, or the draw keyed into named maps with
``typeof`` keys (declared in nft's text syntax), which would leave one chain per table.

Every change is one batch touching only the chains, sets and elements of the frontends that
changed; ``render_change`` needs what the kernel holds before (the applier keeps it) to know
which backend chains and elements go away.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Iterable, Iterator
from typing import Any

from plexus.dataplane.nft._json import Json, Value, concat, encode, match, meta, payload
from plexus.dataplane.nft.render import VIA_VIP
from plexus.lb.model import Backend, Change, Frontend, Frontends
from plexus.model.types import IPAddress

TABLE = "plexus_services"
FAMILY = "inet"
PRIO_DSTNAT, PRIO_FILTER, PRIO_SRCNAT = -110, -110, 100
HAIRPIN = 64  # the ct label bit of connections from a backend to its own frontend

Elements = dict[str, dict[Value, str | None]]  # set name → key → goto target (None: a set)
ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
IP = {4: "ip", 6: "ip6"}
SETS: dict[str, tuple[list[str], bool]] = {  # name → (key type, verdict map?)
    **{f"vips{v}": ([ADDR[v], "inet_proto", "inet_service"], True) for v in (4, 6)},
    **{f"ports{v}": (["inet_proto", "inet_service"], True) for v in (4, 6)},
    **{f"noep{v}": ([ADDR[v], "inet_proto", "inet_service"], False) for v in (4, 6)},
    **{f"noports{v}": (["inet_proto", "inet_service"], False) for v in (4, 6)},
    **{f"hairpin{v}": ([ADDR[v], "inet_proto", "inet_service", ADDR[v]], False) for v in (4, 6)},
    **{f"hairpin_any{v}": (["inet_proto", "inet_service", ADDR[v]], False) for v in (4, 6)},
}


def obj(kind: str, **fields: Any) -> Json:
    head = {"family": FAMILY, "name": TABLE} if kind == "table" else \
        {"family": FAMILY, "table": TABLE}
    return {kind: {**head, **fields}}


# -- names -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 18)
def _text(address: IPAddress) -> str:
    """An address as nft writes it. Cached: ``ipaddress.__str__`` was most of a full sync's
    render time (each backend is written three or four times)."""
    return str(address)


def chain_name(f: Frontend) -> str:
    return f"svc {f.proto} {f.port} {_text(f.vip)}"


def endpoint_chain(f: Frontend, b: Backend) -> str:
    return f"{chain_name(f)} aff{f.affinity} {_text(b.address)} {b.port}"


def affinity_set(f: Frontend, b: Backend) -> str:
    return f"aff {f.proto} {f.port} {_text(f.vip)} aff{f.affinity} {_text(b.address)} {b.port}"


# -- elements --------------------------------------------------------------------------------


def elements(f: Frontend) -> Elements:
    """The map and set elements that lead packets to ``f`` (or reject them, with no backend),
    and those that mark a backend's connection to ``f`` for masquerading."""
    v = f.vip.version
    keyed, any_addr = (f"vips{v}", f"ports{v}") if f.backends else (f"noep{v}", f"noports{v}")
    target = chain_name(f) if f.backends else None
    keys: list[Value] = [(_text(f.vip), f.proto, f.port)]
    any_keys: list[Value] = []
    for p in f.published:
        if p.address is None:
            any_keys.append((f.proto, p.port))
        elif p.address.version == v:  # a published address of the other family cannot lead here
            keys.append((_text(p.address), f.proto, p.port))
    out: Elements = {keyed: dict.fromkeys(keys, target)}
    if any_keys:
        out[any_addr] = dict.fromkeys(any_keys, target)
    sources = [_text(a) for a in sorted({b.address for b in f.backends})]
    if sources:
        out[f"hairpin{v}"] = {(*k, a): None for k in keys for a in sources}  # type: ignore[misc]
    if sources and any_keys:
        out[f"hairpin_any{v}"] = {(*k, a): None for k in any_keys  # type: ignore[misc]
                                  for a in sources}
    return out


def _merge(parts: Iterable[Elements]) -> Elements:
    out: Elements = {}
    for part in parts:
        for name, elems in part.items():
            out.setdefault(name, {}).update(elems)
    return out


def _minus(a: Elements, b: Elements) -> Elements:
    return {n: {k: d for k, d in es.items() if b.get(n, {}).get(k, 0) != d} for n, es in a.items()}


def _element_cmds(verb: str, elems: Elements) -> Iterator[Json]:
    for name in sorted(elems):
        if not elems[name]:
            continue  # an empty "elem" list is a syntax error
        if verb == "delete" or not SETS[name][1]:
            encoded: list[Any] = [encode(k) for k in elems[name]]
        else:
            encoded = [[encode(k), {"goto": {"target": d}}] for k, d in elems[name].items()]
        yield {verb: obj("element", name=name, elem=encoded)}


# -- rules -----------------------------------------------------------------------------------


def _frontend_rules(f: Frontend) -> list[list[Json]]:
    """Known clients to their backend (affinity), then a draw: rule i takes the connection with
    probability 1/(N-i), so that each backend gets 1/N, the last one what is left."""
    saddr = payload(IP[f.vip.version], "saddr")
    n = len(f.backends)
    if f.affinity:
        known = [[match(saddr, f"@{affinity_set(f, b)}"), _goto(endpoint_chain(f, b))]
                 for b in f.backends]
        return [*known, *([*_draw(n - i), _goto(endpoint_chain(f, b))]
                          for i, b in enumerate(f.backends))]
    return [[*_draw(n - i), *_dnat(f, b)] for i, b in enumerate(f.backends)]


@functools.cache
def _draw(left: int) -> tuple[Json, ...]:
    """True once in ``left`` times (always for the last backend). Shared, never mutated: a
    full sync builds 100,000 of these."""
    if left <= 1:
        return ()
    return (match({"numgen": {"mode": "random", "mod": left, "offset": 0}}, 0),)


def _endpoint_rules(f: Frontend, b: Backend) -> list[list[Json]]:
    saddr = payload(IP[f.vip.version], "saddr")
    update = {"set": {"op": "update", "elem": saddr, "set": f"@{affinity_set(f, b)}"}}
    return [[update], _dnat(f, b)]


def _dnat(f: Frontend, b: Backend) -> list[Json]:
    return [_PROTO[f.proto],
            {"dnat": {"family": IP[b.address.version], "addr": _text(b.address), "port": b.port}}]


def _goto(chain: str) -> Json:
    return {"goto": {"target": chain}}


# -- one frontend's chains and sets ----------------------------------------------------------


def _endpoints(f: Frontend | None) -> dict[str, Backend]:
    """The backend chains of ``f`` by name (only with affinity)."""
    if f is None or not f.affinity:
        return {}
    return {endpoint_chain(f, b): b for b in f.backends}


def _build(old: Frontend | None, new: Frontend) -> Iterator[Json]:
    """What ``new`` adds: backend sets and chains it did not have, then its chain rewritten."""
    gained = _endpoints(new).keys() - _endpoints(old).keys()
    for b in new.backends if new.affinity else ():
        if endpoint_chain(new, b) in gained:
            yield {"add": obj("set", name=affinity_set(new, b), type=ADDR[new.vip.version],
                              flags=["timeout"], timeout=new.affinity)}
            yield {"add": obj("chain", name=endpoint_chain(new, b))}
            for rule in _endpoint_rules(new, b):
                yield {"add": obj("rule", chain=endpoint_chain(new, b), expr=rule)}
    if new.backends:
        yield {"add": obj("chain", name=chain_name(new))}
        if old is not None and old.backends:
            yield {"flush": obj("chain", name=chain_name(new))}
        for rule in _frontend_rules(new):
            yield {"add": obj("rule", chain=chain_name(new), expr=rule)}


def _demolish(old: Frontend, new: Frontend | None) -> Iterator[Json]:
    """What ``old`` had that ``new`` has not: its chain (once nothing leads there), then the
    backend chains its chain jumped to, then their sets."""
    if old.backends and (new is None or not new.backends):
        yield {"flush": obj("chain", name=chain_name(old))}
        yield {"delete": obj("chain", name=chain_name(old))}
    lost = _endpoints(old).keys() - _endpoints(new).keys()
    gone = [b for b in old.backends if endpoint_chain(old, b) in lost]
    for b in gone:
        yield {"flush": obj("chain", name=endpoint_chain(old, b))}
        yield {"delete": obj("chain", name=endpoint_chain(old, b))}
    for b in gone:
        yield {"delete": obj("set", name=affinity_set(old, b))}


# -- batches ---------------------------------------------------------------------------------


def render_change(change: Change, before: Frontends) -> list[Json]:
    """One batch turning ``before`` (what the kernel holds) into ``before`` + ``change``.

    Order: elements that go away (nothing leads to a chain about to go), new and rewritten
    chains, chains and sets that go away, then new elements (their chains exist by then).
    """
    pairs: list[tuple[Frontend | None, Frontend | None]] = [
        (before.get(f.key, f), None) for f in change.removed]
    pairs += [(before.get(f.key), f) for f in change.changed]
    old_elems = _merge(elements(o) for o, _ in pairs if o is not None)
    new_elems = _merge(elements(n) for _, n in pairs if n is not None)
    cmds = list(_element_cmds("delete", _minus(old_elems, new_elems)))
    for o, n in pairs:
        if n is not None:
            cmds += _build(o, n)
    for o, n in pairs:
        if o is not None:
            cmds += _demolish(o, n)
    return cmds + list(_element_cmds("add", _minus(new_elems, old_elems)))


def render_table(frontends: Iterable[Frontend]) -> list[Json]:
    """The whole table in one batch (created, or replaced): exactly ``frontends``.

    The cyclic garbage collector is paused meanwhile: 10,000 services are a million new dicts
    and lists (none in a cycle), and its full passes over the growing heap doubled the time
    (measured: 1.9 s of CPU against 0.9 s)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return _table(list(frontends))
    finally:
        if paused:
            gc.enable()


def _table(frontends: list[Frontend]) -> list[Json]:
    cmds: list[Json] = [{"add": obj("table")}, {"delete": obj("table")}, {"add": obj("table")}]
    for name, (key, verdicts) in SETS.items():
        kind = "map" if verdicts else "set"
        extra = {"map": "verdict"} if verdicts else {}
        cmds.append({"add": obj(kind, name=name, type=key, **extra)})
    cmds += _base()
    for f in frontends:
        cmds += _build(None, f)
    return cmds + list(_element_cmds("add", _merge(elements(f) for f in frontends)))


def render_teardown() -> list[Json]:
    return [{"add": obj("table")}, {"delete": obj("table")}]  # "add": a missing table is fine


# -- the fixed part --------------------------------------------------------------------------


def _base() -> list[Json]:
    def base(name: str, kind: str, hook: str, prio: int) -> Json:
        return {"add": obj("chain", name=name, type=kind, hook=hook, prio=prio, policy="accept")}

    cmds = [base("nat_prerouting", "nat", "prerouting", PRIO_DSTNAT),
            base("nat_output", "nat", "output", PRIO_DSTNAT),
            base("filter_prerouting", "filter", "prerouting", PRIO_FILTER),
            base("filter_output", "filter", "output", PRIO_FILTER),
            base("nat_postrouting", "nat", "postrouting", PRIO_SRCNAT),
            *({"add": obj("chain", name=n)} for n in ("services", "noendpoints", "reject"))]
    return cmds + [{"add": obj("rule", chain=c, expr=r)} for c, r in _base_rules()]


def _base_rules() -> Iterator[tuple[str, list[Json]]]:
    for hook in ("prerouting", "output"):
        yield f"nat_{hook}", [{"jump": {"target": "services"}}]
        yield f"filter_{hook}", [{"jump": {"target": "noendpoints"}}]
    for v in (4, 6):
        keyed = concat(payload(IP[v], "daddr"), meta("l4proto"), payload("th", "dport"))
        any_addr = concat(meta("l4proto"), payload("th", "dport"))
        saddr = payload(IP[v], "saddr")
        yield "services", [_TCP_UDP, match(concat(*keyed["concat"], saddr), f"@hairpin{v}"),
                           MARK_HAIRPIN]
        yield "services", [*_local(v), _TCP_UDP,
                           match(concat(*any_addr["concat"], saddr), f"@hairpin_any{v}"),
                           MARK_HAIRPIN]
        # A VIP (not a local address): isolation between networks still applies (VIA_VIP).
        yield "services", [match({"fib": {"result": "type", "flags": ["daddr"]}}, "local", "!="),
                           _TCP_UDP, match(keyed, f"@vips{v}"), MARK_VIP]
        yield "services", [_TCP_UDP, {"vmap": {"key": keyed, "data": f"@vips{v}"}}]
        yield "services", [*_local(v), _TCP_UDP, {"vmap": {"key": any_addr, "data": f"@ports{v}"}}]
        yield "noendpoints", [_TCP_UDP, match(keyed, f"@noep{v}"), _goto("reject")]
        yield "noendpoints", [*_local(v), _TCP_UDP, match(any_addr, f"@noports{v}"),
                              _goto("reject")]
    yield "reject", [match(meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}]
    yield "reject", [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}]
    yield "nat_postrouting", [match({"ct": {"key": "label"}}, HAIRPIN, "in"), {"masquerade": None}]


_TCP_UDP = match(meta("l4proto"), {"set": ["tcp", "udp"]})
_PROTO = {p: match(meta("l4proto"), p) for p in ("tcp", "udp")}
MARK_HAIRPIN = {"mangle": {"key": {"ct": {"key": "label"}}, "value": HAIRPIN}}
MARK_VIP = {"mangle": {"key": {"ct": {"key": "label"}}, "value": VIA_VIP}}


def _local(v: int) -> list[Json]:
    """A local destination, but not loopback (its reply could not come back)."""
    loopback: Any = {"prefix": {"addr": "127.0.0.0", "len": 8}} if v == 4 else "::1"
    return [match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
            match(payload(IP[v], "daddr"), loopback, "!=")]


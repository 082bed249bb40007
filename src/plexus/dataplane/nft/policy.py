"""Network policy in the kernel: ``table inet plexus_policy``, rendered from ``Compiled``
(``policy.compile``); pure renderers, and the thin applier ``PolicyTable``.

Design notes (checked on kernel 6.18, nft 1.0.6; docs/policy.md)
---------------------------------------------------------------
- A table of its own, with its own forward base chain (priority -5, policy accept): it only
  ever drops; what it lets through goes on to ``table inet plexus`` (isolation between networks,
  published ports) as before. It exists only while policies do.
- Only new connections are judged (``ct state new``): replies and established connections pass,
  and a changed policy applies to new connections.
- Two registers carry the identities of a packet's ends: ``ct mark`` the source's, the packet
  ``meta mark`` the destination's (each from the endpoint map, else the world's interval map).
  The verdict maps are keyed ``ct mark . meta mark [. l4proto [. dport]]``, so a packet costs a
  set test, four identity lookups and at most five verdict lookups, whatever the number of
  policies, endpoints or hosts. ``meta mark`` is set back to 0 afterwards; the source identity
  stays on the connection's conntrack entry (flow logs read it).
- The verdicts are chains per policy: ``PID-allow`` counts and returns (the packet goes on to
  the next check), ``PID-deny`` counts and drops, ``PID-audit`` counts and returns. Their named
  counters are what ``plexus policy ls`` shows. Denied and audited packets are logged to the
  flow log's nfnetlink_log group on the way (``_log_chains``).
- The verdict maps hold numbers, not verdicts: a hit puts the number in ``meta mark`` and the
  ``outcomes`` map turns it into the chain to go to (``policy.compile.Outcomes``). The kernel
  checks the whole table for loops when an element that jumps to a chain is committed: 5-15 ms
  per change at 60,000 elements (measured), against 0.05 ms for a number. Only ``outcomes``
  holds jumps, and it changes only when a policy comes or goes. The destination's identity is
  looked up again before the ingress check, since an egress decision took its register.
- Bridged traffic between containers of one network passes the forward hook through
  br_netfilter, as the main table's notes say.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from plexus.dataplane.nft._json import Json, concat, ct, match, meta, payload
from plexus.dataplane.nft.render import LOG_GROUP, LOG_RATE
from plexus.dataplane.nft.setelem import Change, SetType
from plexus.policy.cells import PortRange
from plexus.policy.compile import MAPS, OUTCOMES, PREFIX, RETURN
from plexus.policy.compile import OUTCOME_CODES as _CODES
from plexus.policy.journal import Delta, Sets
from plexus.policy.model import Direction

TABLE = "plexus_policy"
FAMILY = "inet"
PRIORITY = -5
OUTCOME_NAMES = tuple(_CODES)  # a policy's chains: PID-allow, PID-deny, PID-audit
_KEYS = {"port": ("mark", "mark", "inet_proto", "inet_service"),
         "range": ("mark", "mark", "inet_proto", "inet_service"),
         "proto": ("mark", "mark", "inet_proto"), "any": ("mark", "mark"),
         "wport": ("mark", "inet_proto", "inet_service"),
         "wrange": ("mark", "inet_proto", "inet_service"),
         "wproto": ("mark", "inet_proto"), "default": "mark"}



def set_types() -> dict[str, SetType]:
    """Every set and map by name, as ``setelem`` writes their elements."""
    out: dict[str, SetType] = {}
    for name, decl in _declared().items():
        body = decl.get("set") or decl.get("map")
        assert isinstance(body, dict)
        key = body["type"]
        out[name] = SetType(tuple(key) if isinstance(key, list) else (key,), body.get("map"),
                            "interval" in body.get("flags", []))
    return out


def element_changes(deltas: list[Delta]) -> list[Change] | None:
    """``deltas`` as netlink element changes, in order; None if one touches a set that only
    libnftables writes (the world's interval maps: a new CIDR cut rewrites them)."""
    types = _TYPES
    out: list[Change] = []
    for delta in deltas:
        for add, part in ((False, delta.removed), (True, delta.added)):
            for name, elems in sorted(part.items()):
                if not elems:
                    continue
                if not types[name].writable:
                    return None
                out.append(Change(name, types[name], add, elems))
    return out


def obj(kind: str, **fields: Any) -> Json:
    head = {"family": FAMILY, "name": TABLE} if kind == "table" else \
        {"family": FAMILY, "table": TABLE}
    return {kind: {**head, **fields}}


def _declared() -> dict[str, Json]:
    """Every set and map, by name, as declared."""
    decls: dict[str, Json] = {}
    for v, t in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        decls[f"ep{v}"] = obj("map", name=f"ep{v}", type=t, map="mark")
        decls[f"world{v}"] = obj("map", name=f"world{v}", type=t, map="mark",
                                 flags=["interval"])
        for d in Direction:
            decls[f"{PREFIX[d]}{v}"] = obj("set", name=f"{PREFIX[d]}{v}", type=t)
    for d in Direction:
        for kind in MAPS:
            name = f"{PREFIX[d]}_{kind}"
            key = _KEYS[kind]
            fields: dict[str, Any] = {"name": name, "type": list(key) if isinstance(key, tuple)
                                      else key, "map": "mark"}
            if kind in ("range", "wrange"):
                fields["flags"] = ["interval"]
            decls[name] = obj("map", **fields)
    decls[OUTCOMES] = obj("map", name=OUTCOMES, type="mark", map="verdict")
    return decls


_TYPES = set_types()


# -- values ----------------------------------------------------------------------------------


def _value(v: Any) -> Any:
    if isinstance(v, PortRange):
        return {"range": [v.first, v.last]}
    if isinstance(v, tuple):
        return {"concat": [_value(x) for x in v]} if len(v) > 1 else _value(v[0])
    if hasattr(v, "prefixlen"):
        if v.prefixlen == v.max_prefixlen:
            return str(v.network_address)
        return {"prefix": {"addr": str(v.network_address), "len": v.prefixlen}}
    if isinstance(v, (int, str)):
        return v
    return str(v)


def _data(v: Any) -> Any:
    if isinstance(v, str):  # a verdict: a policy chain, or plain return
        return {"return": None} if v == RETURN else {"goto": {"target": v}}
    return v


def _elem_cmds(verb: str, sets: Mapping[str, Mapping[object, object]]) -> Iterator[Json]:
    for name, elems in sorted(sets.items()):
        if not elems:
            continue
        if verb == "delete" or next(iter(elems.values())) is None:
            encoded = [_value(k) for k in elems]
        else:
            encoded = [[_value(k), _data(d)] for k, d in elems.items()]
        yield {verb: obj("element", name=name, elem=encoded)}


# -- chains ----------------------------------------------------------------------------------


def _policy_chains(base: str) -> Iterator[Json]:
    """The three chains (and counters) of one policy."""
    for outcome in OUTCOME_NAMES:
        name = f"{base}-{outcome}"
        yield {"add": obj("counter", name=name)}
        yield {"add": obj("chain", name=name)}
        then = {"return": None} if outcome == "allow" else {"goto": {"target": _LOGS[outcome]}}
        yield {"add": obj("rule", chain=name, expr=[{"counter": name}, then])}


_LOGS = {"deny": "denied", "audit": "audited"}  # outcome -> the chain that logs and ends it


def _log_chains() -> Iterator[Json]:
    """Where every policy's deny and audit go: the packet is logged to the flow log's group
    (at most ``LOG_RATE`` a second in all, so a flood cannot swamp the agent; its ``meta mark``,
    the decision's number, tells the agent which policy), then dropped or let on."""
    for outcome, chain in _LOGS.items():
        yield {"add": obj("chain", name=chain)}
        yield {"add": obj("rule", chain=chain, expr=[
            {"limit": {"rate": LOG_RATE, "per": "second"}},
            {"log": {"prefix": outcome, "group": LOG_GROUP}}])}
        last = {"drop": None} if outcome == "deny" else {"return": None}
        yield {"add": obj("rule", chain=chain, expr=[last])}


def _delete_policy_chains(base: str) -> Iterator[Json]:
    for outcome in OUTCOME_NAMES:
        yield {"delete": obj("chain", name=f"{base}-{outcome}")}
        yield {"delete": obj("counter", name=f"{base}-{outcome}")}


def _identify(chain: str, v: int, register: Json, addr: Json) -> Iterator[tuple[str, list[Json]]]:
    """``register`` := the identity of ``addr``: the endpoint's, else the world's piece. The
    world's interval map is asked only for an address no endpoint has: a hash lookup is
    cheaper than an interval one, and most policed packets are between endpoints."""
    yield chain, [match(addr, f"@ep{v}", "!="), {"mangle": {"key": register, "value": {
        "map": {"key": addr, "data": f"@world{v}"}}}}]
    yield chain, [{"mangle": {"key": register, "value": {"map": {"key": addr,
                                                                 "data": f"@ep{v}"}}}}]


def _rules() -> Iterator[tuple[str, list[Json]]]:
    yield "forward", [match(ct("state"), "new", "in"), {"jump": {"target": "check"}}]
    yield "check", [match(meta("nfproto"), "ipv4"), {"jump": {"target": "v4"}}]
    yield "check", [match(meta("nfproto"), "ipv6"), {"jump": {"target": "v6"}}]
    for v, ip in ((4, "ip"), (6, "ip6")):
        saddr, daddr = payload(ip, "saddr"), payload(ip, "daddr")
        chain = f"v{v}"
        yield chain, [match(saddr, f"@eg{v}", "!="), match(daddr, f"@in{v}", "!="),
                      {"return": None}]
        for register, addr in ((ct("mark"), saddr), (meta("mark"), daddr)):
            yield from _identify(chain, v, register, addr)
        yield chain, [match(saddr, f"@eg{v}"), {"jump": {"target": "egress"}}]
        yield from _identify(chain, v, meta("mark"), daddr)  # a decision took its place
        yield chain, [match(daddr, f"@in{v}"), {"jump": {"target": "ingress"}}]
        yield chain, [{"mangle": {"key": meta("mark"), "value": 0}}]
    ports = match(meta("l4proto"), {"set": ["tcp", "udp", "sctp"]})
    src, dst, proto, dport = ct("mark"), meta("mark"), meta("l4proto"), payload("th", "dport")
    for d, chain in ((Direction.EGRESS, "egress"), (Direction.INGRESS, "ingress")):
        p = PREFIX[d]
        mine = src if d is Direction.EGRESS else dst
        for kind in ("port", "range"):
            yield chain, [ports, *_decide(concat(src, dst, proto, dport), f"{p}_{kind}")]
        yield chain, _decide(concat(src, dst, proto), f"{p}_proto")
        yield chain, _decide(concat(src, dst), f"{p}_any")
        for kind in ("wport", "wrange"):
            yield chain, [ports, *_decide(concat(mine, proto, dport), f"{p}_{kind}")]
        yield chain, _decide(concat(mine, proto), f"{p}_wproto")
        yield chain, _decide(mine, f"{p}_default")


def _decide(key: Json, name: str) -> list[Json]:
    """A lookup that decides if it finds ``key``: its number into ``meta mark``, then the
    verdict of that number. A miss ends the rule with ``meta mark`` as it was (the destination's
    identity), for the next lookup; a hit ends the chain, so ``meta mark`` is not read again
    there (``_rules`` sets it back before the ingress check)."""
    return [{"mangle": {"key": meta("mark"), "value": {"map": {"key": key, "data": f"@{name}"}}}},
            {"vmap": {"key": meta("mark"), "data": f"@{OUTCOMES}"}}]


def render_table(sets: Sets, chains: Mapping[str, str], *, hooked: bool = True) -> list[Json]:
    """The whole table in one batch (created, or replaced). Not ``hooked``: without its base
    chain and without the elements ``setelem`` can write (``render_fresh`` says why)."""
    cmds: list[Json] = [{"add": obj("table")}, {"delete": obj("table")}, {"add": obj("table")}]
    cmds += [{"add": d} for d in _declared().values()]
    if hooked:
        cmds += render_hook()[:1]
    for name in ("check", "v4", "v6", "egress", "ingress"):
        cmds.append({"add": obj("chain", name=name)})
    cmds += _log_chains()
    for base in sorted(chains):
        cmds += _policy_chains(base)
    cmds += [{"add": obj("rule", chain=c, expr=x)} for c, x in _rules() if c != "forward"]
    if hooked:
        cmds += render_hook()[1:]
    cmds += _elem_cmds("add", sets if hooked else
                       {n: e for n, e in sets.items() if not _TYPES[n].writable})
    return cmds


def render_hook() -> list[Json]:
    """The base chain on the forward hook and its rule: what makes the table enforce."""
    cmds: list[Json] = [{"add": obj("chain", name="forward", type="filter", hook="forward",
                                    prio=PRIORITY, policy="accept")}]
    return cmds + [{"add": obj("rule", chain=c, expr=x)} for c, x in _rules() if c == "forward"]


def writable_elements(sets: Sets) -> list[Change]:
    """The elements a table rendered without ``hooked`` lacks, for ``setelem``."""
    found = element_changes([Delta(added={n: e for n, e in sets.items() if _TYPES[n].writable})])
    assert found is not None
    return found


def render_delta(deltas: list[Delta], old_chains: Mapping[str, str],
                 new_chains: Mapping[str, str]) -> list[Json]:
    """Changes in order, in one batch: a new policy's chains before any element uses them,
    a gone policy's after the elements that used them are gone."""
    cmds: list[Json] = []
    for base in sorted(set(new_chains) - set(old_chains)):
        cmds += _policy_chains(base)
    for delta in deltas:
        cmds += _elem_cmds("delete", delta.removed)
        cmds += _elem_cmds("add", delta.added)
    for base in sorted(set(old_chains) - set(new_chains)):
        cmds += _delete_policy_chains(base)
    return cmds


def render_teardown() -> list[Json]:
    return [{"add": obj("table")}, {"delete": obj("table")}]

"""Pure renderers: ``FirewallState`` → libnftables JSON commands (the ``"nftables"`` array).

Design notes (checked on kernel 6.18 with nft 1.0.6; see tests/integration/test_nft_firewall.py)
------------------------------------------------------------------------------------------------
plexus owns ``table inet plexus`` and nothing else. The rules are fixed; every network and every
published port is a set or map element, so a packet costs the same with 10 or 10,000 containers
and a container change is a one-element batch.

- Publications live in *exact-match* (hash) maps, keyed by what the packet asks for:
  ``pub4_*``     key ``ipv4_addr . inet_proto . inet_service``  (published on one host address)
  ``pub4_any_*`` key ``inet_proto . inet_service``              (on every local address)
  and ``pub6_*``/``pub6_any_*`` likewise. Each key has two maps, ``*_addr`` (→ container
  address) and ``*_port`` (→ container port), looked up by one ``dnat ... map : ... map``
  statement; the specific-address rule comes before the any-address rule.
  Why not one map ``key : ipv4_addr . inet_service``: nft 1.0.6's JSON parser cannot declare a
  map with concatenated data (a list is silently ignored and a plain set is created; a rule using
  it then segfaults nft; the string "ipv4_addr . inet_service" is rejected). Two lookups cost
  nothing that matters: NAT chains see only the first packet of a connection.
  Why not one ``flags interval`` map with ``0.0.0.0/0`` as the "any" address (which does load
  on this kernel): its concatenated-range backend (pipapo) refuses an element overlapping another
  ("File exists"), so ``0.0.0.0:8080`` and ``127.0.0.1:8080`` could not coexist and one such pair
  would fail a whole batch; and pipapo's lookup and update cost grow with its element count,
  where a hash map's stay constant.
- ``meta l4proto {tcp, udp}`` precedes every ``th dport`` lookup: nft refuses a transport-header
  mapping without a transport protocol match.
- The ``*_any`` rules carry an explicit ``meta nfproto``: their key has no address, so nothing
  else would keep an IPv6 packet out of the IPv4 map in this ``inet`` table.
- Hairpin (a container → host address:published port → itself or a neighbour on the same
  bridge) must be masqueraded, or the answer goes straight back over the bridge (or, to itself,
  over lo) from an address the client never called. The test is "DNATed, and the source lies in
  a subnet of the output bridge": the ``bridge_nets4``/``bridge_nets6`` sets (``ifname . addr``
  ranges). ``iifname . oifname @intra`` would do for routed packets, but with br_netfilter a
  hairpin is DNATed and sent back at bridge level, where postrouting gets no input device: a
  container calling its own published port then fails (checked).
- Localhost publishing: the output chain DNATs 127.0.0.1:port too; the source stays 127.0.0.1,
  which the kernel only lets leave on a bridge with ``route_localnet=1`` (set by the link layer),
  and which the container could not answer, hence ``ct status dnat ip saddr 127.0.0.0/8
  masquerade``. IPv6 has no route_localnet: ``::1`` is never DNATed (checked: a DNATed ::1
  connection only fails; left alone it reaches whatever listens on ::1).
- A neighbour on any link can send a packet *to* 127.0.0.1; prerouting DNAT rewrites it before
  the routing decision's martian check, so a 127.0.0.1-only publication would be reachable from
  the LAN (CVE-2020-8558 for kube-proxy, the same issue in Docker). Checked here: it is, even
  without route_localnet on the uplink. ``prerouting_filter`` drops such packets at raw
  priority, before conntrack and NAT see them.
- With ``br_netfilter`` loaded (the default on many hosts; ``bridge-nf-call-iptables=1``),
  traffic *between ports of one bridge* also traverses the forward hook with iif = oif = the
  bridge, so ``intra`` (``br . br``) is accepted before the internal/isolation drops. A
  container reaching its *own* published port then also needs hairpin mode on its bridge port
  (``bridge link set dev VETH hairpin on``), which is the link layer's job, not the firewall's.
- Published ports keep the client's source address: only traffic leaving through a non-plexus
  interface is masqueraded.
- An overlay network has a second link on each host, its VXLAN device (``NetRule.tunnel``),
  which carries its traffic to and from the other hosts' containers. It is in ``bridges`` (so
  traffic into it is never masqueraded: the other host's container sees the sender's own
  address; and other networks are isolated from it as from the bridge), in ``internal`` with
  its bridge, and ``intra`` holds (bridge, tunnel) and (tunnel, bridge). Not (tunnel, tunnel):
  every host sends straight to the host that holds a block, none relays. Two elements per
  network, whatever the number of hosts or containers.
- Multi-homed clients of a service: a container on networks A (its default route) and B
  connects to the VIP of a service on B. Its kernel routes the VIP by the default route, so
  the connection leaves through A with the container's A address, and after DNAT it goes from
  A's bridge to B's: the VIP isolation drop (judged by interface) would drop a client that may
  call the same backend's own address (which it does through its B interface). Judging by
  interface cannot tell it from a stranger on A; its source address can. ``vip_clients4`` /
  ``vip_clients6`` hold ``ifname . address`` for every link of network B and every address
  that a container attached to B (on this host) holds on its *other* networks
  (``NetRule.clients``), and a VIP connection whose (output link, source address) is in them
  is accepted before the drop. One hash lookup, only for VIP connections' first packets, and
  elements only for multi-homed containers: single-homed ones cost nothing, the per-packet
  cost does not grow with their number. The client's address on A is not masqueraded (it is
  not in B's subnet), so the backend sees the client as it would on a direct call, and
  answers through the host back to A. For an overlay network the element is keyed by its
  tunnel as well: the client's host DNATs, the backend's host sees a plain packet from the
  tunnel (``intra``).
- The forward chain's drops count into named counters (``DROP_COUNTERS``): the metrics read
  them back with one ``list counters`` (drops by reason), and a named counter costs a packet
  what an anonymous one does. Replacing the table resets them; Prometheus takes a counter
  reset in its stride.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from plexus.dataplane.nft import _json as j
from plexus.dataplane.nft._json import Json, Value
from plexus.dataplane.nft.state import FirewallState, NetRule, Publication
from plexus.model.types import IPNetwork

PRIO_RAW, PRIO_DSTNAT, PRIO_FILTER, PRIO_SRCNAT = -300, -100, 0, 100

Elements = dict[str, frozenset[Value]]  # set name → elements; a map element is (key, data)


@dataclass(frozen=True, slots=True)
class SetSpec:
    name: str
    type: str | tuple[str, ...]
    interval: bool = False
    data: str | None = None  # a map's data type

    def json(self) -> Json:
        fields: dict[str, object] = {"name": self.name, "type": _type(self.type)}
        if self.interval:
            fields["flags"] = ["interval"]
        if self.data is None:
            return j.obj("set", **fields)
        return j.obj("map", **fields, map=self.data)


def _type(t: str | tuple[str, ...]) -> str | list[str]:
    return t if isinstance(t, str) else list(t)


NET_SETS = (
    SetSpec("bridges", "ifname"),
    SetSpec("internal", "ifname"),
    SetSpec("intra", ("ifname", "ifname")),
    SetSpec("masq4", "ipv4_addr", interval=True),
    SetSpec("masq6", "ipv6_addr", interval=True),
    SetSpec("bridge_nets4", ("ifname", "ipv4_addr"), interval=True),
    SetSpec("bridge_nets6", ("ifname", "ipv6_addr"), interval=True),
    SetSpec("vip_clients4", ("ifname", "ipv4_addr")),
    SetSpec("vip_clients6", ("ifname", "ipv6_addr")),
)
PUB_MAPS = tuple(
    SetSpec(f"{name}_{part}", key, data=f"ipv{version}_addr" if part == "addr" else "inet_service")
    for version in (4, 6)
    for name, key in (
        (f"pub{version}", (f"ipv{version}_addr", "inet_proto", "inet_service")),
        (f"pub{version}_any", ("inet_proto", "inet_service")),
    )
    for part in ("addr", "port")
)
SPECS = {s.name: s for s in (*NET_SETS, *PUB_MAPS)}
# Named counters of the forward chain's drops: reason -> counter name.
# Where the tables log what they drop (or, audit, would drop), for the flow log
# (``observe.flows``): an nfnetlink_log group, at most LOG_RATE packets a second per rule.
LOG_GROUP, LOG_RATE = 27, 1000
# The ct label bit ``table inet plexus_services`` sets on a connection to a service VIP (not a
# published port): DNATed, but to be judged by network isolation as if sent to the backend.
VIA_VIP = 65
DROP_COUNTERS = {"isolation": "drop_isolation", "internal": "drop_internal",
                 "unpublished": "drop_unpublished"}


# -- elements ------------------------------------------------------------------------------------


def net_elements(nets: Iterable[NetRule]) -> Elements:
    nets = list(nets)
    out: dict[str, set[Value]] = {s.name: set() for s in NET_SETS}
    for net in nets:
        links = (net.bridge, net.tunnel) if net.tunnel else (net.bridge,)
        out["bridges"].update(links)
        # Within one network: the bridge to itself (br_netfilter) and between the bridge and
        # its tunnel, both ways; never tunnel to tunnel (no host relays another's traffic).
        out["intra"].update((a, b) for a in links for b in links if net.bridge in (a, b))
        if net.internal:
            out["internal"].update(links)
        for version in (4, 6):
            subnets = _collapse(s for s in net.subnets if s.version == version)
            out[f"bridge_nets{version}"].update((net.bridge, s) for s in subnets)
        for client in net.clients:
            out[f"vip_clients{client.version}"].update((link, client) for link in links)
    for version in (4, 6):
        # Interval sets refuse overlapping elements: merge what several networks share.
        out[f"masq{version}"].update(_collapse(
            s for n in nets if n.masquerade and not n.internal
            for s in n.subnets if s.version == version
        ))
    return {name: frozenset(elems) for name, elems in out.items()}


def pub_map(pub: Publication) -> str:
    """The maps' common prefix: ``pub4``, ``pub4_any``, ``pub6`` or ``pub6_any``."""
    return f"pub{pub.version}" + ("_any" if pub.host_ip is None else "")


def pub_key(pub: Publication) -> Value:
    port_key: tuple[Value, ...] = (pub.protocol, pub.host_port)
    return port_key if pub.host_ip is None else (pub.host_ip, *port_key)


def pub_elements(pubs: Iterable[Publication]) -> Elements:
    out: dict[str, set[Value]] = {s.name: set() for s in PUB_MAPS}
    for pub in pubs:
        name, key = pub_map(pub), pub_key(pub)
        out[f"{name}_addr"].add((key, pub.container_ip))
        out[f"{name}_port"].add((key, pub.container_port))
    return {name: frozenset(elems) for name, elems in out.items()}


def _collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


# -- commands ------------------------------------------------------------------------------------


def render_table(state: FirewallState) -> list[Json]:
    """Replace the whole table in one batch: what exists afterwards is exactly ``state``."""
    table = j.obj("table", name=j.TABLE)
    elements = {**net_elements(state.nets), **pub_elements(state.canonical().pubs)}
    return [
        # "add" first so that "delete" cannot fail on a missing table.
        j.cmd("add", table),
        j.cmd("delete", table),
        j.cmd("add", table),
        *(j.cmd("add", s.json()) for s in (*NET_SETS, *PUB_MAPS)),
        *(j.cmd("add", j.obj("counter", name=c)) for c in DROP_COUNTERS.values()),
        *(j.cmd("add", c) for c in _chains()),
        *(j.cmd("add", j.obj("rule", chain=c, expr=e)) for c, e in _rules()),
        *_element_cmds("add", elements),
    ]


def render_pub_delta(added: Iterable[Publication], removed: Iterable[Publication]) -> list[Json]:
    """Element-only update of the publication maps.

    Only elements that differ are touched (a publication moving to another container changes
    its ``*_addr`` element, not its ``*_port`` one), and deletions come first so a key can move.
    """
    return render_delta(pub_elements(removed), pub_elements(added))


def render_update(old: FirewallState, new: FirewallState) -> list[Json]:
    """Element-only batch turning ``old`` into ``new`` (empty if nothing changed).

    The sets, maps, chains and rules are the same for every state, so any change is a change of
    elements. The batch fails (and applies nothing) if the kernel does not hold ``old``.
    """
    old_pubs, new_pubs = old.canonical().pubs, new.canonical().pubs
    return [
        *render_net_delta(old.nets, new.nets),
        *render_pub_delta(new_pubs - old_pubs, old_pubs - new_pubs),
    ]


def render_net_delta(old: Iterable[NetRule], new: Iterable[NetRule]) -> list[Json]:
    """Element-only update of the network sets."""
    return render_delta(net_elements(old), net_elements(new))


def render_delta(old: Mapping[str, frozenset[Value]], new: Mapping[str, frozenset[Value]]) -> (
    list[Json]
):
    removed = {n: old.get(n, frozenset()) - new.get(n, frozenset()) for n in SPECS}
    added = {n: new.get(n, frozenset()) - old.get(n, frozenset()) for n in SPECS}
    return [*_element_cmds("delete", removed), *_element_cmds("add", added)]


def render_teardown() -> list[Json]:
    table = j.obj("table", name=j.TABLE)
    return [j.cmd("add", table), j.cmd("delete", table)]  # "add" makes a missing table harmless


def _element_cmds(verb: str, elements: Mapping[str, frozenset[Value]]) -> Iterator[Json]:
    for name, elems in elements.items():
        if elems:  # an empty "elem" list is a syntax error
            yield j.cmd(verb, j.obj("element", name=name, elem=_encode_elems(verb, name, elems)))


def _encode_elems(verb: str, name: str, elems: frozenset[Value]) -> list[object]:
    if SPECS[name].data is None:
        return [j.encode(e) for e in elems]
    pairs = [e for e in elems if isinstance(e, tuple)]
    if verb == "delete":  # a map element is deleted by its key alone
        return [j.encode(k) for k, _ in pairs]
    return [[j.encode(k), j.encode(d)] for k, d in pairs]


# -- chains and rules ----------------------------------------------------------------------------


def _chains() -> list[Json]:
    def base(name: str, kind: str, hook: str, prio: int) -> Json:
        return j.obj("chain", name=name, type=kind, hook=hook, prio=prio, policy="accept")

    return [
        base("prerouting_filter", "filter", "prerouting", PRIO_RAW),
        base("prerouting_dnat", "nat", "prerouting", PRIO_DSTNAT),
        base("output_dnat", "nat", "output", PRIO_DSTNAT),
        base("forward", "filter", "forward", PRIO_FILTER),
        base("input", "filter", "input", PRIO_FILTER),
        base("postrouting_nat", "nat", "postrouting", PRIO_SRCNAT),
    ]


def _rules() -> Iterator[tuple[str, list[Json]]]:
    yield from (("prerouting_filter", r) for r in _localnet_guard())
    yield from (("prerouting_dnat", r) for r in _dnat(from_host=False))
    yield from (("output_dnat", r) for r in _dnat(from_host=True))
    yield from (("forward", r) for r in _forward())
    yield from (("input", r) for r in _input())
    yield from (("postrouting_nat", r) for r in _postrouting())


IIF, OIF = j.meta("iifname"), j.meta("oifname")
TCP_UDP = j.match(j.meta("l4proto"), j.anon_set("tcp", "udp"))
PORT = j.payload("th", "dport")
LOOPBACK4 = ipaddress.ip_network("127.0.0.0/8")
ACCEPT, DROP = j.verdict("accept"), j.verdict("drop")


def _localnet_guard() -> Iterator[list[Json]]:
    yield [j.match(IIF, "lo", "!="), j.match(j.payload("ip", "daddr"), j.encode(LOOPBACK4)), DROP]


def _dnat(*, from_host: bool) -> Iterator[list[Json]]:
    local = j.match(j.fib_daddr_type(), "local")
    for version, ip in ((4, "ip"), (6, "ip6")):
        daddr = j.payload(ip, "daddr")
        # ::1 cannot leave lo (no route_localnet for IPv6): leave it to a local listener.
        guard = [j.match(daddr, "::1", "!=")] if from_host and version == 6 else []
        family = j.match(j.meta("nfproto"), "ipv4" if version == 4 else "ipv6")
        yield [local, *guard, TCP_UDP,
               j.dnat_maps(ip, j.concat(daddr, j.meta("l4proto"), PORT), f"pub{version}")]
        yield [local, family, *guard, TCP_UDP,
               j.dnat_maps(ip, j.concat(j.meta("l4proto"), PORT), f"pub{version}_any")]


def _forward() -> Iterator[list[Json]]:
    bridges, internal = j.ref("bridges"), j.ref("internal")
    yield [j.flags_in(j.ct("state"), "established", "related"), ACCEPT]
    yield [j.match(j.concat(IIF, OIF), j.ref("intra")), ACCEPT]  # one network (br_netfilter)
    yield from _drop([j.match(IIF, internal)], "internal")
    yield from _drop([j.match(OIF, internal)], "internal")
    # A service's VIP leads to its backends, but only from their own network (or another host's
    # part of it, through the tunnel: ``intra``), as if the client had called the backend; a
    # member of the network that sent from its address on another network included.
    vip = j.match(j.ct("label"), VIA_VIP, "in")
    for version, ip in ((4, "ip"), (6, "ip6")):
        client = j.concat(OIF, j.payload(ip, "saddr"))
        yield [vip, j.match(client, j.ref(f"vip_clients{version}")), ACCEPT]
    yield from _drop([vip, j.match(IIF, bridges), j.match(OIF, bridges)], "isolation")
    yield [j.flags_in(j.ct("status"), "dnat"), j.match(OIF, bridges), ACCEPT]  # published
    yield from _drop([j.match(IIF, bridges), j.match(OIF, bridges)], "isolation")  # networks
    # Nothing reaches a container unless published.
    yield from _drop([j.match(OIF, bridges)], "unpublished")


def _drop(matches: list[Json], reason: str) -> Iterator[list[Json]]:
    """Log to the flow log's group (at most ``LOG_RATE`` a second: a rule of its own, since a
    limit that runs out ends its rule), then count into the reason's named counter and drop."""
    yield [*matches, {"limit": {"rate": LOG_RATE, "per": "second"}},
           {"log": {"prefix": reason, "group": LOG_GROUP}}]
    yield [*matches, {"counter": DROP_COUNTERS[reason]}, DROP]


def _input() -> Iterator[list[Json]]:
    # Internal networks may reach the host only for DNS and IPv6 neighbour discovery. Replies to
    # what the host itself opened stay allowed (health checks, the agent's own probes).
    nd_types = j.anon_set("nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert")
    yield [j.match(IIF, j.ref("internal"), "!="), ACCEPT]
    yield [j.flags_in(j.ct("state"), "established", "related"), ACCEPT]
    yield [TCP_UDP, j.match(PORT, 53), ACCEPT]
    yield [j.match(j.payload("icmpv6", "type"), nd_types), ACCEPT]
    yield [DROP]


def _postrouting() -> Iterator[list[Json]]:
    dnat, bridges = j.flags_in(j.ct("status"), "dnat"), j.ref("bridges")
    for version, ip in ((4, "ip"), (6, "ip6")):
        saddr = j.payload(ip, "saddr")
        yield [dnat, j.match(j.concat(OIF, saddr), j.ref(f"bridge_nets{version}")), j.masquerade()]
    yield [dnat, j.match(OIF, bridges), j.match(j.payload("ip", "saddr"), j.encode(LOOPBACK4)),
           j.masquerade()]
    for version, ip in ((4, "ip"), (6, "ip6")):
        saddr = j.payload(ip, "saddr")
        yield [j.match(OIF, bridges, "!="), j.match(saddr, j.ref(f"masq{version}")), j.masquerade()]

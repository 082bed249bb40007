"""``plexus policy explain``: the verdict on one connection from the policies in force, with
every policy and rule that decided it (``policy.evaluate``), for endpoints named by container
or by address, and for addresses outside the cluster."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from plexus.errors import Conflict, InvalidArgument, NotFound
from plexus.model.types import Endpoint, IPAddress
from plexus.policy.evaluate import Evaluator, Flow, Party, Verdict, Workload
from plexus.state.cache import Cache

Resolve = Callable[[str], list[Endpoint]]
"""A container's endpoints by the name or ID `ps` shows (NotFound if none)."""


def workload(ep: Endpoint) -> Workload:
    ports = {(x.name, x.protocol): x.port for x in ep.exposes if x.name}
    return Workload(ep.name or ep.container_id[:12], ep.policy_namespace, dict(ep.labels), ports)


def evaluator(cache: Cache) -> Evaluator:
    namespaces = {n: ns.all_labels for n, ns in cache.namespaces.items()}
    return Evaluator(list(cache.policies.values()), namespaces)


def parse_port(value: str) -> tuple[int, str]:
    """``PORT/PROTO`` (tcp by default)."""
    port, _, proto = value.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp") or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument("port", value, "expected PORT[/tcp|udp|sctp], PORT 1 to 65535")
    return int(port), proto


def party(cache: Cache, resolve: Resolve, ref: str, local: set[IPAddress],
          peer: list[Endpoint] | None = None) -> tuple[Party, list[Endpoint]]:
    """A container (by name or ID: its address on a network it shares with ``peer``) or an
    address (an endpoint's, a host's, or the world's)."""
    try:
        address = ipaddress.ip_address(ref)
    except ValueError:
        eps = resolve(ref)
        ep = _facing(eps, peer or [])
        if ep is None:
            raise InvalidArgument("from/to", ref, "has no address") from None
        ip = ep.address_of(4) or ep.address_of(6)
        assert ip is not None
        return Party(ip, workload(ep)), eps
    owner = next((e for e in cache.endpoints.values()
                  if any(a.ip == address for a in e.addresses)), None)
    if owner is not None:
        return Party(address, workload(owner)), [owner]
    hosts = {h.address for h in cache.hosts.values()}
    is_host = address in local or str(address) in hosts
    return Party(address, host=is_host, local_host=address in local), []


def _facing(eps: list[Endpoint], peer: list[Endpoint]) -> Endpoint | None:
    shared = {e.network for e in peer}
    with_address = [e for e in eps if e.addresses]
    return next((e for e in with_address if e.network in shared),
                with_address[0] if with_address else None)


def across_hosts(cache: Cache, resolve: Resolve) -> Resolve:
    """``resolve`` (this host's containers, as `ps` lists them), else a container of another
    host by its name: a policy spans hosts, and so does the question which one decided."""
    def find(ref: str) -> list[Endpoint]:
        try:
            return resolve(ref)
        except NotFound:
            found: dict[tuple[str, str], list[Endpoint]] = {}
            for e in cache.endpoints.values():
                if e.name == ref:
                    found.setdefault((e.node, e.container_id), []).append(e)
            if len(found) > 1:
                hosts = ", ".join(sorted(node for node, _ in found))
                raise Conflict(f"container {ref!r} is ambiguous: one on each of hosts "
                               f"{hosts}; name it by address") from None
            if not found:
                raise
            return next(iter(found.values()))

    return find


def explain(cache: Cache, resolve: Resolve, src: str, dst: str, port: str,
            local: set[IPAddress]) -> tuple[Flow, Verdict]:
    number, proto = parse_port(port)
    resolve = across_hosts(cache, resolve)
    try:
        to, dst_eps = party(cache, resolve, dst, local)
        frm, src_eps = party(cache, resolve, src, local, dst_eps)
        if dst_eps and src_eps:  # the destination's address on a network the source shares
            to, _ = party(cache, resolve, dst, local, src_eps)
    except NotFound as exc:
        raise InvalidArgument("from/to", src if src in exc.message else dst,
                              "neither a container nor an address") from None
    flow = Flow(frm, to, proto, number)
    return flow, evaluator(cache).verdict(flow)

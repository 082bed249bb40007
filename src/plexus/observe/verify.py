"""``plexus verify``: does the kernel do what the model says? The expectations
(``observe.expect``) probed with real packets from the sources' namespaces (``observe.probe``),
every disagreement reported with the reason the model gave.

What a probe's outcome means: TCP to a container reached it when it connected or was refused
(its stack answered); a published port reached its container only when it connected (a port
that is not DNATed is the host's own, which refuses too), so it is decidable only when the
container listens on the port and the host does not. UDP reached it when refused (ICMP port
unreachable) or answered; its silence is a drop only when nothing listens on the port, and a
UDP probe to another host's container, whose sockets this host cannot see, is reported but not
judged. Silence and "unreachable" mean it did not. A VIP (``observe.expect_services``) is
reached when the connection completes; one that does not tells only when every ready endpoint
is on this host and listens on its port (a refusal may be an endpoint's own); a VIP without
endpoints must refuse, and anything else (silence, a connection) disagrees.

Order: the probes that leave the source's segment (isolation, published ports) all at once;
those to a neighbour on the segment in rounds that bound the neighbour entries they make, taken
back after each round (``observe.neigh`` says why); then every disagreement once more, so that a
SYN lost to a full queue is not reported as a drop.

Threads: the expectations are computed on a worker thread from a snapshot of the cache; each
source namespace's probes run on a short-lived thread that entered it (``netns.run_in_netns``),
at most ``WORKERS`` at once with ``window()`` sockets each in flight (bounded by the agent's
descriptor limit); the report is judged on a worker thread too: nothing runs on the event loop
but the waiting.
"""

from __future__ import annotations

import asyncio
import math
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from plexus.dataplane.netns import run_in_netns
from plexus.errors import PlexusError
from plexus.model.types import Endpoint
from plexus.observe import probe
from plexus.observe.expect import Expectation, Model
from plexus.observe.expect_services import expected
from plexus.observe.neigh import BUDGET, Entry, Neighbours
from plexus.observe.probe import Outcome, Result, Target

WORKERS = 64  # namespaces probed at once: each waits up to a timeout for its silences
TIMEOUT = 1.0  # seconds a probe waits: a container on this host answers in well under 10 ms
MULTI_HOST = ("pairs whose source is on another host are that host's to verify "
              "(plexus verify there)")

Listeners = dict[str, set[tuple[str, int]]]  # netns path ("" the host's) -> (proto, port)


@dataclass(frozen=True, slots=True)
class Checked:
    expected: Expectation
    result: Result
    reached: bool
    agrees: bool | None  # None: the outcome cannot tell (``undecided`` says why)
    undecided: str = ""


def reached(e: Expectation, r: Result) -> bool:
    if e.published or e.service is not None:
        return r.outcome is Outcome.CONNECTED
    return r.outcome in (Outcome.CONNECTED, Outcome.REFUSED)


def judge(e: Expectation, r: Result, listeners: Listeners) -> Checked:
    """Compare one outcome with its expectation (pure)."""
    got = reached(e, r)
    why = e.decidable or _ambiguous(e, r, listeners)
    if why:
        return Checked(e, r, got, None, why)
    if e.refused:
        return Checked(e, r, got, r.outcome is Outcome.REFUSED)
    return Checked(e, r, got, got == e.reachable)


def _ambiguous(e: Expectation, r: Result, listeners: Listeners) -> str:
    if r.outcome is Outcome.ERROR:
        return f"could not probe: {r.detail}"
    if e.service is not None:
        return _unseen(e, r, listeners)
    serving = listeners.get(e.target.netns, set()) if e.target.netns else set()
    if e.published:
        if ("tcp", e.container_port) not in serving:
            return f"nothing listens on {e.container_port}/tcp in the container"
        if ("tcp", e.port) in listeners.get("", set()):
            return f"the host itself listens on {e.port}/tcp"
        return ""
    if e.protocol == "udp" and r.outcome is Outcome.SILENT and ("udp", e.port) in serving:
        return f"a socket listens on {e.port}/udp: its silence is no drop"
    return ""


def _unseen(e: Expectation, r: Result, listeners: Listeners) -> str:
    """Why a VIP probe that did not connect cannot tell, if it cannot: an endpoint it may have
    been sent to would not have accepted it either."""
    if e.refused or r.outcome is Outcome.CONNECTED:
        return ""
    proto = "tcp6" if e.address.version == 6 else "tcp"
    for ep, port in e.backends:
        if ep.netns not in listeners or not ep.netns:
            return f"endpoint {name(ep)} is on another host (its sockets unseen)"
        if (proto, port) not in listeners[ep.netns]:
            family = " over IPv6" if e.address.version == 6 else ""
            return f"nothing listens on {port}/tcp{family} in endpoint {name(ep)}"
    return ""


async def verify(model: Model, network: str | None = None,
                 timeout: float = TIMEOUT) -> dict[str, Any]:
    """Probe every expectation of this host; the report (``report``). A disagreement is
    probed once more before it is reported (a SYN lost to a full queue is not a drop)."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    neighbours = Neighbours()
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="verify") as pool:
        wanted = await loop.run_in_executor(pool, expected, model, network)
        listeners = await _listeners(pool, model, wanted)
        try:
            results = await _probe_all(pool, wanted, range(len(wanted)), timeout, neighbours,
                                       model.node)
            again = [i for i, e in enumerate(wanted)
                     if judge(e, results[i], listeners).agrees is False]
            results.update(await _probe_all(pool, wanted, again, timeout, neighbours,
                                             model.node))
        finally:
            await loop.run_in_executor(pool, neighbours.close)
        return await loop.run_in_executor(pool, _report, model.node, wanted, results, listeners,
                                          started, timeout)


def _report(node: str, wanted: list[Expectation], results: dict[int, Result],
            listeners: Listeners, started: float, timeout: float) -> dict[str, Any]:
    checked = [judge(e, results[i], listeners) for i, e in enumerate(wanted)]
    return report(node, checked, time.monotonic() - started, timeout)


async def _probe_all(pool: ThreadPoolExecutor, wanted: list[Expectation], which: Iterable[int],
                     timeout: float, neighbours: Neighbours, node: str) -> dict[int, Result]:
    """Probe ``which``: the pairs of one segment in rounds (``neigh`` says why), the others
    all at once."""
    loop = asyncio.get_running_loop()
    results: dict[int, Result] = {}
    others, batches = await loop.run_in_executor(pool, _plan, wanted, list(which), node)
    await _probe(pool, wanted, others, timeout, results)
    for batch, entries in batches:
        await _probe(pool, wanted, batch, timeout, results)
        await loop.run_in_executor(pool, neighbours.forget, entries)
    return results


def _plan(wanted: list[Expectation], which: list[int],
          node: str) -> tuple[Groups, list[tuple[Groups, list[Entry]]]]:
    """The probes off the segment, and the rounds on it with the entries each makes, grouped
    by source (on a worker thread: 40,000 probes would take the loop's time otherwise)."""
    others = _group(wanted, (i for i in which if not on_link(wanted[i])))
    batches = rounds(wanted, [i for i in which if on_link(wanted[i])], node)
    return others, [(_group(wanted, b), [x for i in b for x in made(wanted[i], node)])
                    for b in batches]


async def _listeners(pool: ThreadPoolExecutor, model: Model,
                     wanted: list[Expectation]) -> Listeners:
    loop = asyncio.get_running_loop()
    needs = {e.dst.netns for e in wanted if e.dst is not None and e.dst.node == model.node
             and e.dst.netns and (e.published or e.protocol == "udp")}
    needs |= {ep.netns for e in wanted for ep, _ in e.backends
              if ep.node == model.node and ep.netns}
    found = dict(zip(needs, await asyncio.gather(
        *(loop.run_in_executor(pool, _listening, ns) for ns in needs)), strict=True))
    found[""] = await loop.run_in_executor(pool, probe.listening)
    return found


Groups = dict[str, list[int]]  # source netns ("" the host) -> indexes of its probes


async def _probe(pool: ThreadPoolExecutor, wanted: list[Expectation], groups: Groups,
                 timeout: float, into: dict[int, Result]) -> None:
    """Probe each source's group from its namespace, the sources in parallel."""
    loop = asyncio.get_running_loop()
    batches = await asyncio.gather(*(loop.run_in_executor(
        pool, _probe_from, ns, wanted, ids, timeout) for ns, ids in groups.items()))
    for ids, rs in zip(groups.values(), batches, strict=True):
        into.update(zip(ids, rs, strict=True))


def _group(wanted: list[Expectation], which: Iterable[int]) -> Groups:
    out: Groups = {}
    for i in which:
        src = wanted[i].src
        out.setdefault(src.netns if src else "", []).append(i)
    return out


def on_link(e: Expectation) -> bool:
    """A probe to a neighbour of the source's own segment (which makes neighbour entries)."""
    return (e.src is not None and e.dst is not None and not e.published
            and e.src.network == e.dst.network)


def made(e: Expectation, node: str) -> list[Entry]:
    """The neighbour entries a probe on a link makes on this host."""
    assert e.src is not None
    out: list[Entry] = [(e.src.netns, e.src.ifname, e.address)]
    mine = e.src.address_of(e.address.version)
    dst = e.target
    if dst.node == node and dst.netns and mine is not None:
        out.append((dst.netns, dst.ifname, mine))
    return out


def rounds(wanted: list[Expectation], linked: list[int], node: str) -> list[list[int]]:
    """``linked`` cut into rounds that make at most BUDGET neighbour entries each: tiles of
    the (source, destination) matrix, sources and destinations sorted by network so a tile
    is dense, merged while they fit. A tile touches few namespaces, so taking its entries
    back costs few netlink requests (a whole source per round would reach every
    destination's namespace each round: N x N requests)."""
    side = max(1, math.isqrt(BUDGET // 2))
    srcs = sorted({(_src(wanted[i]).network, _src(wanted[i]).netns) for i in linked})
    dsts = sorted({(wanted[i].target.network, wanted[i].target.store_key) for i in linked})
    src_tile = {ns: n // side for n, (_, ns) in enumerate(srcs)}
    dst_tile = {key: n // side for n, (_, key) in enumerate(dsts)}
    tiles: dict[tuple[int, int], list[int]] = {}
    for i in linked:
        tile = (src_tile[_src(wanted[i]).netns], dst_tile[wanted[i].target.store_key])
        tiles.setdefault(tile, []).append(i)
    out: list[list[int]] = []
    size = 0
    for tile in sorted(tiles):
        ids = tiles[tile]
        cost = len({x for i in ids for x in made(wanted[i], node)})
        if not out or size + cost > BUDGET:
            out.append([])
            size = 0
        out[-1].extend(ids)
        size += cost
    return out


def _src(e: Expectation) -> Endpoint:
    assert e.src is not None
    return e.src


def window() -> int:
    """Probes one namespace keeps in flight: WORKERS x window() sockets stay well inside the
    agent's descriptor limit (1,024 under a default systemd unit), up to 4,096 in all."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = 4096 if soft == resource.RLIM_INFINITY else min(4096, (soft - 512) // 2)
    return max(8, budget // WORKERS)


def _target(e: Expectation) -> Target:
    return Target(e.address, e.port, e.protocol)


def _in(netns: str, fn: Callable[[], Any]) -> Any:
    return fn() if not netns else run_in_netns(netns, fn)


def _listening(netns: str) -> set[tuple[str, int]]:
    try:
        found: set[tuple[str, int]] = _in(netns, probe.listening)
    except (PlexusError, OSError):
        return set()
    return found


def _probe_from(netns: str, wanted: list[Expectation], ids: list[int],
                timeout: float) -> list[Result]:
    targets = [_target(wanted[i]) for i in ids]
    try:
        results: list[Result] = _in(netns, lambda: probe.run(targets, timeout, window()))
    except (PlexusError, OSError) as exc:
        return [Result(Outcome.ERROR, f"namespace {netns}: {exc}")] * len(targets)
    return results


# -- the report ----------------------------------------------------------------------------------


def name(e: Any) -> str:
    return "host" if e is None else (e.name or e.container_id[:12])


def _to(e: Expectation) -> tuple[str, str, str]:
    """Who a probe calls: a container (name, network, node), or a service (NS/NAME, its
    network, no node)."""
    if e.service is not None:
        return e.service.ref, e.service.network, ""
    return name(e.target), e.target.network, e.target.node


def _observed(e: Expectation, c: Checked) -> str:
    if e.service is not None and c.result.outcome is Outcome.REFUSED:
        return "refused"  # a VIP's reset: no endpoint (or one that does not listen)
    return "reachable" if c.reached else "blocked"


def view(c: Checked) -> dict[str, Any]:
    e = c.expected
    to, to_network, to_node = _to(e)
    return {
        "from": name(e.src), "from_network": e.src.network if e.src else "",
        "to": to, "to_network": to_network, "to_node": to_node,
        "service": e.service.ref if e.service is not None else "",
        "address": str(e.address), "port": e.port, "protocol": e.protocol,
        "container_port": e.container_port or e.port,
        "expected": "refused" if e.refused else "reachable" if e.reachable else "blocked",
        "reason": e.reason, "observed": _observed(e, c),
        "outcome": c.result.outcome.value, "detail": c.result.detail, "ms": c.result.ms,
        "agrees": c.agrees, "undecided": c.undecided,
    }


def report(node: str, checked: Sequence[Checked], seconds: float,
           timeout: float) -> dict[str, Any]:
    probes = [view(c) for c in checked]
    wrong = [p for p in probes if p["agrees"] is False]
    return {
        "node": node, "agrees": not wrong, "seconds": round(seconds, 3), "timeout": timeout,
        "counts": {"probes": len(probes), "agree": sum(p["agrees"] is True for p in probes),
                   "disagree": len(wrong),
                   "undecided": sum(p["agrees"] is None for p in probes)},
        "mismatches": wrong, "probes": probes, "notes": [MULTI_HOST],
    }

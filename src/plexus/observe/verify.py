"""``plexus verify``: does the kernel do what the model says? The expectations
(``observe.expect``) probed with real packets from the sources' namespaces (``observe.probe``),
every disagreement reported with the reason the model gave.

What a probe's outcome means: TCP to a container reached it when it connected or was refused
(its stack answered); a published port reached its container only when it connected (a port
that is not DNATed is the host's own, which refuses too), so it is decidable only when the
container listens on the port and the host does not. UDP reached it when refused (ICMP port
unreachable) or answered; its silence is a drop only when nothing listens on the port, and a
UDP probe to another host's container, whose sockets this host cannot see, is reported but not
judged. Silence and "unreachable" mean it did not.

Threads: the expectations are computed on a worker thread from a snapshot of the cache; each
source namespace's probes run on a short-lived thread that entered it (``netns.run_in_netns``),
at most ``WORKERS`` at once with ``WINDOW`` sockets each in flight, so at most WORKERS x WINDOW
descriptors are open and a probe never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from plexus.dataplane.netns import run_in_netns
from plexus.errors import PlexusError
from plexus.observe import probe
from plexus.observe.expect import Expectation, Model, expectations
from plexus.observe.probe import Outcome, Result, Target

WORKERS = 16
WINDOW = 64
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
    if e.published:
        return r.outcome is Outcome.CONNECTED
    return r.outcome in (Outcome.CONNECTED, Outcome.REFUSED)


def judge(e: Expectation, r: Result, listeners: Listeners) -> Checked:
    """Compare one outcome with its expectation (pure)."""
    got = reached(e, r)
    why = e.decidable or _ambiguous(e, r, listeners)
    if why:
        return Checked(e, r, got, None, why)
    return Checked(e, r, got, got == e.reachable)


def _ambiguous(e: Expectation, r: Result, listeners: Listeners) -> str:
    if r.outcome is Outcome.ERROR:
        return f"could not probe: {r.detail}"
    serving = listeners.get(e.dst.netns, set()) if e.dst.netns else set()
    if e.published:
        if ("tcp", e.container_port) not in serving:
            return f"nothing listens on {e.container_port}/tcp in the container"
        if ("tcp", e.port) in listeners.get("", set()):
            return f"the host itself listens on {e.port}/tcp"
        return ""
    if e.protocol == "udp" and r.outcome is Outcome.SILENT and ("udp", e.port) in serving:
        return f"a socket listens on {e.port}/udp: its silence is no drop"
    return ""


async def verify(model: Model, network: str | None = None,
                 timeout: float = TIMEOUT) -> dict[str, Any]:
    """Probe every expectation of this host; the report (``report``)."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="verify") as pool:
        wanted = await loop.run_in_executor(pool, expectations, model, network)
        by_source: dict[str, list[Expectation]] = {}
        for e in wanted:
            by_source.setdefault(e.src.netns if e.src else "", []).append(e)
        needs = {e.dst.netns for e in wanted if e.dst.node == model.node
                 and (e.published or e.protocol == "udp")}
        listeners = dict(zip(needs, await asyncio.gather(
            *(loop.run_in_executor(pool, _listening, ns) for ns in needs)), strict=True))
        listeners[""] = await loop.run_in_executor(pool, probe.listening)
        batches = await asyncio.gather(*(loop.run_in_executor(
            pool, _probe_from, ns, [_target(e) for e in es], timeout)
            for ns, es in by_source.items()))
    checked = [judge(e, r, listeners) for es, rs in zip(by_source.values(), batches, strict=True)
               for e, r in zip(es, rs, strict=True)]
    return report(model.node, checked, time.monotonic() - started, timeout)


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


def _probe_from(netns: str, targets: list[Target], timeout: float) -> list[Result]:
    try:
        results: list[Result] = _in(netns, lambda: probe.run(targets, timeout, WINDOW))
    except (PlexusError, OSError) as exc:
        return [Result(Outcome.ERROR, f"namespace {netns}: {exc}")] * len(targets)
    return results


# -- the report ----------------------------------------------------------------------------------


def name(e: Any) -> str:
    return "host" if e is None else (e.name or e.container_id[:12])


def view(c: Checked) -> dict[str, Any]:
    e = c.expected
    return {
        "from": name(e.src), "from_network": e.src.network if e.src else "",
        "to": name(e.dst), "to_network": e.dst.network, "to_node": e.dst.node,
        "address": str(e.address), "port": e.port, "protocol": e.protocol,
        "container_port": e.container_port or e.port,
        "expected": "reachable" if e.reachable else "blocked", "reason": e.reason,
        "observed": "reachable" if c.reached else "blocked",
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

"""Traffic through a service's VIP, as its clients see it: which backends answer, and which
source address each backend saw (the echo servers answer ``NAME PEER_IP``)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.harness.probes import ANSWERED, Probe, http_probe, tcp_probe


def answers(ns: str, vip: str, count: int, port: int = 80, timeout: float = 2.0,
            probe: Callable[[str, str, int, float], Probe] = tcp_probe,
            ) -> collections.Counter[str]:
    """``count`` connections from namespace ``ns`` to ``vip``:``port``: how many each answer
    got (an answer's first line; an outcome name for a connection not answered)."""

    def one(_: int) -> str:
        got = probe(ns, vip, port, timeout)
        return got.answer.splitlines()[0] if got.outcome is ANSWERED and got.answer \
            else str(got.outcome)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return collections.Counter(pool.map(one, range(count)))


def backends(ns: str, vip: str, count: int, port: int = 80) -> collections.Counter[str]:
    """The echo backends that answered ``count`` connections (their names), and how often."""
    return collections.Counter({k.split()[0]: n for k, n in answers(ns, vip, count, port).items()})


def http_backends(ns: str, vip: str, count: int, port: int = 80) -> collections.Counter[str]:
    """As ``backends``, for HTTP servers whose page is their name (a Docker's or Podman's
    busybox httpd): the body's last line, or the outcome."""

    def body(n: str, v: str, p: int, t: float) -> Probe:
        got = http_probe(n, v, p, t)
        lines = got.answer.strip().splitlines()
        return Probe(got.outcome, lines[-1] if lines else "", got.error) \
            if got.outcome is ANSWERED else got

    return answers(ns, vip, count, port, probe=body)

"""`plexus verify` time for 50 and 200 containers (the issue's figure): how long the agent
takes to compute every expectation of this host and probe it with real packets.

    tests/sandbox .venv/bin/python bench/verify.py [--sizes 50,200] [--networks 1,5]
                                                   [--timeout 1.0] [--rounds 2]

A real agent in the World's host1, containers started with `plexus run` (their process is
`sleep`: nothing listens, so a reachable pair answers with an RST, which costs the probe the
same as a SYN-ACK), spread round-robin over 1 or 5 bridge networks. With one network every
pair answers at once; with five, 80 % of the pairs are isolated and each such probe waits the
whole --timeout (the cost of a drop: silence). Every container is probed from every other on
the default port (80/tcp): N x (N - 1) probes. Timed: the `plexus verify` command end to end
(the CLI's process, the API call, expectations, probes, report), and the agent's own figure.
Meanwhile GET /v1/status is sampled every 50 ms: its p50 and worst latency say whether the
agent keeps serving while it verifies (the probes run on threads, never on its event loop).
Nothing is asserted; the agent's verdict (agrees or not) is printed alongside.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from _common import header, percentile, print_table, require_sandbox

from plexus.api.client import Client
from tests.harness.world import Agent, World

COLUMNS = ["containers", "networks", "round", "probes", "verify s", "agent s", "agrees",
           "API p50 ms", "API max ms", "setup s"]


def _fill(agent: Agent, containers: int, networks: int) -> None:
    for n in range(networks):
        agent.cli("network", "create", f"n{n}", "--subnet", f"10.{60 + n}.0.0/22")
    for i in range(containers):
        agent.cli("run", "-d", "--name", f"c{i}", "--network", f"n{i % networks}", "--",
                  "sleep", "3600")


def _measure(agent: Agent, timeout: float) -> tuple[float, dict[str, object], list[float]]:
    """The verify's wall time and report, and GET /v1/status latencies (ms) sampled while it
    ran: does the agent keep answering?"""
    done = threading.Event()
    latencies: list[float] = []

    def sample() -> None:
        client = Client(str(agent.socket))
        while not done.wait(0.05):
            t = time.monotonic()
            client.call("GET", "/v1/status")
            latencies.append(1000 * (time.monotonic() - t))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    r = agent.cli("verify", "--json", "--timeout", str(timeout), check=False, timeout=600)
    wall = time.monotonic() - started
    done.set()
    sampler.join(timeout=30)
    return wall, json.loads(r.stdout), latencies


def run(sizes: list[int], shapes: list[int], timeout: float, rounds: int) -> None:
    rows = []
    for size in sizes:
        for networks in shapes:
            with tempfile.TemporaryDirectory(prefix="plexus-bench-verify-") as tmp, \
                    World(Path(tmp) / "world") as world:
                agent = world.add_host("host1")
                t0 = time.monotonic()
                _fill(agent, size, networks)
                fill = time.monotonic() - t0
                for r in range(rounds):
                    wall, report, api = _measure(agent, timeout)
                    counts = report["counts"]
                    assert isinstance(counts, dict)
                    rows.append([size, networks, r + 1, counts["probes"],
                                 f"{wall:.2f}", f"{report['seconds']:.2f}",
                                 "yes" if report["agrees"] else f"no ({counts['disagree']})",
                                 f"{percentile(api, 50):.1f}", f"{max(api, default=0):.1f}",
                                 f"{fill:.0f}"])
                    print_table(COLUMNS, rows[-1:])
    header("plexus verify: time to probe every pair of a host's containers",
           [f"probe timeout {timeout:g} s; up to 4,096 probes in flight, 64 namespaces at a time",
            "a disagreement is probed twice; pairs of one segment in rounds (observe/neigh.py)"])
    print_table(COLUMNS, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="50,200")
    parser.add_argument("--networks", default="1,5")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not require_sandbox("verify.py"):
        return
    run([int(x) for x in args.sizes.split(",")], [int(x) for x in args.networks.split(",")],
        args.timeout, args.rounds)


if __name__ == "__main__":
    main()

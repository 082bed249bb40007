"""What a Prometheus scrape of the agent costs as containers grow: the time ``GET /metrics``
takes and the size of its answer, with 100 and 1,000 containers attached (and traffic counters
for each, read from the kernel in the same scrape).

    tests/sandbox .venv/bin/python bench/metrics_scrape.py [--sizes 100,1000] [--scrapes 20]
                                                           [--settle 61]

The agent runs in netns "host1" (tests/harness World) with ``--metrics-address :9100``;
containers are attached through the API (``POST /v1/endpoints``, 8 at a time) to networks of
a /22 each (a bridge takes at most 1,024 ports). Each level then scrapes back to back and prints
the median and the slowest scrape, the answer's size, its number of series, the agent's
recent longest event-loop stall (``GET /v1/status``: what a scrape holds the loop for, at most)
and how long each source took to read in the last scrape. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import netns_batch

from plexus.api.client import Client
from tests.harness.prometheus import http_get
from tests.harness.world import World

PORT = 9100
PER_NETWORK = 1000


def attach(client: Client, start: int, stop: int) -> None:
    netns_batch("add", [f"m{i}" for i in range(start, stop)])

    def one(i: int) -> None:
        client.post("/v1/endpoints", {"container_id": f"m{i}", "network": f"n{i // PER_NETWORK}",
                                      "netns": f"/run/netns/m{i}", "ifname": "eth0",
                                      "name": f"m{i}"})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(start, stop)))


def scrape(host: str, count: int) -> tuple[list[float], int, int]:
    times: list[float] = []
    body = ""
    for _ in range(count):
        t0 = time.perf_counter()
        status, body = http_get(host, "127.0.0.1", PORT, "/metrics", timeout=30)
        times.append(time.perf_counter() - t0)
        assert status == 200, status
    series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
    sources = re.findall(r'^plexus_scrape_source_duration_seconds\{source="(\w+)"\} (\S+)$',
                         body, re.M)
    print("    last scrape's sources, ms: " + ", ".join(f"{s} {float(v) * 1000:.1f}"
                                                    for s, v in sources))
    return times, len(body), series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--settle", type=float, default=61.0,
                        help="seconds to wait after attaching (the agent's stall window: 60)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with World(Path(tempfile.mkdtemp()) / "world") as world:
        agent = world.add_host("host1", start_agent=False)
        agent.start(extra=["--metrics-address", f":{PORT}"])
        client = Client(str(agent.socket), timeout=300)
        for n in range((max(sizes) + PER_NETWORK - 1) // PER_NETWORK):
            agent.cli("network", "create", f"n{n}", "--subnet", f"10.{100 + n}.0.0/22")
        attached = 0
        print(f"{'containers':>10} {'median ms':>10} {'max ms':>8} {'bytes':>9} {'series':>7}")
        for size in sizes:
            attach(client, attached, size)
            attached = size
            time.sleep(args.settle)  # the attaches' own loop stalls age out of "recent"
            quiet = client.get("/v1/status").get("loop_stall_recent_ms", "?")
            times, size_bytes, series = scrape(agent.host, args.scrapes)
            stall = client.get("/v1/status").get("loop_stall_recent_ms", "?")
            print(f"{size:>10} {statistics.median(times) * 1000:>10.1f} "
                  f"{max(times) * 1000:>8.1f} {size_bytes:>9} {series:>7}"
                  f"   loop stall ms: {quiet} before, {stall} with scrapes", flush=True)


if __name__ == "__main__":
    main()

"""DNS record updates: one endpoint added or removed with ``DnsService.apply`` (incremental)
against a full rebuild from every network and endpoint (``DnsService.load``, what every change
cost before), at several table sizes, in the agent's event loop and through a worker process.

    PYTHONPATH=$PWD .venv/bin/python bench/dns_update.py [--sizes 100,1000,5000] [--rounds 200]

No root needed: the listeners are on loopback addresses (127.8.0.1 and 127.9.0.1), on ports the
kernel picks.

Record set: N containers cI on network "bench" (127.8.0.0/16), each with an alias cI-alias and
one IPv4 address; one in ten is on a second network "other" too (so that client views exist).
Endpoints are keyed by datastore key, as the agent does. Before measuring, a few names are asked
so that views hold ready-made answers (a change has caches to drop, as in real use).

What is timed:
  in-process   the ``apply``/``load`` call itself (DnsService(workers=0)): the records and the
               server's views are up to date when it returns;
  worker       from the call until a lookup of the changed name, asked over and over from this
               process, gets the new answer from the worker (DnsService(workers=1)): the
               parent's own update, the pipe, the worker's update and one lookup round trip
               (shown on its own as "lookup RTT").
Medians over the rounds; a full rebuild is timed over fewer rounds (it is slow): at least 3,
at most about a second's (two, through the worker) worth.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial

from _common import header, print_table, ratio

from plexus.dns import DnsChanges, DnsService
from plexus.dns.wire import QType, build_query, parse_records
from plexus.model import keys
from plexus.model.types import Endpoint, Network, Subnet

BENCH = ipaddress.IPv4Network("127.8.0.0/16")
OTHER = ipaddress.IPv4Network("127.9.0.0/16")


def network(name: str, subnet: ipaddress.IPv4Network) -> Network:
    return Network(name, f"id-{name}", subnets=(Subnet(subnet, subnet[1]),))


NETWORKS = [network("bench", BENCH), network("other", OTHER)]


def container(i: int, net: str = "bench") -> tuple[str, Endpoint]:
    subnet = BENCH if net == "bench" else OTHER
    cid = f"{i:012x}{'c' * 52}"
    ifname = "eth0" if net == "bench" else "eth1"
    ep = Endpoint(cid, ifname, net, "node1", "", name=f"c{i}", aliases=(f"c{i}-alias",),
                  addresses=(ipaddress.ip_interface(f"{subnet[256 + i]}/16"),), state="ready")
    return keys.endpoint("node1", cid, ifname), ep


def record_set(n: int) -> dict[str, Endpoint]:
    eps = dict(container(i) for i in range(n))
    eps.update(container(i, "other") for i in range(0, n, 10))
    return eps


# --- asking --------------------------------------------------------------------------------------


async def ask(port: int, label: str) -> list[str] | None:
    """The addresses a lookup of LABEL.bench.plexus.internal gets from the "bench" listener
    (None: NXDOMAIN)."""
    name = f"{label}.bench.plexus.internal"
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (str(BENCH[1]), port))
        await loop.sock_sendall(sock, build_query(name, QType.A))
        async with asyncio.timeout(1):
            msg, recs = parse_records(await loop.sock_recv(sock, 4096))
    finally:
        sock.close()
    if msg.rcode == 3:  # NXDOMAIN
        return None
    return [r.data for r in recs if r.section == "answer"]


LOST = [0]  # lookups that got no answer within ask's timeout (asked again)


async def until(check: Callable[[], Awaitable[bool]], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            if await check():
                return
        except TimeoutError:
            LOST[0] += 1
        if time.monotonic() > deadline:
            raise TimeoutError("the change never showed")


async def port_of(service: DnsService) -> int:
    stats = await service.stats()
    bench = next(li for li in stats["listeners"] if li.startswith("bench "))
    return int(bench.rsplit(":", 1)[1])


async def warm(service: DnsService, port: int, n: int) -> None:
    for i in range(0, n, max(1, n // 20)):
        for _ in range(2):
            await ask(port, f"c{i}")


# --- measuring -----------------------------------------------------------------------------------


def probe(r: int) -> tuple[str, Endpoint]:
    """A container that is not in the record set (addresses above it)."""
    return container(60000 + r)


async def start(workers: int, n: int) -> tuple[DnsService, dict[str, Endpoint], int]:
    service = DnsService(workers=workers, port=0)
    await service.start()
    eps = record_set(n)
    service.load(NETWORKS, eps)
    errors = await service.sync_listeners()
    if errors:
        raise SystemExit(f"cannot listen: {errors}")
    port = await port_of(service)
    await until(partial(_answers, port, "c0"))
    await warm(service, port, n)
    return service, eps, port


async def _answers(port: int, name: str) -> bool:
    return bool(await ask(port, name))


async def in_process(n: int, rounds: int) -> dict[str, float]:
    service, eps, port = await start(0, n)
    try:
        adds, removes = [], []
        for r in range(rounds):
            key, ep = probe(r)
            t0 = time.perf_counter()
            service.apply(DnsChanges(endpoints={key: ep}))
            t1 = time.perf_counter()
            service.apply(DnsChanges(endpoints={key: None}))
            t2 = time.perf_counter()
            adds.append(t1 - t0)
            removes.append(t2 - t1)
            if r % 20 == 0:
                await warm(service, port, n)  # keep caches to drop
        assert await ask(port, f"c{60000 + rounds - 1}") is None
        full: list[float] = []
        while len(full) < 3 or (len(full) < 50 and sum(full) < 1.0):
            key, ep = probe(len(full))
            t0 = time.perf_counter()
            service.load(NETWORKS, {**eps, key: ep})
            full.append(time.perf_counter() - t0)
        return {"add": statistics.median(adds), "remove": statistics.median(removes),
                "full": statistics.median(full)}
    finally:
        await service.close()


async def through_worker(n: int, rounds: int) -> dict[str, float]:
    service, eps, port = await start(1, n)
    try:
        rtt = []
        for _ in range(50):
            t0 = time.perf_counter()
            await ask(port, "c0")
            rtt.append(time.perf_counter() - t0)
        adds, removes = [], []
        for r in range(rounds):
            key, ep = probe(r)
            name = ep.name
            t0 = time.perf_counter()
            service.apply(DnsChanges(endpoints={key: ep}))
            await until(partial(_answers, port, name))
            t1 = time.perf_counter()
            service.apply(DnsChanges(endpoints={key: None}))
            await until(partial(_gone, port, name))
            adds.append(t1 - t0)
            removes.append(time.perf_counter() - t1)
        full: list[float] = []
        while len(full) < 3 or (len(full) < 20 and sum(full) < 2.0):
            key, ep = probe(rounds + len(full))
            name = ep.name
            t0 = time.perf_counter()
            service.load(NETWORKS, {**eps, key: ep})
            await until(partial(_answers, port, name))
            full.append(time.perf_counter() - t0)
        restarts = (await service.stats())["workers"]["restarts"]
        if restarts:
            print(f"warning: the worker was restarted {restarts} times", file=sys.stderr)
        return {"add": statistics.median(adds), "remove": statistics.median(removes),
                "full": statistics.median(full), "rtt": statistics.median(rtt)}
    finally:
        await service.close()


async def _gone(port: int, name: str) -> bool:
    return await ask(port, name) is None


# --- report --------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def rows(results: dict[int, dict[str, float]], worker: bool) -> list[list[object]]:
    out: list[list[object]] = []
    for n, r in results.items():
        row: list[object] = [f"{n:,}", ms(r["full"]), ms(r["add"]), ms(r["remove"]),
                             ratio(r["full"], r["add"]), ratio(r["full"], r["remove"])]
        if worker:
            row.append(ms(r["rtt"]))
        out.append(row)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    header("DNS: one endpoint added / removed (apply) against a full rebuild (load)",
           [f"sizes {args.sizes} containers (+10% on a second network), "
            f"{args.rounds} rounds, medians", f"python {sys.version.split()[0]}"])
    local = {n: await in_process(n, args.rounds) for n in sizes}
    cols = ["containers", "full rebuild", "apply: add", "apply: remove", "rebuild/add",
            "rebuild/remove"]
    print_table(cols, rows(local, False), title="in the agent's event loop (workers=0)")
    print()
    remote = {n: await through_worker(n, max(20, args.rounds // 4)) for n in sizes}
    print_table([*cols, "lookup RTT"], rows(remote, True),
                title="through a worker process (workers=1): until the worker answers it")
    if LOST[0]:
        print(f"\n{LOST[0]} lookups got no answer within 1 s and were asked again")


if __name__ == "__main__":
    asyncio.run(main())

"""Datastore latency: SQLite and memory (one host) against etcd (one member, three, TLS).

    tests/sandbox .venv/bin/python bench/store.py [--ops 500]

Per backend, one client on the event loop: sequential puts, compare-and-swap transactions
(create if absent, as IPAM claims do), gets, a listing of 1,000 keys, 50 concurrent puts,
and the time from a put to its watch event. etcd members run on loopback inside the sandbox
(tests/harness/etcd.py), their data dirs and the SQLite file in the same temporary directory,
so both pay the same disk's fsync. aetcd's own Client does the same puts and gets as the
reference: the difference is EtcdStore's own overhead. Only figures are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aetcd
from _common import header, percentile, print_table, ratio, require_sandbox

from plexus.store import MemoryStore, SqliteStore
from plexus.store.base import Compare, Datastore, Put
from plexus.store.etcd import EtcdStore, TlsFiles
from tests.harness.etcd import EtcdCluster, make_certs

Timed = Callable[[int], Awaitable[object]]


async def timings(ops: int, step: Timed) -> list[float]:
    """Milliseconds of each of ``ops`` sequential calls."""
    out = []
    for i in range(ops):
        start = time.perf_counter()
        await step(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def p50_p99(ms: list[float]) -> str:
    return f"{percentile(ms, 50):.3f} / {percentile(ms, 99):.3f}"


async def watch_delay(store: Datastore, ops: int) -> list[float]:
    """Milliseconds from a put's start to its event reaching a watcher."""
    events = store.watch("w/", await store.revision() + 1)
    out = []
    for i in range(ops):
        start = time.perf_counter()
        await store.put(f"w/{i}", "v")
        await anext(events)
        out.append((time.perf_counter() - start) * 1000)
    return out


async def measure(store: Datastore, ops: int) -> dict[str, float | str]:
    puts = await timings(ops, lambda i: store.put(f"p/{i:06}", "x" * 200))
    claims = await timings(
        ops, lambda i: store.txn([Compare.absent(f"c/{i}")], [Put(f"c/{i}", "owner")])
    )
    gets = await timings(ops, lambda i: store.get(f"p/{i % ops:06}"))
    await store.txn([], [Put(f"l/{i:04}", "x" * 200) for i in range(100)])
    for part in range(1, 10):
        await store.txn([], [Put(f"l/{part}{i:03}", "x" * 200) for i in range(100)])
    lists = await timings(20, lambda i: store.list("l/"))
    start = time.perf_counter()
    await asyncio.gather(*(store.put(f"b/{i}", "x") for i in range(50)))
    burst = (time.perf_counter() - start) * 1000
    watch = await watch_delay(store, min(ops, 200))
    return {
        "put": percentile(puts, 50), "put p50/p99 ms": p50_p99(puts),
        "cas p50/p99 ms": p50_p99(claims), "get p50/p99 ms": p50_p99(gets),
        "list 1000 ms": f"{percentile(lists, 50):.2f}", "50 puts at once ms": f"{burst:.1f}",
        "put->event ms": f"{percentile(watch, 50):.3f}",
    }  # fmt: skip


async def aetcd_reference(endpoint: str, ops: int) -> dict[str, float | str]:
    host, port = endpoint.rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    puts = await timings(ops, lambda i: client.put(f"r/{i:06}".encode(), b"x" * 200))
    gets = await timings(ops, lambda i: client.get(f"r/{i % ops:06}".encode()))
    await client.close()
    return {"put": percentile(puts, 50), "put p50/p99 ms": p50_p99(puts),
            "get p50/p99 ms": p50_p99(gets)}  # fmt: skip


async def run(workdir: Path, ops: int) -> list[tuple[str, dict[str, float | str]]]:
    results = []
    for name, store in (("memory", MemoryStore()), ("sqlite", SqliteStore(workdir / "s.db"))):
        results.append((name, await measure(store, ops)))
        await store.close()
    tls = make_certs(workdir / "tls")
    clusters = (("etcd, 1 member", 1, None), ("etcd, 3 members", 3, None),
                ("etcd, 1 member, TLS", 1, tls))  # fmt: skip
    for name, size, certs in clusters:
        with EtcdCluster(workdir / name.replace(" ", "").replace(",", "-"), size, tls=certs) as e:
            files = TlsFiles(str(tls.ca), str(tls.client_cert), str(tls.client_key))
            store = EtcdStore(e.endpoints, credentials=files.load() if certs else None)
            results.append((name, await measure(store, ops)))
            await store.close()
            if size == 1 and certs is None:
                results.append(("  aetcd.Client, same etcd", await aetcd_reference(
                    e.endpoints[0], ops)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=500, help="sequential calls per measurement")
    args = ap.parse_args(argv)
    if not require_sandbox("store.py"):
        return 2
    header("Datastore latency: embedded (memory, SQLite) and etcd 3.4 on loopback", [
        f"{args.ops} sequential calls each; one client; 200-byte values; put->event: a put "
        "and its watch event", "cas: create-if-absent txn; list: 1,000 keys of 200 bytes",
    ])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(Path(tmp), args.ops))
    columns = ["put p50/p99 ms", "cas p50/p99 ms", "get p50/p99 ms", "list 1000 ms",
               "50 puts at once ms", "put->event ms"]  # fmt: skip
    sqlite_put = float(dict(results)["sqlite"]["put"])
    rows = [[name, *(r.get(c, "-") for c in columns), ratio(float(r["put"]), sqlite_put)]
            for name, r in results]  # fmt: skip
    print_table(["backend", *columns, "put vs sqlite"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

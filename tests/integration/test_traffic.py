"""Real traffic through a small topology (the demo's): connectivity, isolation, NAT, published
ports from outside, from localhost and hairpin, and 127.0.0.1-only publishing."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from demo.acts import Check, build, checks
from plexus.api.client import Client
from tests.harness.probes import REFUSED, tcp_probe, tcp_request, udp_probe
from tests.harness.world import World

from .helpers import global_addresses, nft_elements, wait_until

EXPECTED = [
    "web → api (frontend, TCP)",
    "web → api (frontend, IPv6)",
    "api → db (backend, UDP)",
    "web → db (other network)",
    "db → web (other network)",
    "db → api's frontend address",
    "api → db via backend",
    "web → internet (masqueraded)",
    "secret (internal) → internet",
    "secret (internal) → internet, via a route of its own",
    "secret (internal) → web, via a route of its own",
    "outside → host:8080 (published, source kept)",
    "outside → host:8053/udp (published)",
    "outside → web's address directly",
    "host localhost:8080 → web",
    "web → host:8080 (hairpin to itself)",
    "api → host:8080 (hairpin to neighbour)",
    "host localhost:9090 → api (127.0.0.1 publish)",
    "outside → host:9090 (127.0.0.1 publish)",
    "host → web (host reaches containers)",
    "web → api over IPv6 ping",
    "web resolves api by name (plexus DNS)",
    "db resolves web (not on its networks)",
    "api resolves db.backend",
]


@pytest.fixture(scope="module")
def topology() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="plexus-traffic-") as tmp:
        w = World(Path(tmp) / "world")
        try:
            w.add_host("host1")
            build(w)
            yield w
        finally:
            w.close()


@pytest.fixture(scope="module")
def results(topology: World) -> dict[str, Check]:
    return {c.what: c for c in checks(topology)}


@pytest.mark.parametrize("what", EXPECTED)
def test_reachability(results: dict[str, Check], what: str) -> None:
    check = results[what]
    assert check.ok, f"{what}: expected {check.expect}, observed {check.detail}"


def test_every_check_is_listed(results: dict[str, Check]) -> None:
    assert sorted(results) == sorted(EXPECTED)


def test_published_port_ranges_and_udp(topology: World) -> None:
    a = topology.agents["host1"]
    a.cli("network", "create", "ranges", "--subnet", "10.95.0.0/24")
    a.run_echo(
        "multi", "ranges", "-p", "7000-7002:90-92", "-p", "7100-7101:80/udp", ports=(80, 90, 91, 92)
    )
    a.wait_listening("multi", 92)
    host = topology.host_addr("host1")
    for port in (7000, 7001, 7002):
        assert tcp_probe("outside", host, port).answer.startswith("multi"), port
    assert udp_probe("outside", host, 7101).answer.startswith("multi")
    # Next to the range, nothing is published: the host's own stack refuses.
    assert tcp_probe("outside", host, 7003, 1).outcome is REFUSED
    a.cli("rm", "-f", "multi")
    # The elements went with it: refused by the host, not sent on to where multi was (which
    # would time out).
    assert tcp_probe("outside", host, 7000, 1).outcome is REFUSED
    pubs = str([e for k, v in nft_elements("host1").items() if k.startswith("pub") for e in v])
    assert "8080" in pubs and not any(str(p) in pubs for p in (7000, 7001, 7002, 7100, 7101))


def test_two_hundred_attaches_eight_at_a_time_never_share_an_address(topology: World) -> None:
    a = topology.agents["host1"]
    a.cli("network", "create", "churn", "--subnet", "10.60.0.0/23", "--ipv6")
    for i in range(200):
        topology.add_ns(f"churn{i}")
    client = Client(str(a.socket))

    def attach(i: int) -> list[str]:
        ep = client.post(
            "/v1/endpoints",
            {"container_id": f"churn{i}", "network": "churn", "netns": f"/run/netns/churn{i}"},
        )
        return list(ep["addresses"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attach, range(200)))
    got = [addr for addrs in answers for addr in addrs]
    assert len(got) == 400 and len(set(got)) == 400
    # The kernel, read in each namespace, holds exactly what plexus answered: 400 distinct.
    with ThreadPoolExecutor(8) as pool:
        kernel = list(pool.map(lambda i: sorted(global_addresses(f"churn{i}")), range(200)))
    assert kernel == [sorted(addrs) for addrs in answers]
    assert len({addr for addrs in kernel for addr in addrs}) == 400
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda i: client.post(
                    "/v1/endpoints/detach", {"container_id": f"churn{i}", "network": "churn"}
                ),
                range(200),
            )
        )
    assert next(e for e in a.json("network", "ls") if e["name"] == "churn")["endpoints"] == 0
    assert wait_until(lambda: not any(global_addresses(f"churn{i}") for i in range(200)))


def test_one_host_port_on_two_host_addresses(topology: World) -> None:
    """127.0.0.1:8090 to one container and HOSTADDR:8090 to another: two publications, each
    reachable where it was published (the claim is keyed by host address too)."""
    a = topology.agents["host1"]
    host = topology.host_addr("host1")
    a.cli("network", "create", "twoaddr", "--subnet", "10.97.0.0/24")
    a.run_echo("local8090", "twoaddr", "-p", "127.0.0.1:8090:80")
    a.run_echo("lan8090", "twoaddr", "-p", f"{host}:8090:80")
    for name in ("local8090", "lan8090"):
        a.wait_listening(name)
    assert tcp_request("host1", "127.0.0.1", 8090).startswith("local8090")
    assert tcp_request("outside", host, 8090).startswith("lan8090")
    taken = a.cli("run", "-d", "--name", "any8090", "--network", "twoaddr", "-p", "8090:80",
                  "--", "sleep", "60", check=False)
    assert taken.returncode != 0
    assert "host port 8090/tcp is already published by" in taken.stderr
    assert "[" not in taken.stderr  # a port, not a Python list
    a.cli("rm", "-f", "local8090", "lan8090")

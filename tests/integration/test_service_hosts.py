"""A service across hosts: two agents on one etcd, an overlay network spanning both, backends
on each host and a client on each. Every client's connections to the VIP reach the backends of
both hosts (the client's own host DNATs, the overlay carries the connection to the other host
and back), and a backend on the other host sees the client's own address (the tunnel is part of the
network: nothing masqueraded), while one on the client's own bridge sees the network's gateway
(a DNATed connection back onto the bridge it came from is masqueraded, or the backend would
answer the client straight over the bridge from an address it never called).
Proven with real TCP through the VIP and the service's name resolved in the client."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, answered, tcp_probe
from tests.harness.world import Agent, World, sh

from .helpers import wait_until
from .service_probes import answers

pytestmark = pytest.mark.timeout(240)
SUBNET, BLOCK, GATEWAY = "10.79.0.0/24", "28", "10.79.0.1"


@dataclass
class Two:
    agents: dict[str, Agent]
    vip: str

    def of(self, container: str) -> Agent:
        """Containers are named after their host: web1 and c1 live on host1."""
        return self.agents[f"host{container[-1]}"]

    def ns(self, container: str) -> str:
        return self.of(container).netns(container)

    def ip(self, container: str) -> str:
        return self.of(container).address(container, "ov")


@pytest.fixture(scope="module")
def two() -> Iterator[Two]:
    with tempfile.TemporaryDirectory(prefix="plexus-svc-hosts-") as tmp:
        world = World(Path(tmp) / "world")
        try:
            with cluster(world, Path(tmp), ["host1", "host2"]) as (_, (a, b)):
                a.cli("network", "create", "ov", "--driver", "overlay", "--subnet", SUBNET,
                      "--block-size", BLOCK)
                assert wait_until(lambda: "ov" in {n["name"] for n in b.json("network", "ls")},
                                  timeout=20)
                for agent in (a, b):
                    n = agent.host[-1]
                    agent.run_echo(f"web{n}", "ov", "--label", "app=web")
                    agent.run_echo(f"c{n}", "ov", "--label", "app=client")
                    agent.wait_listening(f"web{n}")
                vip = a.cli("service", "create", "web", "--network", "ov", "--selector",
                            "app=web", "--port", "80").stdout.split()[1]
                two = Two({"host1": a, "host2": b}, vip)
                # the other host has the service and both endpoints once its watch caught up
                assert wait_until(lambda: [s["endpoints"] for s in b.json("service", "ls")]
                                  == [2], timeout=20)
                for c in ("c1", "c2"):  # the overlay itself works before the VIP is judged
                    for web in ("web1", "web2"):
                        got = answered(lambda c=c, web=web: tcp_probe(two.ns(c), two.ip(web), 80))
                        assert got.outcome is ANSWERED, (c, web, got)
                yield two
        finally:
            world.close()


@pytest.mark.parametrize("client", ["c1", "c2"])
def test_a_client_on_either_host_reaches_the_backends_of_both(two: Two, client: str) -> None:
    seen = answers(two.ns(client), two.vip, 60)
    here, there = f"web{client[-1]}", f"web{3 - int(client[-1])}"
    by_name = {k.split()[0]: (k.split()[1], n) for k, n in seen.items()}
    assert set(by_name) == {here, there}, seen  # every connection answered, by both hosts
    assert all(n >= 10 for _, n in by_name.values()), seen  # 30 each, give or take
    assert by_name[there][0] == two.ip(client), seen  # across the tunnel: the client itself
    assert by_name[here][0] == GATEWAY, seen  # back onto its own bridge: masqueraded


def test_the_name_resolves_on_the_other_host_and_leads_to_both(two: Two) -> None:
    ns = two.of("c2").container("c2")["netns_name"]
    out = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", "web.default.svc.plexus.internal",
             check=False).stdout
    assert {line.split()[0] for line in out.splitlines()} == {two.vip}


def test_a_backend_leaving_on_one_host_leaves_the_other_hosts_spread(two: Two) -> None:
    a = two.agents["host1"]
    a.cli("label", "web1", "app=retired")
    try:
        def only_web2() -> bool:
            return {k.split()[0] for k in answers(two.ns("c2"), two.vip, 20)} == {"web2"}
        assert wait_until(only_web2, timeout=20)  # host2 learnt it through etcd
    finally:
        a.cli("label", "web1", "app=web")
    assert wait_until(lambda: {k.split()[0] for k in answers(two.ns("c2"), two.vip, 30)}
                      == {"web1", "web2"}, timeout=20)

"""Service discovery through the agent: containers find each other by name with their own
resolver configuration (the resolv.conf plexus writes, queried with glibc's getent), records
follow containers as they come and go, and other names are forwarded to the upstream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest

from plexus.testing.dns import StubUpstream
from tests.harness.world import INTERNET_ADDR, Agent, World, sh

UPSTREAM_RECORDS = {"example.com": ["198.51.100.7"]}


@pytest.fixture
def upstream(world: World) -> Iterator[StubUpstream]:
    """A resolver on the outside host's "internet" address, served from a thread's loop."""
    stub = StubUpstream(INTERNET_ADDR, 53, UPSTREAM_RECORDS, netns="/run/netns/outside")
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(stub.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield stub
    asyncio.run_coroutine_threadsafe(stub.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture
def dns_agent(world: World, upstream: StubUpstream) -> Agent:
    a = world.add_host("host1", start_agent=False)
    a.start(extra=["--dns-upstream", INTERNET_ADDR])
    return a


def getent(agent: Agent, container: str, name: str) -> list[str]:
    """glibc's resolver inside the container, reading the resolv.conf plexus wrote."""
    ns = agent.container(container)["netns_name"]
    # `ip netns exec` (not nsenter) binds /etc/netns/NAME/resolv.conf, as for the container
    r = sh("ip", "netns", "exec", ns, "getent", "ahosts", name, check=False)
    return sorted({line.split()[0] for line in r.stdout.splitlines()})


def test_containers_find_each_other_by_name(dns_agent: Agent) -> None:
    a = dns_agent
    a.cli("network", "create", "app", "--subnet", "10.80.0.0/24", "--ipv6")
    a.cli("network", "create", "other", "--subnet", "10.81.0.0/24")
    a.run_echo("web", "app", "--alias", "www")
    a.run_echo("db", "app", "--namespace", "shop")
    a.run_echo("lonely", "other")
    web4, web6 = a.address("web"), a.address("web", version=6)
    assert getent(a, "db", "web") == sorted([web4, web6])
    assert getent(a, "db", "www") == sorted([web4, web6])
    assert getent(a, "db", "web.app") == sorted([web4, web6])
    assert getent(a, "web", "db.shop") == sorted([a.address("db"), a.address("db", version=6)])
    assert getent(a, "web", "web.plexus.internal") == sorted([web4, web6])
    # not attached to "other": its names do not resolve on "app", nor the other way round
    assert getent(a, "web", "lonely") == []
    assert getent(a, "lonely", "web") == []
    # everything else goes upstream
    assert getent(a, "web", "example.com") == ["198.51.100.7"]


def test_records_follow_containers_and_aliases_rotate(dns_agent: Agent) -> None:
    a = dns_agent
    a.cli("network", "create", "app", "--subnet", "10.82.0.0/24")
    a.run_echo("client", "app")
    assert getent(a, "client", "svc") == []
    a.run_echo("s1", "app", "--alias", "svc")
    a.run_echo("s2", "app", "--alias", "svc")
    both = sorted([a.address("s1"), a.address("s2")])
    assert getent(a, "client", "svc") == both  # the moment they exist, no restart
    ns = a.container("client")["netns_name"]
    firsts = set()
    for _ in range(4):  # round-robin: the first answer rotates
        out = sh("ip", "netns", "exec", ns, "getent", "hosts", "svc", check=False).stdout
        firsts.add(out.split()[0] if out else "")
    assert firsts == set(both), firsts
    a.cli("rm", "-f", "s1")
    assert getent(a, "client", "svc") == [a.address("s2")]


def test_dns_lookup_explains(dns_agent: Agent, upstream: StubUpstream) -> None:
    a = dns_agent
    a.cli("network", "create", "app", "--subnet", "10.83.0.0/24")
    a.run_echo("web", "app")
    out = a.json("dns", "lookup", "web", "--network", "app")
    assert (out["outcome"], out["addresses"]) == ("answer", [a.address("web")])
    assert [m["container"] for m in out["matches"]] == ["web"]
    text = a.cli("dns", "lookup", "nosuch.example", "--network", "app").stdout
    assert f"forwarded to {INTERNET_ADDR}:53" in text and "rcode NXDOMAIN" in text, text
    assert ("udp", "nosuch.example", 1) in upstream.queries  # it really asked the upstream
    stats = json.loads(a.cli("dns", "stats").stdout)
    assert stats["listeners"] == ["app 10.83.0.1:53"]
    asked = stats["upstreams"][f"{INTERNET_ADDR}:53"]
    assert asked["healthy"] is True and asked["answers"] >= 1
    r = a.cli("dns", "lookup", "web", "--network", "nope", check=False)
    assert r.returncode != 0 and "nope" in r.stderr

"""Restarts and crashes: running containers keep working, and a killed agent leaves nothing
half-made once it is back."""

from __future__ import annotations

import ipaddress
import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest

from tests.harness.probes import connect
from tests.harness.world import Agent, World, nsexec, sh

from .helpers import (
    addresses,
    bridge_of,
    links,
    nft_elements,
    plexus_links,
    store_rows,
)


def _ifindexes(ns: str) -> dict[str, int]:
    return {l["ifname"]: l["ifindex"] for l in links(ns) if l["ifname"].startswith("px")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_connections_and_links(agent: Agent, sig: int) -> None:
    agent.cli("network", "create", "n", "--subnet", "10.50.0.0/24")
    agent.run_echo("a", "n")
    agent.run_echo("b", "n", "-p", "8080:80")
    agent.wait_listening("b")
    conn = connect(agent.netns("a"), agent.address("b"), 80)
    before = (_ifindexes("host1"), nft_elements("host1"))
    agent.kill(sig)
    agent.start()
    conn.sendall(b"still there?\n")
    assert conn.recv(100).startswith(b"b ")
    conn.close()
    assert (_ifindexes("host1"), nft_elements("host1")) == before
    assert [c["state"] for c in agent.json("ps")] == ["running", "running"]


def test_sigkill_in_the_middle_of_creating_containers(agent: Agent) -> None:
    agent.cli("network", "create", "n", "--subnet", "10.51.0.0/24", "--ipv6")

    argv = ["run", "-d", "--network", "n", "--", "sleep", "600"]
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(agent.cli, *argv[:2], "--name", f"c{i}", "-p", f"{9000 + i}:80",
                        *argv[2:], check=False)
            for i in range(40)
        ]
        # Kill once a few are through: the rest are queued or in flight (whatever the load).
        done = 0
        for f in as_completed(futures, timeout=60):
            done += f.result().returncode == 0
            if done == 3:
                break
        agent.kill(signal.SIGKILL)
        codes = [f.result().returncode for f in futures]
    # The kill must land in the middle: some requests done, some cut off.
    assert 0 < codes.count(0) < len(codes), codes
    agent.start()
    print(agent.log.read_text().split("recovered:")[-1].split("\n")[0])
    _assert_consistent(agent)
    # and it still works afterwards
    agent.run_echo("after", "n")
    _assert_consistent(agent)


def _assert_consistent(agent: Agent) -> None:
    containers = agent.json("ps", "-a")
    assert all(c["state"] == "running" for c in containers)
    eps = [e for c in containers for e in c["endpoints"]]
    # kernel ↔ endpoints: exactly one host veth per endpoint, no more
    assert plexus_links("host1") - {bridge_of(agent)} == {
        e["host_ifname"] for e in eps
    }
    # each container's interface carries the addresses plexus recorded
    for c in containers:
        for e in c["endpoints"]:
            assert sorted(addresses(c["netns"], e["ifname"])) == sorted(e["addresses"])
    # datastore ↔ endpoints, read straight from SQLite
    rows = store_rows(agent.state_dir, "/plexus/ipam/")
    claimed = [k.rsplit("/", 1)[1] for k in rows]
    recorded = [a.split("/")[0] for e in eps for a in e["addresses"]]
    assert sorted(claimed) == sorted(recorded)
    assert not [a for a, n in Counter(recorded).items() if n > 1]
    assert all(ipaddress.ip_address(a) for a in claimed)
    assert len(store_rows(agent.state_dir, "/plexus/endpoints/")) == len(eps)
    assert len(store_rows(agent.state_dir, "/plexus/containers/")) == len(containers)
    ports = store_rows(agent.state_dir, "/plexus/ports/")
    assert sorted(int(k.rsplit("/", 1)[1]) for k in ports) == sorted(
        int(p.split(":")[0]) for c in containers for p in c["ports"]
    )
    # no orphan namespaces of plexus's own
    netns = {n for n in sh("ip", "netns", "list").stdout.split() if n.startswith("plexus-")}
    assert netns == {c["netns_name"] for c in containers}
    # firewall elements ↔ published ports
    table = json.dumps(nft_elements("host1"))
    for c in containers:
        for p in c["ports"]:
            assert p.split(":")[0] in table


def test_periodic_reconcile_repairs_drift_and_releases_vanished_namespaces(world: World) -> None:
    agent = world.add_host("host1", start_agent=False)
    agent.start(extra=["--reconcile-interval", "0.5"])
    agent.cli("network", "create", "n", "--subnet", "10.52.0.0/24")
    agent.run_echo("a", "n", "-p", "8080:80")
    world.add_ns("foreign")
    agent.cli("attach", "--netns", "/run/netns/foreign", "--id", "f1", "--network", "n")
    nsexec("host1", "nft", "delete", "table", "inet", "plexus")
    sh("ip", "netns", "del", "foreign")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        released = not store_rows(agent.state_dir, "/plexus/endpoints/host1/f1/")
        if nft_elements("host1").get("bridges") and released:
            break
        time.sleep(0.2)
    assert nft_elements("host1")["bridges"] == [bridge_of(agent)]
    assert store_rows(agent.state_dir, "/plexus/endpoints/host1/f1/") == {}
    assert len(store_rows(agent.state_dir, "/plexus/ipam/")) == 1
    agent.wait_listening("a")
    from tests.harness.world import tcp_request

    assert tcp_request("outside", world.host_addr("host1"), 8080).startswith("a ")


def test_kernel_events_repair_drift_at_once(agent: Agent, world: World) -> None:
    """No periodic pass (its default interval is minutes): the kernel's own notifications make
    the agent repair a deleted veth, a bridge set down and a deleted gateway address, and
    release an endpoint whose namespace was deleted."""
    from tests.harness.world import tcp_request

    from .helpers import wait_until

    agent.cli("network", "create", "n", "--subnet", "10.53.0.0/24")
    agent.run_echo("a", "n", "-p", "8080:80")
    agent.wait_listening("a")
    host = world.host_addr("host1")
    bridge = bridge_of(agent)
    veth = agent.container("a")["endpoints"][0]["host_ifname"]

    def serving() -> bool:
        return tcp_request("outside", host, 8080, timeout=0.5).startswith("a ")

    nsexec("host1", "ip", "link", "del", veth)
    assert wait_until(lambda: veth in plexus_links("host1") and serving(), timeout=10)
    nsexec("host1", "ip", "link", "set", bridge, "down")
    assert wait_until(lambda: "UP" in next(l for l in links("host1")
                                           if l["ifname"] == bridge)["flags"], timeout=10)
    nsexec("host1", "ip", "addr", "del", "10.53.0.1/24", "dev", bridge)
    assert wait_until(lambda: "10.53.0.1/24" in addresses("host1", bridge), timeout=10)
    assert wait_until(serving, timeout=10)
    world.add_ns("gone")
    agent.cli("attach", "--netns", "/run/netns/gone", "--id", "g1", "--network", "n")
    sh("ip", "netns", "del", "gone")
    assert wait_until(lambda: not store_rows(agent.state_dir, "/plexus/endpoints/host1/g1/"),
                      timeout=10)
    status = agent.json("status")
    assert status["kernel_repairs"] >= 3 and status["full_passes"] == 1  # the start-up one

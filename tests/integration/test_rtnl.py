"""The endpoint path's hand-built rtnetlink requests against the real kernel, each test in fresh
namespaces ("host" and "ctr"): every request is sent through ``rawnl.Channel`` and what it did
is read back with ``ip -j``, never through plexus's own netlink code. The last test drives the
bridge driver through an agent."""

from __future__ import annotations

import errno
import ipaddress
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from plexus.api.client import Client
from plexus.dataplane import netns, rtnl
from plexus.dataplane.rawnl import Channel
from tests.harness.world import Agent, World, nsexec

from .helpers import by_alias, link_owner, wait_until

MAC = "02:42:0a:3c:00:05"


@dataclass
class Ns:
    name: str
    path: str
    nl: Channel

    def ip(self, *argv: str) -> Any:
        out = subprocess.run(["ip", "-n", self.name, "-j", "-d", *argv], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        return json.loads(out) if out.strip() else []

    def find(self, name: str) -> dict[str, Any] | None:
        found = [link for link in self.ip("link") if link["ifname"] == name]
        return found[0] if found else None

    def link(self, name: str) -> dict[str, Any]:
        found = self.find(name)
        assert found is not None, f"no link {name} in {self.name}"
        return found

    def sh(self, *argv: str) -> None:
        subprocess.run(["ip", "-n", self.name, *argv], check=True, capture_output=True,
                       timeout=30)


def _ns(prefix: str) -> Iterator[Ns]:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    path = netns.create_named(name)
    channel = Channel.open(path)
    try:
        yield Ns(name, path, channel)
    finally:
        channel.close()
        netns.delete_named(name)


@pytest.fixture
def host() -> Iterator[Ns]:
    yield from _ns("rh")


@pytest.fixture
def ctr() -> Iterator[Ns]:
    yield from _ns("rc")


def ok(answer: rtnl.Reply) -> None:
    assert answer.error == 0, answer.why


def make_veth(host: Ns, ctr: Ns, name: str = "pxv1", peer: str = "eth0") -> rtnl.Reply:
    with open(ctr.path) as f:
        return host.nl.call(rtnl.veth_request, name, 1450, peer, 1400, MAC, f.fileno())


def test_link_up_by_index(ctr: Ns) -> None:
    assert "UP" not in ctr.link("lo")["flags"]
    ok(ctr.nl.call(rtnl.link_up_request, 1))
    assert "UP" in ctr.link("lo")["flags"]
    assert ctr.nl.call(rtnl.link_up_request, 999).error == errno.ENODEV


def test_veth_peer_is_born_in_the_container(host: Ns, ctr: Ns) -> None:
    ok(make_veth(host, ctr))
    mine, theirs = host.link("pxv1"), ctr.link("eth0")
    assert (mine["linkinfo"]["info_kind"], mine["mtu"], "UP" in mine["flags"]) == (
        "veth", 1450, False)
    assert (theirs["linkinfo"]["info_kind"], theirs["mtu"], theirs["address"]) == (
        "veth", 1400, MAC)
    assert "UP" not in theirs["flags"]
    assert host.find("eth0") is None and ctr.find("pxv1") is None


def test_veth_creation_is_exclusive(host: Ns, ctr: Ns) -> None:
    ok(make_veth(host, ctr))
    assert make_veth(host, ctr).error == errno.EEXIST  # both names taken
    assert make_veth(host, ctr, name="pxv2").error == errno.EEXIST  # the container's only
    assert host.find("pxv2") is None  # nothing half-made
    assert make_veth(host, ctr, peer="eth1").error == errno.EEXIST  # the host's only
    assert ctr.find("eth1") is None


def test_getlink_by_name_answers_the_link(host: Ns) -> None:
    host.sh("link", "add", "br-t", "type", "bridge")
    answer = host.nl.call(rtnl.getlink_request, "br-t")
    assert (answer.error, answer.kind) == (0, rtnl.RTM_NEWLINK)
    parsed = rtnl.parse_link(answer.payload)
    assert parsed is not None
    index = host.link("br-t")["ifindex"]
    assert (parsed[0].index, parsed[0].ifname, parsed[0].admin_up) == (index, "br-t", False)
    assert host.nl.call(rtnl.getlink_request, "nope").error == errno.ENODEV
    by_index = rtnl.parse_link(host.nl.call(rtnl.getlink_request, index=index).payload)
    assert by_index is not None and by_index[0].ifname == "br-t"
    assert host.nl.call(rtnl.getlink_request, index=999).error == errno.ENODEV


def test_delete_link_by_name(host: Ns, ctr: Ns) -> None:
    ok(make_veth(host, ctr))
    ok(host.nl.call(rtnl.dellink_request, "pxv1"))
    assert host.find("pxv1") is None and ctr.find("eth0") is None  # the peer went with it
    assert host.nl.call(rtnl.dellink_request, "pxv1").error == errno.ENODEV


def test_addresses_are_added_once(host: Ns) -> None:
    host.sh("link", "add", "d0", "type", "veth", "peer", "name", "d1")  # (no dummy module here)
    index = host.link("d0")["ifindex"]
    for text in ("10.60.0.5/24", "fd00:60::5/64"):
        iface = ipaddress.ip_interface(text)
        ok(host.nl.call(rtnl.addaddr_request, index, iface))
        assert host.nl.call(rtnl.addaddr_request, index, iface).error == errno.EEXIST
    host.sh("link", "set", "d1", "up")
    host.sh("link", "set", "d0", "up")
    info = host.ip("addr", "show", "dev", "d0")[0]["addr_info"]
    got = {(a["local"], a["prefixlen"], a.get("nodad", False), a.get("tentative", False))
           for a in info if a["scope"] == "global"}
    assert got == {("10.60.0.5", 24, False, False), ("fd00:60::5", 64, True, False)}
    assert host.nl.call(rtnl.addaddr_request, 999, iface).error == errno.ENODEV


def test_default_route_is_replaced(host: Ns) -> None:
    host.sh("link", "add", "d0", "type", "veth", "peer", "name", "d1")
    host.sh("link", "set", "d1", "up")
    host.sh("link", "set", "d0", "up")
    host.sh("addr", "add", "10.60.0.5/24", "dev", "d0")
    host.sh("addr", "add", "fd00:60::5/64", "dev", "d0", "nodad")
    for gateway in ("10.60.0.1", "10.60.0.254", "fd00:60::1", "fd00:60::fe"):
        ok(host.nl.call(rtnl.default_route_request, ipaddress.ip_address(gateway)))
    for family, gateway in (("-4", "10.60.0.254"), ("-6", "fd00:60::fe")):
        routes = host.ip(family, "route", "show", "default")
        assert [(r["gateway"], r["dev"], r["protocol"]) for r in routes] == [
            (gateway, "d0", "static")]
    unreachable = host.nl.call(rtnl.default_route_request, ipaddress.ip_address("10.99.0.1"))
    assert unreachable.error == errno.ENETUNREACH


def test_enslave_then_hairpin(host: Ns, ctr: Ns) -> None:
    host.sh("link", "add", "br-t", "type", "bridge")
    bridge = host.link("br-t")["ifindex"]
    ok(make_veth(host, ctr))
    # Slave data is applied before IFLA_MASTER (rtnl_changelink, then do_setlink): a link that
    # is not a port yet cannot take it, which is why these are two requests.
    assert host.nl.call(rtnl.hairpin_request, "pxv1").error == errno.EOPNOTSUPP
    ok(host.nl.call(rtnl.enslave_request, "pxv1", bridge, "plexus:ep:c1/eth0"))
    ok(host.nl.call(rtnl.hairpin_request, "pxv1"))
    port = host.link("pxv1")
    assert (port["master"], port["ifalias"], "UP" in port["flags"]) == (
        "br-t", "plexus:ep:c1/eth0", True)
    assert port["linkinfo"]["info_slave_kind"] == "bridge"
    assert port["linkinfo"]["info_slave_data"]["hairpin"] is True


def test_enslave_errors(host: Ns, ctr: Ns) -> None:
    host.sh("link", "add", "br-t", "type", "bridge")
    bridge = host.link("br-t")["ifindex"]
    assert host.nl.call(rtnl.enslave_request, "nope", bridge, "x").error == errno.ENODEV
    ok(make_veth(host, ctr))
    assert host.nl.call(rtnl.enslave_request, "pxv1", 999, "x").error == errno.EINVAL
    assert host.link("pxv1").get("master") is None


def test_a_batch_is_handled_in_order_and_only_failures_answer(host: Ns) -> None:
    lo = ipaddress.ip_interface("10.61.0.1/32")
    answers = host.nl.call_all([
        lambda seq: rtnl.link_up_request(seq, 1),
        lambda seq: rtnl.addaddr_request(seq, 999, lo),  # no such link
        lambda seq: rtnl.addaddr_request(seq, 1, lo),
    ])
    assert [a.error for a in answers] == [0, errno.ENODEV, 0]
    assert "UP" in host.link("lo")["flags"]
    assert "10.61.0.1" in {a["local"] for a in host.ip("addr", "show", "dev", "lo")[0]["addr_info"]}


# --- the bridge driver through an agent ---------------------------------------------------------


def test_a_leftover_host_end_gives_way_to_a_whole_pair(agent: Agent, world: World) -> None:
    """An interface with the veth's name but no peer in the container (half a pair, or anything
    else by that name) is deleted and the pair made again."""
    client = Client(str(agent.socket))
    client.post("/v1/networks", {"name": "n", "subnets": ["10.62.0.0/24"]})
    world.add_ns("c1")
    body = {"container_id": "c1", "network": "n", "netns": "/run/netns/c1", "ifname": "eth0"}
    client.post("/v1/endpoints", body)
    tag = f"plexus:{link_owner(agent)}"
    aliases = by_alias("host1")
    name, bridge = aliases[f"{tag}:ep:c1/eth0"], aliases[f"{tag}:net:n"]
    client.post("/v1/endpoints/detach", {"container_id": "c1", "network": "n"})
    assert wait_until(lambda: nsexec("host1", "ip", "link", "show", name, check=False).returncode)
    nsexec("host1", "ip", "link", "add", name, "type", "veth", "peer", "name", "leftover")
    ep = client.post("/v1/endpoints", body)
    link = json.loads(nsexec("host1", "ip", "-j", "-d", "link", "show", name).stdout)[0]
    assert (link["linkinfo"]["info_kind"], link["master"], link["ifalias"]) == (
        "veth", bridge, f"{tag}:ep:c1/eth0")
    inside = json.loads(nsexec("c1", "ip", "-j", "addr", "show", "eth0").stdout)[0]
    assert [f"{a['local']}/{a['prefixlen']}" for a in inside["addr_info"]
            if a["scope"] == "global"] == ep["addresses"]
    assert nsexec("host1", "ip", "link", "show", "leftover", check=False).returncode != 0


def test_a_veth_taken_off_its_bridge_is_put_back(agent: Agent, world: World) -> None:
    """The kernel watcher looks at such a link again (HostNetlink.link_state, on a worker
    thread) and has it repaired."""
    client = Client(str(agent.socket))
    client.post("/v1/networks", {"name": "n", "subnets": ["10.63.0.0/24"]})
    world.add_ns("c1")
    client.post("/v1/endpoints", {"container_id": "c1", "network": "n",
                                  "netns": "/run/netns/c1", "ifname": "eth0"})
    tag = f"plexus:{link_owner(agent)}"
    aliases = by_alias("host1")
    name, bridge = aliases[f"{tag}:ep:c1/eth0"], aliases[f"{tag}:net:n"]
    nsexec("host1", "ip", "link", "set", name, "nomaster")

    def master() -> str | None:
        link = json.loads(nsexec("host1", "ip", "-j", "link", "show", name).stdout)[0]
        return link.get("master")

    assert master() is None
    assert wait_until(lambda: master() == bridge, timeout=10)

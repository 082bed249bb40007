"""Element deltas over raw netlink (``nft.setelem``) against the kernel: the policy table filled
by them reads back, through the ``nft`` command, exactly as the same table filled by
libnftables; deletions empty it; a refused batch changes nothing and names its set."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator

import pytest

from plexus.dataplane.nft import policy as render
from plexus.dataplane.nft.libnft import LibNft
from plexus.dataplane.nft.setelem import Change, ElementChannel, SetType
from plexus.errors import DataplaneError
from plexus.policy.cells import PortRange
from plexus.policy.journal import Delta, Sets

pytestmark = pytest.mark.privileged
NS = "setelem"
ip = ipaddress.ip_address
CHAINS = {"pa": "NetworkPolicy a/a", "pb": "NetworkPolicy b/b"}
# One element of every kind the compiler writes, with every kind of verdict and value.
SETS: Sets = {
    "ep4": {ip("10.1.0.2"): 16, ip("10.1.0.3"): 17},
    "ep6": {ip("fd00::2"): 16},
    "eg4": {ip("10.1.0.2"): None},
    "in6": {ip("fd00::2"): None},
    "eg_port": {(16, 17, "tcp", 80): 5, (16, 18, "udp", 53): 0, (17, 16, "sctp", 9): 10},
    "eg_range": {(16, 17, "tcp", PortRange(1000, 2000)): 11},
    "in_proto": {(17, 16, "udp"): 6},
    "in_any": {(18, 16): 5},
    "in_wport": {(16, "tcp", 443): 9},
    "in_wrange": {(16, "udp", PortRange(5000, 5100)): 0},
    "in_wproto": {(16, "sctp"): 6},
    "eg_default": {16: 6, 17: 0},
    "outcomes": {0: "return", 5: "pa-allow", 6: "pa-deny", 7: "pa-audit", 9: "pb-allow",
                 10: "pb-deny", 11: "pb-audit"},
}


def nft_list() -> dict[str, list[object]]:
    out = subprocess.run(["ip", "netns", "exec", NS, "nft", "-j", "list", "table",
                          render.FAMILY, render.TABLE], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    found: dict[str, list[object]] = {}
    for o in json.loads(out)["nftables"]:
        for kind in ("set", "map"):
            if kind in o:
                elems = o[kind].get("elem", []) or []
                found[o[kind]["name"]] = sorted(json.dumps(e, sort_keys=True) for e in elems)
    return found


@pytest.fixture
def nft() -> Iterator[LibNft]:
    subprocess.run(["ip", "netns", "add", NS], check=True, timeout=10)
    lib = LibNft(NS)
    try:
        yield lib
    finally:
        lib.close()
        subprocess.run(["ip", "netns", "del", NS], check=False, timeout=10)


@pytest.fixture
def channel(nft: LibNft) -> Iterator[ElementChannel]:
    ch = ElementChannel(f"/run/netns/{NS}")
    try:
        yield ch
    finally:
        ch.close()


def test_netlink_elements_read_back_as_libnftables_writes_them(
        nft: LibNft, channel: ElementChannel) -> None:
    nft.run_sync(render.render_table(SETS, CHAINS))
    expected = nft_list()
    assert sum(len(v) for v in expected.values()) == sum(len(v) for v in SETS.values())
    nft.run_sync(render.render_table({}, CHAINS))
    assert not any(nft_list().values())
    changes = render.element_changes([Delta(added=SETS)])
    assert changes is not None
    channel.send(render.FAMILY, render.TABLE, changes)
    assert nft_list() == expected
    gone = render.element_changes([Delta(removed=SETS)])
    assert gone is not None
    channel.send(render.FAMILY, render.TABLE, gone)
    assert not any(nft_list().values())


def test_a_delta_replaces_an_element_and_many_fit_one_batch(
        nft: LibNft, channel: ElementChannel) -> None:
    nft.run_sync(render.render_table(SETS, CHAINS))
    many = {ip("10.2.0.0") + i: 100 + i for i in range(3000)}  # several messages
    delta = Delta(removed={"eg_port": {(16, 17, "tcp", 80): 5}},
                  added={"eg_port": {(16, 17, "tcp", 80): 10}, "ep4": many})
    changes = render.element_changes([delta])
    assert changes is not None
    channel.send(render.FAMILY, render.TABLE, changes)
    listed = nft_list()
    assert len(listed["ep4"]) == 3002
    port = [e for e in listed["eg_port"] if '"concat": [16, 17, "tcp", 80]' in str(e)]
    assert len(port) == 1 and str(port[0]).endswith(", 10]")


def test_a_refused_batch_changes_nothing_and_names_its_set(
        nft: LibNft, channel: ElementChannel) -> None:
    nft.run_sync(render.render_table({}, CHAINS))
    good = Change("ep4", SetType(("ipv4_addr",), "mark"), True, {ip("10.9.0.1"): 20})
    bad = Change("nosuch", SetType(("ipv4_addr",), "mark"), True, {ip("10.9.0.2"): 21})
    with pytest.raises(DataplaneError, match="nosuch"):
        channel.send(render.FAMILY, render.TABLE, [good, bad])
    assert nft_list()["ep4"] == []
    # Every message of the refused batch was answered: none of those answers is taken for
    # the next batches' (each of which the kernel applies).
    missing = Change("ep4", SetType(("ipv4_addr",), "mark"), False,
                     {ip(f"10.9.1.{i}"): None for i in range(1, 4)})
    with pytest.raises(DataplaneError, match="ep4"):
        channel.send(render.FAMILY, render.TABLE, [missing])
    for i in range(3):
        channel.send(render.FAMILY, render.TABLE, [
            Change("ep4", SetType(("ipv4_addr",), "mark"), True, {ip(f"10.9.2.{i}"): 30})])
    assert len(nft_list()["ep4"]) == 3


def test_the_world_interval_maps_stay_with_libnftables() -> None:
    net = ipaddress.ip_network("10.0.0.0/8")
    assert render.element_changes([Delta(added={"world4": {net: 5}})]) is None

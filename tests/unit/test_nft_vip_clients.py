"""Multi-homed clients of a service (``render.py``'s design note): which addresses each
network's ``vip_clients`` set holds, and that they read back from a listing."""

from __future__ import annotations

import dataclasses
import ipaddress

from plexus.dataplane.nft import FirewallState, NetRule, firewall_state, parse_table, render_table
from plexus.dataplane.nft.state import vip_clients
from plexus.model.types import Endpoint, Network, Subnet

from .test_nft_render import _elements, kernel_listing

ip, net = ipaddress.ip_address, ipaddress.ip_network


def network(name: str, cidr: str, driver: str = "bridge") -> Network:
    return Network(name, f"{name}0123456789", driver=driver, subnets=(Subnet(net(cidr)),))


def attach(container: str, network: str, *addrs: str, ifname: str = "eth0") -> Endpoint:
    return Endpoint(container_id=container, ifname=ifname, network=network, node="n1",
                    netns="/x", addresses=tuple(ipaddress.ip_interface(a) for a in addrs))


def test_a_container_on_one_network_is_nobodys_client() -> None:
    assert vip_clients([attach("c", "a", "10.1.0.2/24")]) == {}


def test_each_network_of_a_multi_homed_container_holds_its_other_addresses() -> None:
    eps = [attach("c", "a", "10.1.0.2/24", "fd01::2/64"),
           attach("c", "b", "10.2.0.2/24", ifname="eth1"),
           attach("c", "d", "10.4.0.2/24", ifname="eth2")]
    assert vip_clients(eps) == {
        "a": {ip("10.2.0.2"), ip("10.4.0.2")},
        "b": {ip("10.1.0.2"), ip("fd01::2"), ip("10.4.0.2")},
        "d": {ip("10.1.0.2"), ip("fd01::2"), ip("10.2.0.2")},
    }


def test_the_sets_hold_link_and_address_for_every_link_of_the_network() -> None:
    a, ov = network("a", "10.1.0.0/24"), network("ov", "10.8.0.0/24", driver="overlay")
    state = firewall_state([a, ov], [attach("c", "a", "10.1.0.2/24"),
                                     attach("c", "ov", "10.8.0.2/24", ifname="eth1"),
                                     attach("single", "a", "10.1.0.3/24")])
    rules = {r.bridge: r for r in state.nets}
    assert rules[a.bridge].clients == (ip("10.8.0.2"),)
    assert rules[ov.bridge].clients == (ip("10.1.0.2"),)
    elems = _elements(render_table(state))
    found = sorted(tuple(e["concat"]) for e in elems["vip_clients4"])
    tunnel = rules[ov.bridge].tunnel
    assert found == sorted([(a.bridge, "10.8.0.2"), (ov.bridge, "10.1.0.2"),
                            (tunnel, "10.1.0.2")])


def test_clients_read_back_from_the_kernels_listing() -> None:
    state = FirewallState((
        NetRule("pxbr-a", (net("10.1.0.0/24"),), clients=(ip("10.2.0.2"), ip("fd02::2"))),
        NetRule("pxbr-o", (net("10.8.0.0/24"),), tunnel="pxvx-o", clients=(ip("10.1.0.2"),)),
        NetRule("pxbr-b", (net("10.2.0.0/24"),))))
    assert parse_table(kernel_listing(render_table(state))) == state.canonical()
    other = dataclasses.replace(state.nets[0], clients=())
    assert parse_table(kernel_listing(render_table(state))) != FirewallState(
        (other, *state.nets[1:])).canonical()

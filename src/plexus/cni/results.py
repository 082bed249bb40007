"""CNI results in the shape of each spec version.

0.3.0, 0.3.1 and 0.4.0 carry ``"version": "4"|"6"`` in every ``ips`` entry; 1.0.0 dropped it.
1.1.0 is 1.0.0's shape (its additions, such as an interface's ``mtu``, are optional and we add
``mtu``). An IPAM plugin's result has no interfaces, and its ips no interface index.
"""

from __future__ import annotations

from typing import Any

from plexus.cni.config import version_tuple
from plexus.ipam import hostblocks
from plexus.model.drivers import traits
from plexus.model.types import Endpoint, Network


def _dns(dns: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (dns or {}).items() if v}


def add_result(
    version: str, net: Network, ep: Endpoint, dns: dict[str, Any] | None = None
) -> dict[str, Any]:
    v = version_tuple(version)
    interfaces: list[dict[str, Any]] = []
    iface_index: int | None = None
    if ep.has_links and traits(net.driver).links:
        interfaces.append({"name": ep.host_ifname})  # the host end of the veth
    if ep.has_links:
        iface_index = len(interfaces)
        entry: dict[str, Any] = {"name": ep.ifname, "mac": ep.mac, "sandbox": ep.netns}
        if v >= (1, 1) and not traits(net.driver).spans_hosts:
            # A spanning network's links get the overlay's MTU, which depends on this host's
            # underlay link: only the dataplane knows it, and the field is optional.
            entry["mtu"] = net.mtu
        interfaces.append(entry)
    ips = []
    for addr in ep.addresses:
        # As the interface holds it: an overlay's IPv6 address has its block's prefix and
        # gateway (ipam/hostblocks.py), which a runtime configuring from the result needs.
        ip: dict[str, Any] = {"address": str(hostblocks.interface(net, addr))}
        subnet = next((s for s in net.subnets if addr.ip in s.cidr), None)
        gw = None if subnet is None else hostblocks.gateway(net, subnet, addr.ip)
        if gw is not None:
            ip["gateway"] = str(gw)
        if iface_index is not None:
            ip["interface"] = iface_index
        if v < (1, 0):
            ip["version"] = str(addr.version)
        ips.append(ip)
    routes = [{"dst": "0.0.0.0/0" if g.version == 4 else "::/0", "gw": str(g)} for g in ep.gateways]
    result: dict[str, Any] = {"cniVersion": version, "ips": ips, "routes": routes, "dns": _dns(dns)}
    if ep.has_links:
        result["interfaces"] = interfaces
    return result

"""Where things live in the datastore. One place, so the layout can be read at a glance:

    /plexus/networks/NAME                         Network
    /plexus/subnets/CIDR                          network name (claims a subnet; CAS on create)
    /plexus/ipam/NETWORK/CIDR/ADDRESS             endpoint key owning the address
    /plexus/ipam-cursor/NETWORK/CIDR              last address handed out
    /plexus/endpoints/NODE/CONTAINER/IFNAME       Endpoint
    /plexus/ports/NODE/PROTO/PORT                 endpoint key publishing that host port
    /plexus/containers/NODE/NAME                  Container (started by `plexus run`)

CIDRs are written with '_' for '/' so that a key's segments stay split on '/'.
"""

from __future__ import annotations

ROOT = "/plexus/"
NETWORKS = ROOT + "networks/"
SUBNETS = ROOT + "subnets/"
IPAM = ROOT + "ipam/"
IPAM_CURSOR = ROOT + "ipam-cursor/"
ENDPOINTS = ROOT + "endpoints/"
PORTS = ROOT + "ports/"
CONTAINERS = ROOT + "containers/"


def _cidr(cidr: object) -> str:
    return str(cidr).replace("/", "_")


def network(name: str) -> str:
    return NETWORKS + name


def subnet(cidr: object) -> str:
    return SUBNETS + _cidr(cidr)


def ipam_prefix(network: str, cidr: object | None = None) -> str:
    return IPAM + network + "/" + ("" if cidr is None else _cidr(cidr) + "/")


def ipam_addr(network: str, cidr: object, addr: object) -> str:
    return ipam_prefix(network, cidr) + str(addr)


def ipam_cursor(network: str, cidr: object) -> str:
    return IPAM_CURSOR + network + "/" + _cidr(cidr)


def endpoints(node: str | None = None, container_id: str | None = None) -> str:
    if node is None:
        return ENDPOINTS
    if container_id is None:
        return f"{ENDPOINTS}{node}/"
    return f"{ENDPOINTS}{node}/{container_id}/"


def endpoint(node: str, container_id: str, ifname: str) -> str:
    return f"{ENDPOINTS}{node}/{container_id}/{ifname}"


def port(node: str, protocol: str, host_port: int) -> str:
    return f"{PORTS}{node}/{protocol}/{host_port}"


def ports(node: str) -> str:
    return f"{PORTS}{node}/"


def container(node: str, name: str) -> str:
    return f"{CONTAINERS}{node}/{name}"


def containers(node: str) -> str:
    return f"{CONTAINERS}{node}/"

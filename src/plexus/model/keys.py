"""Where things live in the datastore. One place, so the layout can be read at a glance:

    /plexus/networks/NAME                         Network
    /plexus/subnets/CIDR                          network name, or "pool:..." while a front door's
                                                  IPAM (Docker) holds it before the network exists
    /plexus/ipam/CIDR/ADDRESS                     owner of the address (an endpoint key, or a
                                                  front door's IPAM claim)
    /plexus/ipam-cursor/CIDR                      last address handed out
    /plexus/endpoints/NODE/CONTAINER/IFNAME       Endpoint
    /plexus/ports/NODE/PROTO/PORT                 endpoint key publishing that host port
    /plexus/containers/NODE/NAME                  Container (started by `plexus run`)

CIDRs are written with '_' for '/' so that a key's segments stay split on '/'. Addresses are
keyed by subnet, not by network: subnets are unique across the datastore, and a Docker IPAM pool
hands out addresses before its network exists.
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


def ipam_prefix(cidr: object) -> str:
    return IPAM + _cidr(cidr) + "/"


def ipam_addr(cidr: object, addr: object) -> str:
    return ipam_prefix(cidr) + str(addr)


def ipam_cursor(cidr: object) -> str:
    return IPAM_CURSOR + _cidr(cidr)


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

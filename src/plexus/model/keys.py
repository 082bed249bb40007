"""Where things live in the datastore. One place, so the layout can be read at a glance, and every
front door's keys are here too:

    /plexus/meta/layout                           version of this layout (see agent.migrate)
    /plexus/meta/store-id                         random id of this datastore, made once: agents
                                                  tag their kernel links NODE@ID8 (agent.identity)
    /plexus/networks/NAME                         Network
    /plexus/subnets/CIDR                          the network holding the subnet, or "pool:ID"
                                                  while an IPAM pool holds it before its network
                                                  exists (Docker asks for pools first)
    /plexus/pools/ID                              Pool (ipam.pools): a reserved subnet, counted
    /plexus/pools-refused/CIDR                    an automatic pool handed back unused: never
                                                  offered again
    /plexus/ipam/CIDR/ADDRESS                     owner of the address: an endpoint's store key,
                                                  or "pool:ID" (an address a pool handed out)
    /plexus/ipam-blocks/CIDR/START                bitmap of the addresses in use in the block of
                                                  BLOCK_SIZE addresses starting at START
    /plexus/ipam-cursor/CIDR                      last address handed out (a hint)
    /plexus/host-blocks/CIDR/BLOCK                the node holding a block of a spanning
                                                  network's subnet (ipam.hostblocks); deleted
                                                  by it when empty (services.blocks)
    /plexus/vnis/VNI                              the overlay network using a VXLAN id
    /plexus/endpoints/NODE/CONTAINER/IFNAME       Endpoint
    /plexus/ports/NODE/PROTO/PORT                 {host address or "*": endpoint store key}
    /plexus/containers/NODE/NAME                  Container (started by `plexus run`)
    /plexus/docker/networks/ID                    the plexus network serving a Docker network
    /plexus/hosts/NODE                            Host: its underlay address, agent id, last seen
    /plexus/host-leases/NODE                      the agent id of NODE's live agent, under its
                                                  lease: gone when the agent stops or dies
    /plexus/meta/service-range                    the service range: CIDR[,CIDR] (lb.vips)
    /plexus/services/NAMESPACE/NAME               Service (lb.spec)
    /plexus/service-ips/ADDRESS                   NAMESPACE/NAME of the service holding a VIP
    /plexus/service-ports/PROTO/PORT              NAMESPACE/NAME of the service published on
                                                  that host port (on every host)
    /plexus/service-health/NS/NAME/NODE/CTR/IF    status: that endpoint fails the service's
                                                  readiness check (written by its node's agent)

CIDRs are written with '_' for '/' so that a key's segments stay split on '/'. Addresses are keyed
by subnet, not by network: subnets are unique across the datastore, and a pool hands out
addresses before its network exists.

Why the blocks: an allocation reads the cursor and one block (a bitmap of 256 addresses) instead
of listing every claim of the subnet, so its cost does not grow with the number of containers;
the per-address key stays the owner record, so a release can check who holds the address, and
both change in the same transaction. Why one key per host port: a compare-and-swap on it guards
every host address of that port at once ("*" and "127.0.0.1" of one port conflict).
"""

from __future__ import annotations

ROOT = "/plexus/"
LAYOUT = ROOT + "meta/layout"
STORE_ID = ROOT + "meta/store-id"
NETWORKS = ROOT + "networks/"
SUBNETS = ROOT + "subnets/"
POOLS = ROOT + "pools/"
POOLS_REFUSED = ROOT + "pools-refused/"
IPAM = ROOT + "ipam/"
IPAM_BLOCKS = ROOT + "ipam-blocks/"
IPAM_CURSOR = ROOT + "ipam-cursor/"
HOST_BLOCKS = ROOT + "host-blocks/"
VNIS = ROOT + "vnis/"
ENDPOINTS = ROOT + "endpoints/"
PORTS = ROOT + "ports/"
CONTAINERS = ROOT + "containers/"
DOCKER_NETWORKS = ROOT + "docker/networks/"
HOSTS = ROOT + "hosts/"
HOST_LEASES = ROOT + "host-leases/"
NAMESPACES = ROOT + "namespaces/"
POLICIES = ROOT + "policies/"
SERVICE_RANGE = ROOT + "meta/service-range"
SERVICES = ROOT + "services/"
SERVICE_IPS = ROOT + "service-ips/"
SERVICE_PORTS = ROOT + "service-ports/"
SERVICE_HEALTH = ROOT + "service-health/"

LAYOUT_VERSION = "2"
POOL_CLAIM_PREFIX = "pool:"


def cidr_segment(cidr: object) -> str:
    return str(cidr).replace("/", "_")


def segment_cidr(segment: str) -> str:
    return segment.replace("_", "/")


def network(name: str) -> str:
    return NETWORKS + name


def subnet(cidr: object) -> str:
    return SUBNETS + cidr_segment(cidr)


def pool(pool_id: str) -> str:
    return POOLS + cidr_segment(pool_id).replace("|", "+")


def pool_refused(cidr: object) -> str:
    return POOLS_REFUSED + cidr_segment(cidr)


def pool_claim(pool_id: str) -> str:
    """The value a pool writes into the subnet and address claims it holds."""
    return POOL_CLAIM_PREFIX + pool_id


def ipam_prefix(cidr: object) -> str:
    return IPAM + cidr_segment(cidr) + "/"


def ipam_addr(cidr: object, addr: object) -> str:
    return ipam_prefix(cidr) + str(addr)


def ipam_block(cidr: object, start: object) -> str:
    return f"{IPAM_BLOCKS}{cidr_segment(cidr)}/{start}"


def ipam_blocks(cidr: object) -> str:
    return f"{IPAM_BLOCKS}{cidr_segment(cidr)}/"


def ipam_cursor(cidr: object) -> str:
    return IPAM_CURSOR + cidr_segment(cidr)


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


def docker_network(network_id: str) -> str:
    return DOCKER_NETWORKS + network_id


def host(node: str) -> str:
    return HOSTS + node


def host_lease(node: str) -> str:
    return HOST_LEASES + node


def host_block(cidr: object, block: object) -> str:
    return f"{HOST_BLOCKS}{cidr_segment(cidr)}/{cidr_segment(block)}"


def host_blocks(cidr: object) -> str:
    return f"{HOST_BLOCKS}{cidr_segment(cidr)}/"


def vni(number: int) -> str:
    return f"{VNIS}{number}"


def namespace(name: str) -> str:
    return NAMESPACES + name


def policy(kind: str, namespace: str, name: str) -> str:
    """A policy document, by kind, namespace ("-" for a cluster-wide kind) and name."""
    return f"{POLICIES}{namespace or '-'}/{kind}/{name}"


def service(namespace: str, name: str) -> str:
    return f"{SERVICES}{namespace}/{name}"


def service_ip(address: object) -> str:
    return f"{SERVICE_IPS}{address}"


def service_port(protocol: str, host_port: int) -> str:
    return f"{SERVICE_PORTS}{protocol}/{host_port}"


def service_health(namespace: str, name: str, endpoint_key: str) -> str:
    """An endpoint failing a service's readiness check (``endpoint_key``: its store key)."""
    return f"{SERVICE_HEALTH}{namespace}/{name}/{endpoint_key[len(ENDPOINTS):]}"


def service_healths(namespace: str, name: str) -> str:
    return f"{SERVICE_HEALTH}{namespace}/{name}/"


def service_health_parts(key: str) -> tuple[str, str]:
    """(service store key, endpoint store key) of a ``service_health`` key."""
    namespace, name, rest = key[len(SERVICE_HEALTH):].split("/", 2)
    return service(namespace, name), ENDPOINTS + rest

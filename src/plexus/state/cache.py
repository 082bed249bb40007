"""The agent's one read-only view of desired state, fed by the informer and nothing else.

Services read it to validate requests (does the network exist, which interfaces does a container
have); reconcilers read it to render what the kernel should hold; the API reads it for listings.
Nobody writes it but ``apply``, which the informer calls with every change of the datastore, in
revision order: a service that wants to see its own write waits for the informer to reach the
transaction's revision (``Informer.wait_for``). Indexes keep every lookup a service or reconciler
makes per change O(1) or O(size of the answer).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from plexus.errors import InvalidArgument
from plexus.lb import vips
from plexus.lb.spec import Service
from plexus.model import keys
from plexus.model.types import (
    Container,
    Endpoint,
    Host,
    IPAddress,
    IPNetwork,
    Namespace,
    Network,
)
from plexus.policy import documents
from plexus.policy.model import Policy
from plexus.store.informer import Change

log = logging.getLogger("plexus.cache")
_K = TypeVar("_K")


@dataclass(frozen=True, slots=True)
class DockerNetwork:
    """A Docker network served by a plexus network (``keys.docker_network``)."""

    id: str
    name: str  # the plexus network
    created: bool  # plexus created the network for it (and removes it with it)


@dataclass
class Cache:
    node: str
    networks: dict[str, Network] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)  # store key -> all nodes'
    containers: dict[str, Container] = field(default_factory=dict)  # name -> this node's
    docker_networks: dict[str, DockerNetwork] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)  # every node's record
    alive: set[str] = field(default_factory=set)  # nodes whose agent holds its lease
    namespaces: dict[str, Namespace] = field(default_factory=dict)  # the stored ones
    policies: dict[str, Policy] = field(default_factory=dict)  # store key -> policy
    services: dict[str, Service] = field(default_factory=dict)  # store key -> service
    service_range: tuple[IPNetwork, ...] = ()
    vips: dict[IPAddress, str] = field(default_factory=dict)  # VIP -> service store key
    checked: set[str] = field(default_factory=set)  # services with a readiness check
    # (node, container id) of every node's `plexus run` containers that exited: their
    # endpoints stay until `plexus rm` but serve no service.
    stopped: set[tuple[str, str]] = field(default_factory=set)
    _stopped_at: dict[str, tuple[str, str]] = field(default_factory=dict)  # record key ->
    failing: set[tuple[str, str]] = field(default_factory=set)  # (service, endpoint) store keys
    # Services by (namespace, network), and by (namespace, network, KEY, VALUE) of the first
    # pair of their selector: an endpoint's candidates are found from its own labels.
    _services_at: dict[tuple[str, str], set[str]] = field(
        default_factory=lambda: defaultdict(set))
    _services_by_label: dict[tuple[str, str, str, str], set[str]] = field(
        default_factory=lambda: defaultdict(set))
    # Blocks of spanning networks' subnets: subnet -> block -> node, and (subnet, node) -> blocks.
    blocks: dict[IPNetwork, dict[IPNetwork, str]] = field(
        default_factory=lambda: defaultdict(dict))
    _blocks_of: dict[tuple[IPNetwork, str], set[IPNetwork]] = field(
        default_factory=lambda: defaultdict(set))
    _held: dict[str, set[tuple[IPNetwork, IPNetwork]]] = field(  # node -> (subnet, block)
        default_factory=lambda: defaultdict(set))
    _by_network: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Endpoints by (network, label key, label value): a service's candidates (lb.members).
    _by_label: dict[tuple[str, str, str], set[str]] = field(default_factory=dict)
    _by_container: dict[tuple[str, str], dict[str, Endpoint]] = field(
        default_factory=lambda: defaultdict(dict))
    _containers_by_id: dict[str, str] = field(default_factory=dict)
    _local: set[str] = field(default_factory=set)  # store keys of this node's endpoints
    # Endpoints with addresses borrowed from another host's block (``Endpoint.borrowed``), by
    # network; and those just removed, until the overlay reconciler has been told.
    _borrowing: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _left: dict[str, str] = field(default_factory=dict)

    # -- reading -----------------------------------------------------------------------------

    def network(self, name: str) -> Network | None:
        return self.networks.get(name)

    def endpoint(self, key: str) -> Endpoint | None:
        return self.endpoints.get(key)

    def endpoints_on(self, network: str) -> list[Endpoint]:
        """Every node's endpoints on ``network``."""
        return [self.endpoints[k] for k in sorted(self._by_network.get(network, ()))]

    def labelled(self, network: str, key: str, value: str) -> list[Endpoint]:
        """Every node's endpoints on ``network`` with label ``key=value``."""
        return [self.endpoints[k] for k in sorted(self._by_label.get((network, key, value), ()))]

    def count_on(self, network: str) -> int:
        return len(self._by_network.get(network, ()))

    def of_container(self, container_id: str, node: str | None = None) -> list[Endpoint]:
        """The interfaces of one container (on this node unless ``node`` says otherwise)."""
        found = self._by_container.get((node or self.node, container_id), {})
        return [found[i] for i in sorted(found)]

    def blocks_of(self, subnet: IPNetwork, node: str) -> list[IPNetwork]:
        """The blocks of ``subnet`` that ``node`` holds, in address order."""
        return sorted(self._blocks_of.get((subnet, node), ()))

    def borrowed_on(self, network: str) -> list[Endpoint]:
        """Every node's endpoints on ``network`` holding borrowed addresses: O(their number)."""
        return [self.endpoints[k] for k in sorted(self._borrowing.get(network, ()))]

    def borrowing_network(self, key: str) -> str | None:
        """The network of the endpoint at ``key`` if it holds borrowed addresses or, just
        removed, held some (told once): the network whose routes its change touches."""
        ep = self.endpoints.get(key)
        if ep is not None and ep.borrowed:
            return ep.network
        return self._left.pop(key, None)

    def held_by(self, node: str) -> list[tuple[IPNetwork, IPNetwork]]:
        """(subnet, block) of every block ``node`` holds, of any network: O(their number)."""
        return sorted(self._held.get(node, ()))

    def local_endpoints(self) -> list[Endpoint]:
        return [self.endpoints[k] for k in self._local]

    def local_count(self) -> int:
        return len(self._local)

    def container_by_id(self, container_id: str) -> Container | None:
        name = self._containers_by_id.get(container_id)
        return None if name is None else self.containers.get(name)

    def namespace(self, name: str) -> Namespace | None:
        """A namespace by name; ``default`` exists whether it was stored or not."""
        found = self.namespaces.get(name)
        if found is None and name == documents.DEFAULT_NAMESPACE:
            return Namespace(name)
        return found

    def service(self, namespace: str, name: str) -> Service | None:
        return self.services.get(keys.service(namespace, name))

    def services_at(self, namespace: str, network: str) -> list[str]:
        """Store keys of the services of one namespace and network."""
        return sorted(self._services_at.get((namespace, network), ()))

    def services_selecting(self, ep: Endpoint) -> set[str]:
        """Store keys of the services whose selector ``ep``'s labels match (ready or not):
        O(its labels + the services indexed under them)."""
        ns, found = ep.policy_namespace, set()
        for k, v in ep.labels.items():
            for key in self._services_by_label.get((ns, ep.network, k, v), ()):
                svc = self.services[key]
                if all(ep.labels.get(sk) == sv for sk, sv in svc.selector.items()):
                    found.add(key)
        return found

    def served_by(self, network: str) -> list[str]:
        """The Docker network IDs a plexus network serves."""
        return sorted(d.id for d in self.docker_networks.values() if d.name == network)

    # -- writing (the informer only) ---------------------------------------------------------

    def apply(self, changes: Sequence[Change]) -> None:
        for change in changes:
            try:
                self._apply_one(change)
            except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
                # A value this version cannot read (a newer writer, a hand edit): skip it, loudly,
                # rather than stop following the store.
                log.error("ignoring unreadable datastore value at %s: %s", change.key, exc)

    def _apply_one(self, change: Change) -> None:
        key, value = change.key, None if change.kv is None else change.kv.value
        if key.startswith(keys.ENDPOINTS):
            self._set_endpoint(key, None if value is None else Endpoint.from_json(value))
        elif key.startswith(keys.NETWORKS):
            name = key[len(keys.NETWORKS):]
            if value is None:
                self.networks.pop(name, None)
            else:
                self.networks[name] = Network.from_json(value)
        elif key.startswith(keys.CONTAINERS):
            self._set_stopped(key, None if value is None else Container.from_json(value))
            if key.startswith(keys.containers(self.node)):
                self._set_container(key[len(keys.containers(self.node)):], value)
        elif key.startswith(keys.DOCKER_NETWORKS):
            self._set_docker_network(key[len(keys.DOCKER_NETWORKS):], value)
        elif key.startswith(keys.HOST_BLOCKS):
            subnet, _, block = key[len(keys.HOST_BLOCKS):].partition("/")
            self._set_block(ipaddress.ip_network(keys.segment_cidr(subnet)),
                            ipaddress.ip_network(keys.segment_cidr(block)), value)
        elif key.startswith(keys.HOSTS):
            self._set_host(key[len(keys.HOSTS):], value)
        elif key.startswith(keys.NAMESPACES):
            name = key[len(keys.NAMESPACES):]
            if value is None:
                self.namespaces.pop(name, None)
            else:
                self.namespaces[name] = Namespace.from_json(value)
        elif key.startswith(keys.POLICIES):
            if value is None:
                self.policies.pop(key, None)
            else:
                self.policies[key] = documents.parse(json.loads(value))
        elif key.startswith(keys.SERVICE_HEALTH):
            pair = keys.service_health_parts(key)
            if value is None:
                self.failing.discard(pair)
            else:
                self.failing.add(pair)
        elif key.startswith(keys.SERVICES):
            self._set_service(key, None if value is None else Service.from_json(value))
        elif key == keys.SERVICE_RANGE:
            self.service_range = () if value is None else vips.loads(value)
        elif key.startswith(keys.HOST_LEASES):
            node = key[len(keys.HOST_LEASES):]
            if value is None:
                self.alive.discard(node)
            else:
                self.alive.add(node)

    def _set_endpoint(self, key: str, ep: Endpoint | None) -> None:
        old = self.endpoints.pop(key, None)
        self._local.discard(key)
        if old is not None:
            self._by_network[old.network].discard(key)
            if not self._by_network[old.network]:
                del self._by_network[old.network]
            for pair in old.labels.items():
                _discard(self._by_label, (old.network, *pair), key)
            ifaces = self._by_container[(old.node, old.container_id)]
            ifaces.pop(old.ifname, None)
            if not ifaces:
                del self._by_container[(old.node, old.container_id)]
            if old.borrowed:
                self._forget_borrowed(key, old)
        if ep is not None and ep.borrowed:
            self._borrowing[ep.network].add(key)
            self._left.pop(key, None)
        if ep is not None:
            self.endpoints[key] = ep
            if ep.node == self.node:
                self._local.add(key)
            self._by_network[ep.network].add(key)
            for k, v in ep.labels.items():
                self._by_label.setdefault((ep.network, k, v), set()).add(key)
            self._by_container[(ep.node, ep.container_id)][ep.ifname] = ep

    def _forget_borrowed(self, key: str, old: Endpoint) -> None:
        self._borrowing[old.network].discard(key)
        if not self._borrowing[old.network]:
            del self._borrowing[old.network]
        self._left[key] = old.network

    def _set_stopped(self, key: str, c: Container | None) -> None:
        old = self._stopped_at.pop(key, None)
        if old is not None:
            self.stopped.discard(old)
        if c is not None and c.state == "exited":
            self._stopped_at[key] = (c.node, c.id)
            self.stopped.add((c.node, c.id))

    def _set_container(self, name: str, value: str | None) -> None:
        old = self.containers.pop(name, None)
        if old is not None:
            self._containers_by_id.pop(old.id, None)
        if value is not None:
            c = Container.from_json(value)
            self.containers[name] = c
            self._containers_by_id[c.id] = name

    def _set_block(self, subnet: IPNetwork, block: IPNetwork, node: str | None) -> None:
        old = self.blocks[subnet].pop(block, None)
        if old is not None:
            self._blocks_of[(subnet, old)].discard(block)
            if not self._blocks_of[(subnet, old)]:
                del self._blocks_of[(subnet, old)]
            self._held[old].discard((subnet, block))
            if not self._held[old]:
                del self._held[old]
        if node is not None:
            self.blocks[subnet][block] = node
            self._blocks_of[(subnet, node)].add(block)
            self._held[node].add((subnet, block))
        elif not self.blocks[subnet]:
            del self.blocks[subnet]

    def _set_service(self, key: str, svc: Service | None) -> None:
        old = self.services.pop(key, None)
        self.checked.discard(key)
        if old is not None:
            _discard(self._services_at, (old.namespace, old.network), key)
            for vip in old.vips:
                if self.vips.get(vip) == key:
                    del self.vips[vip]
            if old.selector:
                k, v = min(old.selector.items())
                _discard(self._services_by_label, (old.namespace, old.network, k, v), key)
        if svc is None:
            return
        self.services[key] = svc
        if svc.health is not None:
            self.checked.add(key)
        self._services_at[(svc.namespace, svc.network)].add(key)
        self.vips.update((vip, key) for vip in svc.vips)
        if svc.selector:  # no selector: no endpoints, as in Kubernetes
            k, v = min(svc.selector.items())
            self._services_by_label[(svc.namespace, svc.network, k, v)].add(key)

    def _set_host(self, node: str, value: str | None) -> None:
        if value is None:
            self.hosts.pop(node, None)
        else:
            self.hosts[node] = Host.from_json(value)

    def _set_docker_network(self, network_id: str, value: str | None) -> None:
        if value is None:
            self.docker_networks.pop(network_id, None)
            return
        data = json.loads(value)
        self.docker_networks[network_id] = DockerNetwork(
            network_id, str(data["name"]), bool(data.get("created")))


def _discard(index: dict[_K, set[str]], at: _K, key: str) -> None:
    found = index.get(at)
    if found is not None:
        found.discard(key)
        if not found:
            del index[at]

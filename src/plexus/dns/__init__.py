"""plexus's embedded DNS server: container names from the datastore, everything else forwarded.

    records.py   RecordTable: networks + endpoints -> answers per view; explain();
                 apply(DnsChanges): changed in place, O(size of the change)         (pure)
    names.py     what one endpoint publishes on one network, and taking it back     (pure)
    model.py     DnsChanges in; Resolution, Explanation, Match, View out            (pure)
    wire.py      DNS message parsing and building                                   (pure)
    config.py    DnsSettings, Upstream, per-network options, resolv.conf            (pure)
    server.py    DnsServer: asyncio UDP+TCP listeners, the fast path, forwarding
    upstream.py  Forwarder: UDP, TCP on truncation, health checks, failover
    workers.py   WorkerPool: the same server in N processes on SO_REUSEPORT
    service.py   DnsService: what the agent holds (either of the two above)
    metrics.py   counters and histograms as plain data
    (plexus.testing.dns: StubUpstream, a scriptable upstream resolver for tests)

How to wire this into the agent
-------------------------------

Start-up (after the core has loaded networks and endpoints)::

    from plexus.dns import DnsChanges, DnsService, DnsSettings, parse_upstreams

    ups = parse_upstreams(args.dns_upstream)            # --dns-upstream, repeatable
    dns = DnsService(DnsSettings(domain=args.dns_domain, ttl=args.dns_ttl, upstreams=ups),
                     workers=args.dns_workers,          # recommended default: 1 (see below)
                     follow=None if ups else Path("/etc/resolv.conf"))
    await dns.start()
    dns.load(all_networks, {store_key: endpoint, ...})  # every node's endpoints, all states
    errors = await dns.sync_listeners()                 # gateway:53 of each DNS network

On every change to a network or an endpoint (after the transaction committed; from the
datastore watch, so that other nodes' containers appear too), only what changed::

    dns.apply(DnsChanges(endpoints={store_key: endpoint_or_None},   # None: removed
                         networks={name: network_or_None}))         # either may be left out
    errors = await dns.sync_listeners()                 # only if networks/gateways changed;
                                                        # level-triggered, retries failures

``apply`` costs O(size of the change) whatever the number of containers (~50 µs to add one
endpoint, ~25 µs to remove one, in the agent and again in each worker process, which is sent
only the change; ``bench/dns_update.py``). Key
endpoints by something unique across hosts (the datastore key), not ``Endpoint.key``. Changes
that DNS cannot see (an endpoint's state, ports, labels) cost a dict write and drop no cached
answer. ``load`` (``update`` is the same) rebuilds everything: for start-up and resyncs after
the watch was lost (~35 µs per endpoint).

``sync_listeners`` binds with IP_FREEBIND, so it may run before the reconciler has put the
gateway address on the bridge. Periodic reconcile: call it again; it is cheap when nothing
changed. The firewall must accept UDP and TCP to port 53 of each gateway from the network's
containers (internal networks included).

``workers``: 0 runs the server in the agent's event loop (fast only if that loop is uvloop:
~12k q/s on the stock asyncio loop against ~50k with uvloop); N >= 1 runs it in N supervised
``python -m plexus.dns`` processes on SO_REUSEPORT, each with uvloop, so a burst of lookups
does not slow the agent and a stalled agent loop does not stall lookups. 1 is the sensible
default; more only helps on hosts with cores to spare. The calls are the same either way.

``network create --dns-upstream IP[:PORT]`` (repeatable): validate with ``parse_upstreams`` and
store ``format_upstreams(...)`` in ``Network.options[OPTION_UPSTREAMS]``; ``--opt dns=false``
turns the server off for a network. Internal networks never forward.

Containers' resolv.conf: ``nameserver <gateway>`` for the gateways of the container's first
network (IPv4 first), then ``search <settings.domain> <the host's search domains>``. Putting the
plexus domain first makes ``web`` resolve as ``web.plexus.internal`` locally before any host
search domain sends it upstream (bare names resolve too, so the search line is an optimisation,
not a requirement). Copy the host's ``options`` line, as Docker does.

API / CLI::

    GET /dns/stats                  -> await dns.stats()                       (JSON as is)
                                       (queries by type and rcode, outcomes, drops, TCP, and
                                       per upstream: health, failures, latency histogram)
    GET /dns/lookup?name=&network=&type=A&client=
                                    -> (await dns.lookup(net, name, qtype, client)).to_dict()
    plexus dns lookup NAME --network NET [--type AAAA] [--client IP]
                                    -> print(explanation.text())
    NotFound (unknown network) and InvalidArgument (bad type) are PlexusErrors: map as usual.

Shutdown::

    await dns.close()

The agent must not call ``apply`` or ``load`` from another thread: a change relies on running on
the event loop's thread, between two packets.
"""

from plexus.dns.config import (
    DEFAULT_DOMAIN,
    DEFAULT_TTL,
    OPTION_DNS,
    OPTION_UPSTREAMS,
    DnsSettings,
    Upstream,
    dns_enabled,
    format_upstreams,
    parse_upstream,
    parse_upstreams,
    resolv_conf_upstreams,
)
from plexus.dns.model import DnsChanges, Explanation, Match, Resolution, View
from plexus.dns.records import RecordTable
from plexus.dns.server import DnsServer, ListenAddress, ServerOptions, listen_addresses
from plexus.dns.service import DnsService
from plexus.dns.upstream import ForwardOptions

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_TTL",
    "OPTION_DNS",
    "OPTION_UPSTREAMS",
    "DnsChanges",
    "DnsServer",
    "DnsService",
    "DnsSettings",
    "Explanation",
    "ForwardOptions",
    "ListenAddress",
    "Match",
    "RecordTable",
    "Resolution",
    "ServerOptions",
    "Upstream",
    "View",
    "dns_enabled",
    "format_upstreams",
    "listen_addresses",
    "parse_upstream",
    "parse_upstreams",
    "resolv_conf_upstreams",
]

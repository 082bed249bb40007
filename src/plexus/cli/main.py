"""The `plexus` command. Every subcommand except `agent` is a thin client of the agent's API;
the container commands live in ``cli.containers``, what all share in ``cli.common``."""

from __future__ import annotations

import socket as socketlib
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import click

from plexus import __version__
from plexus.api.client import DEFAULT_SOCKET
from plexus.cli import containers, flows, hosts, policies, services, verify
from plexus.cli.common import (
    EXIT_FAILED,
    Group,
    call,
    client,
    emit,
    exit_code,
    fail,
    for_each,
    json_opt,
    kv,
    table,
    url,
)
from plexus.config import DEFAULT_RECONCILE_INTERVAL


@click.group(cls=Group)
@click.option(
    "--socket",
    envvar="PLEXUS_SOCKET",
    default=DEFAULT_SOCKET,
    show_default=True,
    help="the agent's API socket ($PLEXUS_SOCKET)",
)
@click.version_option(__version__, prog_name="plexus", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, socket: str) -> None:
    """plexus: container networking for Linux."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket


for _command in [*containers.COMMANDS, *flows.COMMANDS, *hosts.COMMANDS, *policies.COMMANDS,
                 *services.COMMANDS, *verify.COMMANDS]:
    cli.add_command(_command)


@cli.command()
@click.option("--state-dir", default="/var/lib/plexus", show_default=True, type=click.Path(),
              help="where the agent keeps its datastore, lock and container logs")
@click.option(
    "--socket",
    "api_socket",
    default=None,
    help="serve the API on this unix socket, rather than plexus's --socket "
    f"(or $PLEXUS_SOCKET, or {DEFAULT_SOCKET})",
)
@click.option("--node", default=socketlib.gethostname(), show_default=True,
              help="this host's name among the datastore's hosts")
@click.option("--advertise-address", default="",
              help="the address other hosts reach this one at "
              "(default: the address of the interface holding the default route)")
@click.option(
    "--store",
    "store_url",
    default="",
    help="datastore: etcd://IP:2379[,IP:2379...] (etcds:// with TLS) for a cluster, or a "
    "SQLite path (default: SQLite in the state directory)",
)
@click.option("--host-gc-after", default=3600.0, show_default=True,
              type=click.FloatRange(min=0),
              help="seconds a host may go without a live agent before its containers' "
              "addresses are released and it is removed (0: never; `plexus host rm` does it now)")
@click.option("--block-release-after", default=300.0, show_default=True,
              type=click.FloatRange(min=0),
              help="seconds an address block of an overlay network that this host holds may "
              "have no address in use before it goes back to the pool (0: never)")
@click.option("--etcd-cacert", default=None, help="etcds://: the CA that signed etcd's cert")
@click.option("--etcd-cert", default=None, help="etcds://: this agent's client certificate")
@click.option("--etcd-key", default=None, help="etcds://: the client certificate's key")
@click.option(
    "--pool",
    default="10.89.0.0/16:24",
    show_default=True,
    help="IPv4 pool for automatic subnets, CIDR:PREFIXLEN (subnets of /PREFIXLEN)",
)
@click.option(
    "--pool6",
    default="fd89:7c00::/48:64",
    show_default=True,
    help="IPv6 pool for automatic subnets, CIDR:PREFIXLEN (subnets of /PREFIXLEN)",
)
@click.option("--service-cidr", multiple=True,
              help="the services' VIP range, one per family (repeatable or CIDR,CIDR; default: "
              "the cluster's stored range, else a free /16 of 10.96-111.0.0 and an IPv6 /112)")
@click.option("--reconcile-interval", default=DEFAULT_RECONCILE_INTERVAL, show_default=True,
              type=click.FloatRange(min=0.1),
              help="seconds between full passes that compare everything with the kernel "
              "(a safety net: the datastore's watch and kernel events do the real work)")
@click.option(
    "--dns-upstream",
    multiple=True,
    help="resolver for names plexus does not own, "
    "IP[:PORT] (repeatable; default: the host's resolv.conf)",
)
@click.option("--dns-domain", default="plexus.internal", show_default=True,
              help="the domain of containers' names (NAME.DOMAIN)")
@click.option("--dns-ttl", default=5, show_default=True, type=click.IntRange(min=0),
              help="seconds clients may cache plexus's DNS answers")
@click.option(
    "--dns-workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="DNS server processes (0: in the agent's own loop)",
)
@click.option("--no-dns", is_flag=True, help="run without the embedded DNS server")
@click.option("--docker-api", default="/run/docker.sock", show_default=True,
              help="dockerd's API socket, to learn container names ('' to disable)")
@click.option(
    "--docker-plugin-socket",
    default="/run/docker/plugins/plexus.sock",
    show_default=True,
    help="serve the Docker network+IPAM plugin here ('' to disable)",
)
@click.option("--no-flows", is_flag=True,
              help="run without the flow log (conntrack events and logged drops)")
@click.option("--flow-export", default="", metavar="PATH",
              help="append every flow record to PATH as JSON lines (for log shippers)")
@click.option("--flow-rate", default=5000, show_default=True, type=click.IntRange(min=1),
              help="flow records made a second at most (the rest are counted, not kept)")
@click.option("--metrics-address", default="",
              help="serve Prometheus metrics at http://HOST:PORT/metrics and the web view "
              "at http://HOST:PORT/ (PORT or :PORT: on 127.0.0.1; default: off)")
@click.option("-v", "--verbose", is_flag=True, help="log at debug level")
@click.pass_context
def agent(
    ctx: click.Context,
    state_dir: str,
    api_socket: str | None,
    node: str,
    advertise_address: str,
    store_url: str,
    host_gc_after: float,
    block_release_after: float,
    etcd_cacert: str | None,
    etcd_cert: str | None,
    etcd_key: str | None,
    pool: str,
    pool6: str,
    service_cidr: tuple[str, ...],
    reconcile_interval: float,
    dns_upstream: tuple[str, ...],
    dns_domain: str,
    dns_ttl: int,
    dns_workers: int,
    no_dns: bool,
    docker_api: str,
    docker_plugin_socket: str,
    no_flows: bool,
    flow_export: str,
    flow_rate: int,
    metrics_address: str,
    verbose: bool,
) -> None:
    """Run the agent (the daemon) in the foreground."""
    from plexus.agent import daemon
    from plexus.config import AgentConfig
    from plexus.errors import PlexusError
    from plexus.lb import vips
    from plexus.model import parse
    from plexus.observe.server import parse_address

    try:
        if metrics_address:
            parse_address(metrics_address)  # a typo fails here, before anything starts
        p4, l4 = parse.pool("--pool", pool, version=4)
        p6, l6 = parse.pool("--pool6", pool6, version=6)
        config = AgentConfig(
            state_dir=Path(state_dir),
            # `plexus agent --socket` is where users look for it; the group's option (which also
            # reads $PLEXUS_SOCKET) is what every client command shares. The nearer one wins.
            socket=Path(api_socket if api_socket is not None else ctx.obj["socket"]),
            node=node,
            store_url=store_url,
            etcd_tls=(etcd_cacert, etcd_cert, etcd_key),
            host_gc_after=host_gc_after,
            block_release_after=block_release_after,
            advertise_address=advertise_address,
            pool4=p4,
            pool4_prefix=l4,
            pool6=p6,
            pool6_prefix=l6,
            service_cidrs=vips.parse(service_cidr),
            reconcile_interval=reconcile_interval,
            docker_plugin_socket=Path(docker_plugin_socket) if docker_plugin_socket else None,
            docker_api=Path(docker_api) if docker_api else None,
            dns=not no_dns,
            dns_domain=dns_domain,
            dns_ttl=dns_ttl,
            dns_upstreams=dns_upstream,
            dns_workers=dns_workers,
            flows=not no_flows,
            flow_rate=flow_rate,
            flow_export=Path(flow_export) if flow_export else None,
            metrics_address=metrics_address,
        )
        daemon.main(config, verbose)
    except PlexusError as exc:
        fail(exc.message, exit_code(exc.kind))
    except PermissionError as exc:  # not root: the first file, socket or netlink call says no
        where = f" on {exc.filename}" if exc.filename else ""
        fail(f"permission denied{where}: the agent needs root (CAP_NET_ADMIN and more)")


@cli.command()
@json_opt
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Is the agent up and ready?"""
    data = call(ctx, "GET", url("status"))
    if as_json:
        emit(data)
    else:
        state = "ready" if data["ready"] else "starting"
        click.echo(
            f"agent {state} on node {data['node']}: {data['networks']} networks, "
            f"{data['endpoints']} endpoints (plexus {data['version']})"
        )
        # What the reconcilers keep failing on (they retry with backoff and carry on).
        for e in data.get("errors", []):
            click.echo(
                f"failing: {e['reconciler']} {e['object']} (attempt {e['attempts']}): {e['error']}"
            )


@cli.command()
@click.pass_context
def reconcile(ctx: click.Context) -> None:
    """Compare everything with the kernel now (the periodic full pass), print what was found."""
    emit(call(ctx, "POST", url("reconcile")))


# -- networks ---------------------------------------------------------------------------------


@cli.group()
def network() -> None:
    """Create, list, inspect and remove networks."""


@network.command("create")
@click.argument("name")
@click.option("--driver", default="bridge", show_default=True,
              help="bridge, overlay (across hosts), host, none or ipam (addresses only, for "
              "another CNI plugin)")
@click.option("--subnet", multiple=True,
              help="CIDR, one per family (default: one picked from the agent's --pool)")
@click.option("--gateway", multiple=True, help="the gateway of a subnet (default: its first)")
@click.option("--ip-range", multiple=True,
              help="CIDR within a subnet that automatic addresses come from")
@click.option("--ipv6", is_flag=True, help="also an IPv6 subnet (from --pool6 unless given)")
@click.option("--internal", is_flag=True, help="no traffic to or from outside the network")
@click.option("--mtu", type=int, default=1500, show_default=True, help="the links' MTU")
@click.option("--label", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("-o", "--opt", multiple=True, help="driver option KEY=VALUE (dns=false: no DNS)")
@click.option("--dns-upstream", multiple=True, help="this network's resolvers, IP[:PORT]")
@click.option("--vni", type=int, default=0,
              help="overlay: the VXLAN id (default: the next free one from 4096)")
@click.option("--block-size", type=int, default=0,
              help="overlay: the prefix length of the address blocks hosts take (default 26)")
@json_opt
@click.pass_context
def network_create(
    ctx: click.Context,
    name: str,
    driver: str,
    subnet: tuple[str, ...],
    gateway: tuple[str, ...],
    ip_range: tuple[str, ...],
    ipv6: bool,
    internal: bool,
    mtu: int,
    label: tuple[str, ...],
    opt: tuple[str, ...],
    dns_upstream: tuple[str, ...],
    vni: int,
    block_size: int,
    as_json: bool,
) -> None:
    """Create a network."""
    net = call(ctx, "POST", url("networks"), {
        "name": name,
        "driver": driver,
        "subnets": list(subnet),
        "gateways": list(gateway),
        "ip_ranges": list(ip_range),
        "ipv6": ipv6,
        "internal": internal,
        "mtu": mtu,
        "labels": kv(label, "label"),
        "options": kv(opt, "opt"),
        "dns_upstreams": list(dns_upstream),
        **({"vni": vni} if vni else {}),
        **({"block_size": block_size} if block_size else {}),
    })
    if as_json:
        emit(net)
    else:
        click.echo(net["name"])


@network.command("ls")
@json_opt
@click.pass_context
def network_ls(ctx: click.Context, as_json: bool) -> None:
    """List networks."""
    nets = call(ctx, "GET", url("networks"))
    if as_json:
        emit(nets)
        return
    rows = [
        (
            n["name"],
            n["id"][:12],
            n["driver"],
            ",".join(s["cidr"] for s in n["subnets"]) or "-",
            "internal" if n["internal"] else "",
            str(n["endpoints"]),
            ",".join(d[:12] for d in n.get("docker_networks", [])) or "-",
        )
        for n in nets
    ]
    table(rows, ("NAME", "ID", "DRIVER", "SUBNETS", "FLAGS", "ENDPOINTS", "DOCKER"))


@network.command("inspect")
@click.argument("name")
@click.pass_context
def network_inspect(ctx: click.Context, name: str) -> None:
    """Show a network as JSON."""
    emit(call(ctx, "GET", url("networks", name)))


@network.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="detach its endpoints first")
@click.pass_context
def network_rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove networks."""

    def remove(name: str) -> None:
        answer = client(ctx).call("DELETE", url("networks", name) + ("?force=1" if force else ""))
        if force:
            n = int(answer.get("detached", 0))
            click.echo(f"{name} (detached {n} endpoint{'' if n == 1 else 's'})")
        else:
            click.echo(name)

    for_each(names, remove)


# -- dns ----------------------------------------------------------------------------------------


@cli.group()
def dns() -> None:
    """Ask the embedded DNS server."""


# What a client of the DNS server would take as a failure (NXDOMAIN is an answer).
FAILED_RCODES = ("REFUSED", "SERVFAIL")


def dns_failed(answer: dict[str, Any]) -> bool:
    """Did the lookup fail: REFUSED or SERVFAIL, plexus's own or a forwarded name's upstream's,
    or no upstream answered (a client gets SERVFAIL)?"""
    if answer.get("rcode") in FAILED_RCODES or answer.get("error"):
        return True
    first = (answer.get("response") or [""])[0]  # "rcode NAME" when forwarded
    return str(first).removeprefix("rcode ") in FAILED_RCODES


@dns.command("lookup")
@click.argument("name")
@click.option("--network", required=True, help="the network the question arrives on")
@click.option("--type", "qtype", default="A", show_default=True,
              help="the query type: A, AAAA, PTR, ... or TYPEnnn")
@click.option("--client", default="", help="the asking container's address")
@json_opt
@click.pass_context
def dns_lookup(
    ctx: click.Context, name: str, network: str, qtype: str, client: str, as_json: bool
) -> None:
    """What the server answers for NAME on NETWORK, and why (exit 1: REFUSED or SERVFAIL)."""
    query = urlencode({"name": name, "network": network, "type": qtype, "client": client})
    answer = call(ctx, "GET", url("dns", "lookup") + f"?{query}")
    if as_json:
        emit(answer)
    else:
        click.echo(answer["text"])
    if dns_failed(answer):
        ctx.exit(EXIT_FAILED)


@dns.command("stats")
@click.pass_context
def dns_stats(ctx: click.Context) -> None:
    """Query counters, upstream health and latency, as JSON."""
    emit(call(ctx, "GET", url("dns", "stats")))


def main() -> None:
    cli(obj={})

"""The `plexus` command. Every subcommand except `agent` is a thin client of the agent's API."""

from __future__ import annotations

import json
import os
import socket as socketlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlencode

import click

from plexus.api.client import DEFAULT_SOCKET, ApiError, Client

F = TypeVar("F", bound=Callable[..., Any])


def _client(ctx: click.Context) -> Client:
    return Client(ctx.obj["socket"])


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"plexus: {message}", err=True)
    sys.exit(code)


def _call(ctx: click.Context, method: str, path: str, body: Any = None) -> Any:
    try:
        return _client(ctx).call(method, path, body)
    except ApiError as exc:
        _fail(exc.message, 2 if exc.kind == "invalid" else 1)


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


def _json_opt(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(fn)


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _command_words(
    ctx: click.Context, param: click.Parameter, words: tuple[str, ...]
) -> tuple[str, ...]:
    """COMMAND of `run` and `exec`, without a leading `--`: it ends plexus's options and is never
    the command's first word (no program is called `--`). click consumes a `--` only while it is
    still reading options; with allow_interspersed_args=False it stops at the first other word
    and passes the rest through, so in `plexus exec api -- ip addr` (NAME comes first) the `--`
    reaches COMMAND."""
    if words[:1] == ("--",):
        words = words[1:]
    if not words:
        raise click.MissingParameter(ctx=ctx, param=param)
    return words


def _command_argument(fn: F) -> F:
    """The COMMAND argument: every word from the first one that is not plexus's (options after it
    belong to the command, hence allow_interspersed_args=False on the command)."""
    return click.argument(
        "command", nargs=-1, required=True, callback=_command_words, metavar="[--] COMMAND..."
    )(fn)


@click.group()
@click.option(
    "--socket",
    envvar="PLEXUS_SOCKET",
    default=DEFAULT_SOCKET,
    show_default=True,
    help="the agent's API socket ($PLEXUS_SOCKET)",
)
@click.pass_context
def cli(ctx: click.Context, socket: str) -> None:
    """plexus: container networking for Linux."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket


@cli.command()
@click.option("--state-dir", default="/var/lib/plexus", show_default=True, type=click.Path())
@click.option(
    "--socket",
    "api_socket",
    default=None,
    help="serve the API on this unix socket, rather than plexus's --socket "
    f"(or $PLEXUS_SOCKET, or {DEFAULT_SOCKET})",
)
@click.option("--node", default=socketlib.gethostname(), show_default=True)
@click.option(
    "--store",
    "store_url",
    default="",
    help="datastore URL (default: SQLite in the state directory)",
)
@click.option(
    "--pool",
    default="10.89.0.0/16:24",
    show_default=True,
    help="IPv4 pool for automatic subnets, CIDR:PREFIXLEN",
)
@click.option(
    "--pool6",
    default="fd89:7c00::/48:64",
    show_default=True,
    help="IPv6 pool for automatic subnets, CIDR:PREFIXLEN",
)
@click.option("--reconcile-interval", default=10.0, show_default=True, type=float)
@click.option(
    "--dns-upstream",
    multiple=True,
    help="resolver for names plexus does not own, "
    "IP[:PORT] (repeatable; default: the host's resolv.conf)",
)
@click.option("--dns-domain", default="plexus.internal", show_default=True)
@click.option("--dns-ttl", default=5, show_default=True, type=int)
@click.option(
    "--dns-workers",
    default=1,
    show_default=True,
    type=int,
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
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def agent(
    ctx: click.Context,
    state_dir: str,
    api_socket: str | None,
    node: str,
    store_url: str,
    pool: str,
    pool6: str,
    reconcile_interval: float,
    dns_upstream: tuple[str, ...],
    dns_domain: str,
    dns_ttl: int,
    dns_workers: int,
    no_dns: bool,
    docker_api: str,
    docker_plugin_socket: str,
    verbose: bool,
) -> None:
    """Run the agent (the daemon) in the foreground."""
    from plexus.agent import daemon
    from plexus.config import AgentConfig
    from plexus.errors import PlexusError
    from plexus.model import parse

    def split(field: str, value: str) -> tuple[Any, int]:
        cidr, _, length = value.rpartition(":")
        if not length.isdigit():
            _fail(f"invalid {field} {value!r}: expected CIDR:PREFIXLEN", 2)
        return parse.cidr(field, cidr), int(length)

    try:
        p4, l4 = split("pool", pool)
        p6, l6 = split("pool6", pool6)
        config = AgentConfig(
            state_dir=Path(state_dir),
            # `plexus agent --socket` is where users look for it; the group's option (which also
            # reads $PLEXUS_SOCKET) is what every client command shares. The nearer one wins.
            socket=Path(api_socket if api_socket is not None else ctx.obj["socket"]),
            node=node,
            store_url=store_url,
            pool4=p4,
            pool4_prefix=l4,
            pool6=p6,
            pool6_prefix=l6,
            reconcile_interval=reconcile_interval,
            docker_plugin_socket=Path(docker_plugin_socket) if docker_plugin_socket else None,
            docker_api=Path(docker_api) if docker_api else None,
            dns=not no_dns,
            dns_domain=dns_domain,
            dns_ttl=dns_ttl,
            dns_upstreams=dns_upstream,
            dns_workers=dns_workers,
        )
        daemon.main(config, verbose)
    except PlexusError as exc:
        _fail(exc.message, 2 if exc.kind == "invalid" else 1)


@cli.command()
@_json_opt
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Is the agent up and ready?"""
    data = _call(ctx, "GET", "/v1/status")
    if as_json:
        _emit(data)
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
    _emit(_call(ctx, "POST", "/v1/reconcile"))


# -- networks ---------------------------------------------------------------------------------


@cli.group()
def network() -> None:
    """Create, list, inspect and remove networks."""


@network.command("create")
@click.argument("name")
@click.option("--driver", default="bridge", show_default=True)
@click.option("--subnet", multiple=True)
@click.option("--gateway", multiple=True)
@click.option("--ip-range", multiple=True)
@click.option("--ipv6", is_flag=True)
@click.option("--internal", is_flag=True)
@click.option("--mtu", type=int, default=1500, show_default=True)
@click.option("--label", multiple=True, help="KEY=VALUE")
@click.option("-o", "--opt", multiple=True, help="driver option KEY=VALUE (dns=false: no DNS)")
@click.option("--dns-upstream", multiple=True, help="this network's resolvers, IP[:PORT]")
@_json_opt
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
    as_json: bool,
) -> None:
    """Create a network."""
    net = _call(
        ctx,
        "POST",
        "/v1/networks",
        {
            "name": name,
            "driver": driver,
            "subnets": list(subnet),
            "gateways": list(gateway),
            "ip_ranges": list(ip_range),
            "ipv6": ipv6,
            "internal": internal,
            "mtu": mtu,
            "labels": _kv(label, "label"),
            "options": _kv(opt, "opt"),
            "dns_upstreams": list(dns_upstream),
        },
    )
    if as_json:
        _emit(net)
    else:
        click.echo(net["name"])


def _kv(items: Sequence[str], field: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"invalid {field} {item!r}: expected KEY=VALUE", 2)
        out[key] = value
    return out


@network.command("ls")
@_json_opt
@click.pass_context
def network_ls(ctx: click.Context, as_json: bool) -> None:
    """List networks."""
    nets = _call(ctx, "GET", "/v1/networks")
    if as_json:
        _emit(nets)
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
    _table(rows, ("NAME", "ID", "DRIVER", "SUBNETS", "FLAGS", "ENDPOINTS", "DOCKER"))


@network.command("inspect")
@click.argument("name")
@click.pass_context
def network_inspect(ctx: click.Context, name: str) -> None:
    """Show a network as JSON."""
    _emit(_call(ctx, "GET", f"/v1/networks/{name}"))


@network.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="detach its endpoints first")
@click.pass_context
def network_rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove networks."""
    for name in names:
        _call(ctx, "DELETE", f"/v1/networks/{name}" + ("?force=1" if force else ""))
        click.echo(name)


# -- containers -------------------------------------------------------------------------------


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="return at once (otherwise wait for exit)")
@click.option("--name", required=True)
@click.option("--network", "networks", multiple=True, required=True)
@click.option("--ip", "ips", multiple=True, help="static address (one per family)")
@click.option("-p", "--publish", multiple=True, help="[HOSTIP:]HPORT[-HPORT2]:CPORT[/tcp|udp]")
@click.option("--label", multiple=True, help="KEY=VALUE")
@click.option("--namespace", default="", help="the policy namespace of the container")
@click.option("--alias", "aliases", multiple=True, help="extra DNS name")
@_json_opt
@_command_argument
@click.pass_context
def run(
    ctx: click.Context,
    detach: bool,
    name: str,
    networks: tuple[str, ...],
    ips: tuple[str, ...],
    publish: tuple[str, ...],
    label: tuple[str, ...],
    namespace: str,
    aliases: tuple[str, ...],
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Start COMMAND as a lightweight container: its own network namespace."""
    c = _call(
        ctx,
        "POST",
        "/v1/containers",
        {
            "name": name,
            "command": list(command),
            "networks": list(networks),
            "ips": list(ips),
            "publish": list(publish),
            "labels": _kv(label, "label"),
            "namespace": namespace,
            "aliases": list(aliases),
        },
    )
    if as_json:
        _emit(c)
    else:
        click.echo(c["id"])
    if not detach:
        _wait(ctx, name)


def _wait(ctx: click.Context, name: str) -> None:
    while True:
        c = _call(ctx, "GET", f"/v1/containers/{name}")
        if c["state"] != "running":
            sys.exit(c["exit_code"] or 0)
        time.sleep(0.2)


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("name")
@_command_argument
@click.pass_context
def exec_(ctx: click.Context, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside container NAME's network namespace."""
    c = _call(ctx, "GET", f"/v1/containers/{name}")
    argv = list(command)
    if c["netns_name"]:
        argv = ["ip", "netns", "exec", c["netns_name"], *argv]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        _fail(f"cannot run {argv[0]}: {exc.strerror}", 127)


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="also exited containers")
@_json_opt
@click.pass_context
def ps(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List containers."""
    items = [c for c in _call(ctx, "GET", "/v1/containers") if show_all or c["state"] == "running"]
    if as_json:
        _emit(items)
        return
    rows = [
        (
            c["name"],
            c["id"][:12],
            c["state"],
            ",".join(c["networks"]),
            " ".join(a for e in c["endpoints"] for a in e["addresses"]),
            " ".join(c["ports"]),
        )
        for c in items
    ]
    _table(rows, ("NAME", "ID", "STATE", "NETWORKS", "ADDRESSES", "PORTS"))


@cli.command()
@click.argument("name")
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show a container as JSON."""
    _emit(_call(ctx, "GET", f"/v1/containers/{name}"))


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="kill it if it is running")
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove containers."""
    for name in names:
        _call(ctx, "DELETE", f"/v1/containers/{name}" + ("?force=1" if force else ""))
        click.echo(name)


# -- attachments of namespaces made by others -------------------------------------------------


@cli.command()
@click.option("--netns", required=True, help="path of the network namespace")
@click.option("--id", "container_id", required=True)
@click.option("--network", required=True)
@click.option("--ifname", default="", help="interface name in the namespace (default: next ethN)")
@click.option("--ip", "ips", multiple=True)
@click.option("-p", "--publish", multiple=True)
@click.option("--name", default="")
@click.option("--label", multiple=True, help="KEY=VALUE")
@click.option("--namespace", default="")
@_json_opt
@click.pass_context
def attach(
    ctx: click.Context,
    netns: str,
    container_id: str,
    network: str,
    ifname: str,
    ips: tuple[str, ...],
    publish: tuple[str, ...],
    name: str,
    label: tuple[str, ...],
    namespace: str,
    as_json: bool,
) -> None:
    """Wire an existing network namespace to a network."""
    ep = _call(
        ctx,
        "POST",
        "/v1/endpoints",
        {
            "container_id": container_id,
            "network": network,
            "netns": netns,
            "ifname": ifname,
            "ips": list(ips),
            "publish": list(publish),
            "name": name,
            "labels": _kv(label, "label"),
            "namespace": namespace,
        },
    )
    if as_json:
        _emit(ep)
    else:
        click.echo(f"{ep['ifname']} {' '.join(ep['addresses'])}")


@cli.command()
@click.option("--id", "container_id", required=True)
@click.option("--network", default="")
@click.option("--ifname", default="")
@click.pass_context
def detach(ctx: click.Context, container_id: str, network: str, ifname: str) -> None:
    """Undo an attach."""
    if not network and not ifname:
        _fail("detach needs --network or --ifname", 2)
    _call(
        ctx,
        "POST",
        "/v1/endpoints/detach",
        {"container_id": container_id, "network": network, "ifname": ifname},
    )


# -- dns ----------------------------------------------------------------------------------------


@cli.group()
def dns() -> None:
    """Ask the embedded DNS server."""


@dns.command("lookup")
@click.argument("name")
@click.option("--network", required=True, help="the network the question arrives on")
@click.option("--type", "qtype", default="A", show_default=True)
@click.option("--client", default="", help="the asking container's address")
@_json_opt
@click.pass_context
def dns_lookup(
    ctx: click.Context, name: str, network: str, qtype: str, client: str, as_json: bool
) -> None:
    """What the server answers for NAME on NETWORK, and why."""
    query = urlencode({"name": name, "network": network, "type": qtype, "client": client})
    answer = _call(ctx, "GET", f"/v1/dns/lookup?{query}")
    if as_json:
        _emit(answer)
    else:
        click.echo(answer["text"])


@dns.command("stats")
@click.pass_context
def dns_stats(ctx: click.Context) -> None:
    """Query counters, upstream health and latency, as JSON."""
    _emit(_call(ctx, "GET", "/v1/dns/stats"))


def main() -> None:
    cli(obj={})

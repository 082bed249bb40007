"""`plexus run, exec, logs, ps, inspect, rm, attach, detach`: containers, plexus's own
(`run`) and those other runtimes wired through the agent (`attach`, CNI, Docker)."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from plexus.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    F,
    call,
    client,
    copy_stream,
    emit,
    fail,
    for_each,
    json_opt,
    kv,
    table,
    url,
)


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


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True,
              help="run in the background and print its ID (otherwise print its output and "
              "exit with its exit code)")
@click.option("--name", required=True, help="the container's name (and DNS name)")
@click.option("--network", "networks", multiple=True, required=True,
              help="a network to attach it to (repeatable; the first one has the default route)")
@click.option("--ip", "ips", multiple=True, help="static address (one per family)")
@click.option("-p", "--publish", multiple=True,
              help="publish a port, [HOSTIP:]HPORT[-HPORT2]:CPORT[/tcp|udp] (repeatable)")
@click.option("--label", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("--namespace", default="", help="the policy namespace of the container")
@click.option("--alias", "aliases", multiple=True, help="extra DNS name (repeatable)")
@click.option("--expose", "exposes", multiple=True,
              help="a port it serves, [NAME=]PORT[/tcp|udp|sctp], named for policies "
                   "(repeatable)")
@json_opt
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
    exposes: tuple[str, ...],
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Start COMMAND as a lightweight container: its own network namespace."""
    c = call(ctx, "POST", url("containers"), {
        "name": name,
        "command": list(command),
        "networks": list(networks),
        "ips": list(ips),
        "publish": list(publish),
        "labels": kv(label, "label"),
        "namespace": namespace,
        "aliases": list(aliases),
        "expose": list(exposes),
    })
    if as_json:
        emit(c)
    elif detach:
        click.echo(c["id"])
    if not detach:
        _attach_to(ctx, c)


def _attach_to(ctx: click.Context, c: dict[str, Any]) -> None:
    """Foreground `run`, as `docker run`: the container's output as it prints it, then its exit
    code as ours."""
    try:
        copy_stream(ctx, url("containers", c["id"], "logs") + "?follow=1")
    except KeyboardInterrupt:
        fail(f"{c['name']} keeps running (`plexus rm -f {c['name']}` stops it)",
             EXIT_INTERRUPTED)
    done = _ended(ctx, c["id"], c["name"])
    if done["exit_code"] is None:
        fail(f"{c['name']} exited while no agent watched it: its exit code is unknown")
    sys.exit(done["exit_code"])


def _ended(ctx: click.Context, ref: str, name: str) -> dict[str, Any]:
    """The container after its followed log ended: the agent ends it once the exit is
    recorded, but also when it stops itself, which must not pass for an exit."""
    c: dict[str, Any] = call(ctx, "GET", url("containers", ref))
    if c["state"] == "running":
        fail(f"the agent stopped while {name} runs: `plexus logs -f {name}` follows it again")
    return c


@click.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True,
              help="then print what it prints until it exits (Ctrl-C stops following)")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool) -> None:
    """Print the output (stdout and stderr) of container NAME, a `plexus run` one."""
    try:
        copy_stream(ctx, url("containers", name, "logs") + ("?follow=1" if follow else ""))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    if follow:
        _ended(ctx, name, name)


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("name")
@_command_argument
@click.pass_context
def exec_(ctx: click.Context, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside container NAME's network namespace (NAME or ID, as `ps` lists it)."""
    c = call(ctx, "GET", url("containers", name))
    if c["state"] == "exited":
        fail(f"container {name!r} is not running (it exited with {c['exit_code']})")
    argv = list(command)
    if c["netns_name"]:
        # `ip netns exec` also binds the container's resolv.conf over /etc, as `run` does.
        argv = ["ip", "netns", "exec", c["netns_name"], *argv]
    elif c["netns"]:
        argv = ["nsenter", f"--net={c['netns']}", "--", *argv]
    elif not c.get("host_network"):
        fail(f"container {name!r} has no network namespace plexus knows of yet (its runtime "
             "has not joined it, e.g. a Docker endpoint before Join): nothing to exec in")
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        fail(f"cannot run {argv[0]}: {exc.strerror}",
             127 if isinstance(exc, FileNotFoundError) else 126)


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="also exited containers")
@json_opt
@click.pass_context
def ps(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List containers: plexus's own and those other runtimes attached."""
    items = [c for c in call(ctx, "GET", url("containers"))
             if show_all or c["state"] == "running"]
    if as_json:
        emit(items)
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
    table(rows, ("NAME", "ID", "STATE", "NETWORKS", "ADDRESSES", "PORTS"))


@click.command()
@click.argument("name")
@click.pass_context
def inspect(ctx: click.Context, name: str) -> None:
    """Show a container as JSON (NAME or ID, as `ps` lists it)."""
    emit(call(ctx, "GET", url("containers", name)))


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="kill it if it is running")
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...], force: bool) -> None:
    """Remove containers of `plexus run`, and their logs."""

    def remove(name: str) -> None:
        path = url("containers", name) + ("?force=1" if force else "")
        client(ctx).call("DELETE", path)
        click.echo(name)

    for_each(names, remove)


@click.command()
@click.option("--netns", required=True, help="path of the network namespace")
@click.option("--id", "container_id", required=True,
              help="the container's ID (what `detach --id` and `ps` name it by)")
@click.option("--network", required=True, help="the network to attach it to")
@click.option("--ifname", default="", help="interface name in the namespace (default: next ethN)")
@click.option("--ip", "ips", multiple=True, help="static address (one per family)")
@click.option("-p", "--publish", multiple=True,
              help="publish a port, [HOSTIP:]HPORT[-HPORT2]:CPORT[/tcp|udp] (repeatable)")
@click.option("--name", default="", help="the container's name (and DNS name)")
@click.option("--label", multiple=True, help="KEY=VALUE (repeatable)")
@click.option("--namespace", default="", help="the policy namespace of the container")
@click.option("--expose", "exposes", multiple=True,
              help="a port it serves, [NAME=]PORT[/tcp|udp|sctp] (repeatable)")
@json_opt
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
    exposes: tuple[str, ...],
    as_json: bool,
) -> None:
    """Wire an existing network namespace to a network."""
    ep = call(ctx, "POST", url("endpoints"), {
        "container_id": container_id,
        "network": network,
        "netns": netns,
        "ifname": ifname,
        "ips": list(ips),
        "publish": list(publish),
        "name": name,
        "labels": kv(label, "label"),
        "namespace": namespace,
        "expose": list(exposes),
    })
    if as_json:
        emit(ep)
    else:
        click.echo(f"{ep['ifname']} {' '.join(ep['addresses'])}")


@click.command()
@click.option("--id", "container_id", required=True, help="the ID given to `attach --id`")
@click.option("--network", default="", help="detach it from this network")
@click.option("--ifname", default="", help="detach this interface of it")
@click.pass_context
def detach(ctx: click.Context, container_id: str, network: str, ifname: str) -> None:
    """Undo an attach."""
    if not network and not ifname:
        fail("detach needs --network or --ifname", EXIT_INVALID)
    ep = call(ctx, "POST", url("endpoints", "detach"),
              {"container_id": container_id, "network": network, "ifname": ifname})
    click.echo(" ".join([ep["ifname"], *ep["addresses"], "detached from", ep["network"]]))


COMMANDS = (run, exec_, logs, ps, inspect, rm, attach, detach)

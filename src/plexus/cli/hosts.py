"""`plexus host`: the hosts of the datastore, and removing a dead one."""

from __future__ import annotations

import time

import click

from plexus.cli.common import call, emit, json_opt, table, url


@click.group("host")
def host() -> None:
    """List the hosts of the datastore; remove a dead one."""


def _ago(when: float) -> str:
    if not when:
        return "-"
    seconds = max(0, int(time.time() - when))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@host.command("ls")
@json_opt
@click.pass_context
def host_ls(ctx: click.Context, as_json: bool) -> None:
    """Hosts, liveness, underlay address, endpoints, address blocks in use / held."""
    hosts = call(ctx, "GET", url("hosts"))
    if as_json:
        emit(hosts)
        return
    table([[h["name"], "alive" if h["alive"] else "down", h["address"] or "-",
            str(h["endpoints"]), f"{h['blocks_used']}/{len(h['blocks'])}",
            _ago(h["seen"] if not h["alive"] else h["started"])]
           for h in hosts],
          ["NAME", "STATE", "ADDRESS", "ENDPOINTS", "BLOCKS", "SINCE"])


@host.command("rm")
@click.argument("name")
@click.pass_context
def host_rm(ctx: click.Context, name: str) -> None:
    """Forget a dead host: release its containers' addresses, ports and records."""
    done = call(ctx, "DELETE", url("hosts", name))
    click.echo(f"{name} (released {done['released']} endpoints)")


COMMANDS = [host]

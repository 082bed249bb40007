"""`plexus verify`: does the kernel do what the model says? The agent probes (it holds the
namespaces); this prints its report.

Exit codes, for scripts and monitors: 0 the kernel agrees with the model; 1 it does not; 2
invalid input; 3 it could not be verified (the agent unreachable or failing)."""

from __future__ import annotations

import sys
from typing import Any

import click

from plexus.api.client import ApiError
from plexus.cli.common import EXIT_FAILED, EXIT_INVALID, client, emit, json_opt, url

EXIT_UNVERIFIED = 3


@click.command("verify")
@click.option("--network", default="", help="only pairs with an end on this network")
@click.option("--timeout", type=float, default=1.0, show_default=True,
              help="seconds a probe waits for an answer")
@click.option("-v", "--verbose", is_flag=True, help="every probe, not only the disagreements")
@json_opt
@click.pass_context
def verify(ctx: click.Context, network: str, timeout: float, verbose: bool,
           as_json: bool) -> None:
    """Probe, with real packets from the containers' namespaces, which pairs and ports must
    connect and which must not; report where the kernel disagrees with the model (exit 1)."""
    try:
        found = client(ctx).call("POST", url("verify"),
                                 {"network": network, "timeout": timeout,
                                  "all": as_json or verbose})
    except ApiError as exc:
        click.echo(f"plexus: {exc.message}", err=True)
        sys.exit(EXIT_INVALID if exc.kind == "invalid" else EXIT_UNVERIFIED)
    if as_json:
        emit(found)
    else:
        _print(found, verbose)
    if not found["agrees"]:
        sys.exit(EXIT_FAILED)


def _print(found: dict[str, Any], verbose: bool) -> None:
    for p in found["probes"] if verbose else found["mismatches"]:
        click.echo(_line(p))
    c = found["counts"]
    verdict = "the kernel agrees with the model" if found["agrees"] else \
        f"{c['disagree']} DISAGREE with the model"
    click.echo(f"{found['node']}: {c['probes']} probes in {found['seconds']:g} s: {verdict}"
               f" ({c['agree']} agree, {c['undecided']} undecided)")
    for note in found["notes"]:
        click.echo(f"  note: {note}")


def _line(p: dict[str, Any]) -> str:
    mark = {True: "ok  ", False: "FAIL", None: "?   "}[p["agrees"]]
    to = f"{p['to']} ({p['address']}" + (f" -> :{p['container_port']}" if p["port"] !=
                                         p["container_port"] else "") + ")"
    seen = f"{p['observed']} ({p['outcome']}{', ' + p['detail'] if p['detail'] else ''})"
    why = f"; undecided: {p['undecided']}" if p["undecided"] else ""
    return (f"{mark} {p['from']} -> {to} {p['port']}/{p['protocol']}: expected {p['expected']}"
            f" ({p['reason']}), observed {seen}{why}")


COMMANDS = [verify]

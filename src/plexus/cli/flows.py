"""`plexus flows`: the agent's flow log, filtered, or followed as it comes (as `hubble
observe` does)."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlencode

import click

from plexus.api.client import ApiError
from plexus.cli.common import call, client, emit, exit_code, fail, json_opt, table, url

HEADERS = ["TIME", "SOURCE", "DESTINATION", "PROTO", "VERDICT", "REASON", "BYTES", "EVENT"]


def _end(side: dict[str, Any]) -> str:
    where = f"{side['address']}:{side['port']}" if side["port"] else side["address"]
    if side["name"]:
        ns = f"{side['namespace']}/" if side["namespace"] else ""
        return f"{ns}{side['name']} ({where})"
    return where


def _row(f: dict[str, Any]) -> list[str]:
    millis = int(f["time"] * 1000) % 1000
    stamp = time.strftime("%H:%M:%S", time.localtime(f["time"])) + f".{millis:03}"
    return [stamp, _end(f["src"]), _end(f["dst"]), f["proto"], f["verdict"],
            f["reason"] or "-", str(f["bytes"]) if f["event"] == "end" else "-", f["event"]]


@click.command("flows")
@click.option("-f", "--follow", is_flag=True, help="keep printing flows as they come")
@click.option("--from", "src", default="", metavar="NAME|IP", help="from this container")
@click.option("--to", "dst", default="", metavar="NAME|IP", help="to this container")
@click.option("--port", default="", metavar="N", help="to or from this port")
@click.option("--verdict", default="", metavar="forwarded|dropped|audit",
              help="only flows with this verdict (audit: a policy would have dropped it)")
@click.option("--since", default="", metavar="DURATION", help="e.g. 30s, 5m, 2h")
@click.option("--last", default=1000, show_default=True, type=click.IntRange(min=0),
              help="at most this many of the stored flows (0: all)")
@json_opt
@click.pass_context
def flows(ctx: click.Context, follow: bool, src: str, dst: str, port: str, verdict: str,
          since: str, last: int, as_json: bool) -> None:
    """Connections containers made or received, and packets policy dropped, with verdicts."""
    query = {k: v for k, v in (("from", src), ("to", dst), ("port", port),
                                ("verdict", verdict), ("since", since)) if v}
    query["limit"] = str(last)
    if not follow:
        data = call(ctx, "GET", f"{url('flows')}?{urlencode(query)}")
        if as_json:
            emit(data["flows"])
            return
        table([_row(f) for f in data["flows"]], HEADERS)
        return
    query["follow"] = "1"
    _follow(ctx, f"{url('flows')}?{urlencode(query)}", as_json)


def _follow(ctx: click.Context, path: str, as_json: bool) -> None:
    buffered = b""
    try:
        for chunk in client(ctx).stream(path):
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                if as_json:
                    click.echo(line.decode())
                else:
                    click.echo("  ".join(_row(json.loads(line))))
    except ApiError as exc:
        fail(exc.message, exit_code(exc.kind))
    except KeyboardInterrupt:
        pass


COMMANDS = [flows]

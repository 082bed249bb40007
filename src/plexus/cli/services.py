"""`plexus service` (stable VIPs and names in front of containers) and `plexus apply` (the one
entry point for manifests: Kubernetes Services and the policy kinds)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from plexus.cli.common import EXIT_INVALID, call, emit, fail, json_opt, table, url

NAMESPACE_HELP = "the service's namespace (default: default)"


@click.group("service")
def service() -> None:
    """Services: a stable VIP and name in front of the containers a selector matches."""


@service.command("create")
@click.argument("name")
@click.option("--network", required=True, help="the network of the service and its endpoints")
@click.option("--selector", "selectors", multiple=True, required=True,
              help="K=V: endpoints whose labels match every pair (repeatable)")
@click.option("--port", "ports", multiple=True, required=True,
              help="[PNAME:]PORT[:TARGETPORT][/tcp|udp]; TARGETPORT a number or an --expose "
              "name (repeatable)")
@click.option("--ip", "ips", multiple=True, help="the VIP, from the service range "
              "(default: picked; one per family)")
@click.option("--headless", is_flag=True, help="no VIP: the name resolves to the endpoints")
@click.option("--affinity", default="", help="client-ip: a client keeps its endpoint")
@click.option("--affinity-timeout", type=int, default=None,
              help="seconds a client's affinity lasts (default 10800)")
@click.option("--publish", multiple=True,
              help="[HOSTIP:]HOSTPORT:PORT[/proto]: service PORT on a host port of every host")
@click.option("--namespace", default="default", show_default=True, help=NAMESPACE_HELP)
@click.option("--health-tcp", type=int, default=0, help="readiness: a TCP connect to PORT")
@click.option("--health-cmd", default="", help="readiness: CMD run in the container exits 0")
@click.option("--health-interval", type=float, default=5.0, show_default=True,
              help="seconds between checks")
@click.option("--health-threshold", type=int, default=3, show_default=True,
              help="checks failed (or passed) in a row that change readiness")
@click.pass_context
def service_create(ctx: click.Context, name: str, network: str, selectors: tuple[str, ...],
                   ports: tuple[str, ...], ips: tuple[str, ...], headless: bool, affinity: str,
                   affinity_timeout: int | None, publish: tuple[str, ...], namespace: str,
                   health_tcp: int, health_cmd: str, health_interval: float,
                   health_threshold: int) -> None:
    """Create service NAME; prints its name and VIPs."""
    made = call(ctx, "POST", url("services"), {
        "name": name, "namespace": namespace, "network": network, "selector": list(selectors),
        "ports": list(ports), "ip": list(ips), "headless": headless, "affinity": affinity,
        "affinity_timeout": affinity_timeout, "publish": list(publish),
        "health_tcp": health_tcp, "health_cmd": health_cmd,
        "health_interval": health_interval, "health_threshold": health_threshold})
    click.echo(f"{made['name']} {_vips(made)}")


def _vips(s: dict[str, object]) -> str:
    found = s["vips"]
    assert isinstance(found, list)
    return ",".join(map(str, found)) or "headless"


@service.command("ls")
@click.option("--namespace", default="", help="only the services of this namespace")
@json_opt
@click.pass_context
def service_ls(ctx: click.Context, namespace: str, as_json: bool) -> None:
    """Services, their VIPs, ports and how many endpoints are ready."""
    found = call(ctx, "GET", url("services") + (f"?namespace={namespace}" if namespace else ""))
    if as_json:
        emit(found)
        return
    table([[s["namespace"], s["name"], s["network"], _vips(s), ",".join(s["ports"]),
            str(s["endpoints"]),
            ",".join(f"{k}={v}" for k, v in sorted(s["selector"].items())) or "-"]
           for s in found],
          ["NAMESPACE", "NAME", "NETWORK", "VIP", "PORTS", "ENDPOINTS", "SELECTOR"])


@service.command("inspect")
@click.argument("name")
@click.option("--namespace", default="default", show_default=True, help=NAMESPACE_HELP)
@click.pass_context
def service_inspect(ctx: click.Context, name: str, namespace: str) -> None:
    """Service NAME as JSON: VIPs, ports, endpoints and their readiness, unresolved ports."""
    emit(call(ctx, "GET", url("services", namespace, name)))


@service.command("rm")
@click.argument("name")
@click.option("--namespace", default="default", show_default=True, help=NAMESPACE_HELP)
@click.pass_context
def service_rm(ctx: click.Context, name: str, namespace: str) -> None:
    """Remove service NAME (its VIP goes back to the range)."""
    call(ctx, "DELETE", url("services", namespace, name))
    click.echo(name)


@click.command("apply")
@click.option("-f", "--filename", "path", required=True, help="a YAML or JSON file, or -")
@click.pass_context
def apply(ctx: click.Context, path: str) -> None:
    """Create or replace every Service and policy of a file (all of them, or none)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"invalid filename {path!r}: {exc.strerror}", EXIT_INVALID)
    for done in call(ctx, "POST", url("apply"), {"text": text, "source": path}):
        click.echo(done["line"])


COMMANDS = [service, apply]

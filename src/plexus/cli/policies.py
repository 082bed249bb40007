"""`plexus namespace`, `plexus label` and `plexus policy`: the objects network policy reads."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from plexus.cli.common import EXIT_INVALID, call, emit, fail, json_opt, table, url
from plexus.errors import InvalidArgument
from plexus.model import parse


def _changes(items: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    try:
        return parse.label_changes(items)
    except InvalidArgument as exc:
        fail(exc.message, EXIT_INVALID)


@click.group("namespace")
def namespace() -> None:
    """Policy namespaces: what NetworkPolicy's namespaceSelector matches."""


@namespace.command("create")
@click.argument("name")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE (repeatable)")
@click.pass_context
def namespace_create(ctx: click.Context, name: str, labels: tuple[str, ...]) -> None:
    """Create namespace NAME (it carries kubernetes.io/metadata.name=NAME itself)."""
    put, drop = _changes(labels) if labels else ({}, [])
    if drop:
        fail(f"invalid label {drop[0]}-: nothing to remove from a new namespace", EXIT_INVALID)
    call(ctx, "POST", url("namespaces"), {"name": name, "labels": put})
    click.echo(name)


@namespace.command("label")
@click.argument("name")
@click.argument("changes", nargs=-1, required=True)
@click.pass_context
def namespace_label(ctx: click.Context, name: str, changes: tuple[str, ...]) -> None:
    """Set (K=V) or remove (K-) labels of namespace NAME."""
    put, drop = _changes(changes)
    ns = call(ctx, "PATCH", url("namespaces", name), {"set": put, "remove": drop})
    click.echo(f"{name} {_labels(ns['labels'])}")


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


@namespace.command("ls")
@json_opt
@click.pass_context
def namespace_ls(ctx: click.Context, as_json: bool) -> None:
    """Namespaces, their labels, and what is in them."""
    found = call(ctx, "GET", url("namespaces"))
    if as_json:
        emit(found)
        return
    table([[n["name"], str(n["endpoints"]), str(n["policies"]), _labels(n["labels"])]
           for n in found], ["NAME", "ENDPOINTS", "POLICIES", "LABELS"])


@namespace.command("rm")
@click.argument("name")
@click.pass_context
def namespace_rm(ctx: click.Context, name: str) -> None:
    """Remove namespace NAME and its policies (refused while containers are in it)."""
    done = call(ctx, "DELETE", url("namespaces", name))
    click.echo(name + (f" (and policies {', '.join(done['policies'])})" if done["policies"]
                       else ""))


@click.command("label")
@click.argument("name")
@click.argument("changes", nargs=-1, required=True)
@click.pass_context
def label(ctx: click.Context, name: str, changes: tuple[str, ...]) -> None:
    """Set (K=V) or remove (K-) labels of running container NAME; policies follow at once."""
    put, drop = _changes(changes)
    done = call(ctx, "PATCH", url("containers", name, "labels"), {"set": put, "remove": drop})
    click.echo(f"{name} {_labels(done['labels'])}")


@click.group("policy")
def policy() -> None:
    """Network policies: Kubernetes NetworkPolicy, CiliumNetworkPolicy, admin tiers."""


@policy.command("apply")
@click.option("-f", "--filename", "path", required=True, help="a YAML or JSON file, or -")
@click.pass_context
def policy_apply(ctx: click.Context, path: str) -> None:
    """Create or replace every policy of a file (all of them, or none if one is wrong)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"invalid filename {path!r}: {exc.strerror}", EXIT_INVALID)
    applied = call(ctx, "POST", url("policies"), {"text": text, "source": path})
    for a in applied:
        click.echo(f"{a['kind']} {a['ref']} {a['outcome']}")


@policy.command("ls")
@click.option("--namespace", default="", help="only the policies of this namespace")
@json_opt
@click.pass_context
def policy_ls(ctx: click.Context, namespace: str, as_json: bool) -> None:
    """Policies in evaluation order: admin tier, namespaced, baseline."""
    found = call(ctx, "GET", url("policies") + (f"?namespace={namespace}" if namespace else ""))
    if as_json:
        emit(found)
        return
    table([[p["ref"], p["kind"], p["tier"] + (f" {p['priority']}" if p["tier"] == "admin" else ""),
            "/".join(p["types"]) or "-", p["selects"], "audit" if p["audit"] else "enforce",
            str(p["packets"]["allow"]), str(p["packets"]["deny"] or p["packets"]["audit"])]
           for p in found],
          ["POLICY", "KIND", "TIER", "ISOLATES", "SELECTS", "MODE", "ALLOWED", "DROPPED"])


@policy.command("get")
@click.argument("ref")
@click.pass_context
def policy_get(ctx: click.Context, ref: str) -> None:
    """The document of policy NS/NAME (NAME for a cluster-wide one), as it was applied."""
    docs = call(ctx, "GET", url("policies", *ref.split("/")))
    click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


@policy.command("delete")
@click.argument("refs", nargs=-1)
@click.option("--all", "every", is_flag=True, help="every policy")
@click.pass_context
def policy_delete(ctx: click.Context, refs: tuple[str, ...], every: bool) -> None:
    """Delete policies NS/NAME... (NAME for a cluster-wide one), or --all."""
    if bool(refs) == every:
        fail("policy delete needs NS/NAME... or --all (not both)", EXIT_INVALID)
    gone = call(ctx, "POST", url("policies", "delete"), {"refs": list(refs), "all": every})
    for p in gone:
        click.echo(f"{p['kind']} {p['ref']} deleted")


@policy.command("explain")
@click.option("--from", "src", required=True, help="a container's name or an address")
@click.option("--to", "dst", required=True, help="a container's name or an address")
@click.option("--port", required=True, help="PORT/PROTO, e.g. 80/tcp")
@json_opt
@click.pass_context
def policy_explain(ctx: click.Context, src: str, dst: str, port: str, as_json: bool) -> None:
    """The verdict on a connection, and every policy and rule that decided it, in order."""
    v = call(ctx, "POST", url("policies", "explain"), {"from": src, "to": dst, "port": port})
    if as_json:
        emit(v)
        return
    click.echo(f"{v['from']} -> {v['to']} {v['port']}: {v['verdict'].upper()}")
    for s in v["steps"]:
        audit = " (audit)" if s["audit"] else ""
        click.echo(f"  {s['direction']:7} {s['tier']:10} {s['effect']:5} "
                   f"{s['policy'] or '-'} {s['rule']}{audit}")
    if not v["steps"]:
        click.echo("  no policy selects either end: allowed")
    for s in v["audit"]:
        click.echo(f"  audit: {s['policy']} {s['rule']} would have dropped it ({s['direction']})")


COMMANDS = [namespace, label, policy]

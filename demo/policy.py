"""The demo's network-policy act, on the single-host world: api and db on the backend network,
and a batch job beside them. A NetworkPolicy lets only the api reach the db on port 80; real
traffic shows it, `plexus policy explain` says which rule decided, `plexus policy ls` counts
the drops, a label change moves the batch job into the policy at once, and deleting the policy
opens the way again."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from demo.acts import Check
from tests.harness.probes import ANSWERED, DROPPED, tcp_probe
from tests.harness.world import World

POLICY = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-api, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 80}]
"""


def policy_act(world: World, workdir: Path, console: Console) -> list[Check]:
    a = world.agents["host1"]
    out: list[Check] = []
    a.run_echo("batch", "backend")
    a.wait_listening("batch")
    a.cli("label", "db", "app=db")
    a.cli("label", "api", "app=api")
    path = workdir / "db-from-api.yaml"
    path.write_text(POLICY)
    started = time.perf_counter()
    a.cli("policy", "apply", "-f", str(path))
    console.print(f"  plexus policy apply (in force when it returns) "
                  f"{1000 * (time.perf_counter() - started):.1f} ms")
    db = a.address("db", "backend")
    got = tcp_probe(a.netns("api"), db, 80, 1.0)
    out.append(Check("api → db:80 (allowed by db-from-api)", "answer",
                     str(got), got.outcome is ANSWERED))
    got = tcp_probe(a.netns("batch"), db, 80, 1.0)
    out.append(Check("batch → db:80 (not selected as a peer)", "dropped",
                     str(got), got.outcome is DROPPED))
    why = a.cli("policy", "explain", "--from", "batch", "--to", "db", "--port", "80/tcp").stdout
    out.append(Check("policy explain batch → db", "DENIED, isolated by default/db-from-api",
                     " ".join(why.split())[:90], "DENIED" in why and "db-from-api" in why))
    counts = {p["ref"]: p["packets"] for p in a.json("policy", "ls")}
    dropped = counts.get("default/db-from-api", {}).get("deny", 0)
    out.append(Check("policy ls counts the drop", ">= 1 dropped", f"{dropped} dropped",
                     dropped >= 1))
    a.cli("label", "batch", "app=api")
    got = tcp_probe(a.netns("batch"), db, 80, 1.0)
    out.append(Check("plexus label batch app=api: batch → db at once", "answer",
                     str(got), got.outcome is ANSWERED))
    a.cli("policy", "delete", "default/db-from-api")
    a.cli("label", "batch", "app-")
    got = tcp_probe(a.netns("batch"), db, 80, 1.0)
    out.append(Check("policy deleted: batch (app label gone) → db", "answer",
                     str(got), got.outcome is ANSWERED))
    a.cli("rm", "-f", "batch")
    return out

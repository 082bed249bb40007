"""Namespaces, labels and policies through the `plexus` command exactly as issue 10 spells it,
against a sandboxed agent: what is stored, what each verb prints, and explain's verdicts. (The
kernel's enforcement is tested with traffic once the compiler lands.)"""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness.world import Agent

WEB = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: front}}}]
    ports: [{port: http}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: watch
  namespace: shop
  annotations: {plexus.io/audit: "true"}
spec:
  endpointSelector: {}
  ingressDeny: [{fromEntities: [world]}]
"""


def test_namespaces_are_created_labelled_listed_and_removed(agent: Agent) -> None:
    agent.cli("namespace", "create", "shop", "--label", "team=back")
    agent.cli("namespace", "label", "shop", "tier=1", "team-")
    found = {n["name"]: n for n in agent.json("namespace", "ls")}
    assert found["shop"]["labels"] == {"tier": "1", "kubernetes.io/metadata.name": "shop"}
    assert "default" in found
    again = agent.cli("namespace", "create", "shop", check=False)
    assert again.returncode != 0 and "shop already exists" in again.stderr
    bad = agent.cli("namespace", "label", "shop", "kubernetes.io/metadata.name=x", check=False)
    assert bad.returncode == 2 and "kubernetes.io/metadata.name" in bad.stderr
    assert agent.cli("namespace", "rm", "shop").returncode == 0
    assert "shop" not in {n["name"] for n in agent.json("namespace", "ls")}


def test_run_in_a_namespace_creates_it_and_label_changes_a_running_container(
        agent: Agent) -> None:
    agent.cli("network", "create", "net")
    agent.run_echo("api", "net", "--namespace", "shop", "--label", "app=api",
                   "--expose", "http=80", "--expose", "81/udp")
    ns = {n["name"]: n for n in agent.json("namespace", "ls")}
    assert ns["shop"]["endpoints"] == 1
    [ep] = agent.container("api")["endpoints"]
    assert ep["namespace"] == "shop" and ep["exposes"] == ["http=80/tcp", "81/udp"]
    out = agent.cli("label", "api", "tier=gold", "app-").stdout
    assert out.strip() == "api tier=gold"
    [ep] = agent.container("api")["endpoints"]
    assert ep["labels"] == {"tier": "gold"}
    busy = agent.cli("namespace", "rm", "shop", check=False)
    assert busy.returncode != 0 and "has 1 endpoint" in busy.stderr


def test_apply_ls_get_explain_delete(agent: Agent, tmp_path: Path) -> None:
    agent.cli("network", "create", "net")
    agent.cli("namespace", "create", "front", "--label", "team=front")
    agent.run_echo("api", "net", "--namespace", "shop", "--label", "app=api", "--expose",
                   "http=80")
    agent.run_echo("ui", "net", "--namespace", "front")
    agent.run_echo("batch", "net")
    path = tmp_path / "p.yaml"
    path.write_text(WEB)
    assert agent.cli("policy", "apply", "-f", str(path)).stdout.splitlines() == [
        "NetworkPolicy shop/web created", "CiliumNetworkPolicy shop/watch created"]
    assert "unchanged" in agent.cli("policy", "apply", "-f", str(path)).stdout
    listed = agent.json("policy", "ls", "--namespace", "shop")
    assert [(p["ref"], p["audit"]) for p in listed] == [("shop/watch", True),
                                                       ("shop/web", False)]
    got = agent.cli("policy", "get", "shop/web").stdout
    assert "podSelector" in got and "app: api" in got

    ok = agent.json("policy", "explain", "--from", "ui", "--to", "api", "--port", "80/tcp")
    assert ok["verdict"] == "allowed"
    assert [(s["policy"], s["rule"]) for s in ok["steps"]] == [
        ("NetworkPolicy shop/web", "ingress[0]")]
    no = agent.json("policy", "explain", "--from", "batch", "--to", "api", "--port", "80/tcp")
    assert no["verdict"] == "denied"
    wrong_port = agent.cli("policy", "explain", "--from", "ui", "--to", "api",
                           "--port", "81/tcp").stdout
    assert "DENIED" in wrong_port and "isolated, no rule allows" in wrong_port
    outside = agent.json("policy", "explain", "--from", "192.0.2.7", "--to", "api",
                         "--port", "80/tcp")
    assert outside["verdict"] == "denied"

    gone = agent.cli("policy", "delete", "shop/web").stdout
    assert gone.strip() == "NetworkPolicy shop/web deleted"
    assert agent.json("policy", "explain", "--from", "batch", "--to", "api",
                      "--port", "80/tcp")["verdict"] == "allowed"
    agent.cli("policy", "delete", "--all")
    assert agent.json("policy", "ls") == []


def test_a_bad_file_applies_nothing_and_says_where(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(WEB + "---\n" + WEB.split("---")[0].replace("name: web", "name: w2")
                    .replace("port: http", "port: 80, endPort: 70"))
    r = agent.cli("policy", "apply", "-f", str(path), check=False)
    assert r.returncode == 2
    assert r.stderr.strip().endswith(
        "document 3 (NetworkPolicy shop/w2): invalid spec.ingress[0].ports[0].endPort 70: "
        "below port 80"), r.stderr
    assert json.loads(agent.cli("policy", "ls", "--json").stdout) == []
    assert "shop" not in {n["name"] for n in agent.json("namespace", "ls")}

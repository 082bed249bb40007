"""Services through the `plexus` command exactly as issue 11 spells it, against a sandboxed
agent: what each verb prints and stores, names resolved by glibc inside a container, bad input,
and VIPs kept across an agent restart; a failing readiness check seen by traffic. (The
traffic tests proper: test_service_traffic.py and test_lb_dataplane.py.)"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.harness.cluster import cluster
from tests.harness.probes import ANSWERED, netns_path, tcp_probe, wait_for_answer
from tests.harness.world import ECHO, Agent, World, sh

from .helpers import store_rows, wait_until
from .service_probes import backends

SUBNET = "10.80.0.0/24"


def getent(agent: Agent, container: str, name: str) -> list[str]:
    """glibc's resolver inside the container, reading the resolv.conf plexus wrote."""
    ns = agent.container(container)["netns_name"]
    r = sh("ip", "netns", "exec", ns, "getent", "ahostsv4", name, check=False)
    return sorted({line.split()[0] for line in r.stdout.splitlines()})


def two_webs(agent: Agent) -> None:
    agent.cli("network", "create", "net", "--subnet", SUBNET)
    for name in ("web1", "web2"):
        agent.run_echo(name, "net", "--label", "app=web", "--expose", "http=80")
    agent.run_echo("client", "net", "--label", "app=client")


def test_create_ls_inspect_rm(agent: Agent) -> None:
    two_webs(agent)
    out = agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
                    "--port", "http:80:http", "--port", "raw:81:80/udp", "--affinity",
                    "client-ip", "--affinity-timeout", "60", "--publish", "8080:80").stdout
    name, vip = out.split()
    assert name == "web"
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("10.96.0.0/12")
    [listed] = agent.json("service", "ls")
    assert (listed["vips"], listed["endpoints"], listed["ports"], listed["publish"]) == (
        [vip], 2, ["http:80:http/tcp", "raw:81:80/udp"], ["8080:80/tcp"])
    table = agent.cli("service", "ls").stdout.splitlines()
    assert table[0].split()[:4] == ["NAMESPACE", "NAME", "NETWORK", "VIP"]
    assert table[1].split()[:4] == ["default", "web", "net", vip]
    seen = json.loads(agent.cli("service", "inspect", "web").stdout)
    assert sorted(e["container"] for e in seen["endpoints"]) == ["web1", "web2"]
    assert all(e["ready"] and e["targets"]["http:80:http/tcp"] == 80 for e in seen["endpoints"])
    assert (seen["affinity"], seen["affinity_timeout"], seen["unresolved"]) == (
        "client-ip", 60, [])
    assert agent.cli("service", "rm", "web").stdout.strip() == "web"
    assert agent.json("service", "ls") == []
    # its VIP went back to the range: asking for it again works
    agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
              "--port", "80", "--ip", vip)


def test_endpoints_follow_labels_and_unresolved_names_are_reported(agent: Agent) -> None:
    two_webs(agent)
    agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
              "--port", "80:admin")
    seen = json.loads(agent.cli("service", "inspect", "web").stdout)
    assert seen["unresolved"] == ["80:admin/tcp"]
    agent.cli("label", "web2", "app=other")
    [listed] = agent.json("service", "ls")
    assert listed["endpoints"] == 1
    agent.cli("rm", "-f", "web1")
    [listed] = agent.json("service", "ls")
    assert listed["endpoints"] == 0
    # a container whose process exits leaves the service (its endpoint stays until rm)
    agent.cli("run", "-d", "--name", "brief", "--network", "net", "--label", "app=web", "--",
              "sleep", "1")
    assert ready_count(agent, 0) == 0  # after its second
    seen = json.loads(agent.cli("service", "inspect", "web").stdout)
    assert [(e["container"], e["health"]) for e in seen["endpoints"]] == [
        ("brief", "container exited")]


def test_names_resolve_to_the_vip_and_headless_to_the_endpoints(agent: Agent) -> None:
    two_webs(agent)
    vip = agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
                    "--port", "80", "--namespace", "default").stdout.split()[1]
    agent.cli("service", "create", "peers", "--network", "net", "--selector", "app=web",
              "--port", "80", "--headless")
    for name in ("web", "web.default", "web.default.svc.plexus.internal"):
        assert getent(agent, "client", name) == [vip], name
    pods = sorted(agent.address(n) for n in ("web1", "web2"))
    assert getent(agent, "client", "peers.default.svc.plexus.internal") == pods
    agent.cli("rm", "-f", "web2")
    assert getent(agent, "client", "peers") == [agent.address("web1")]
    lookup = agent.cli("dns", "lookup", "web.default", "--network", "net").stdout
    assert vip in lookup


def test_bad_input_is_one_line_and_makes_nothing(agent: Agent) -> None:
    two_webs(agent)
    base = ["service", "create", "web", "--network", "net", "--selector", "app=web"]
    agent.cli(*base, "--port", "80", "--ip", "10.96.0.10")
    cases = [
        (["--port", "80/sctp"], "invalid port '80/sctp'"),
        (["--port", "http:x:y:z"], "invalid port 'http:x:y:z'"),
        (["--port", "80", "--ip", "10.96.0.10"], "invalid ip '10.96.0.10': taken by service"),
        (["--port", "80", "--ip", "192.0.2.1"], "invalid ip '192.0.2.1': outside the service"),
        (["--port", "80", "--selector", "app"], "invalid selector 'app'"),
        (["--port", "80", "--publish", "8080"], "invalid publish '8080'"),
    ]
    for extra, message in cases:
        argv = [*base[:2], "other", *base[3:], *extra]
        r = agent.cli(*argv, check=False)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr)
        assert r.stderr.count("\n") == 1
    dup = agent.cli(*base, "--port", "81", check=False)
    assert dup.returncode == 1 and "service web already exists in namespace default" in dup.stderr
    assert [s["name"] for s in agent.json("service", "ls")] == ["web"]


SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, annotations: {plexus.io/network: net}}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec: {podSelector: {matchLabels: {app: api}}, ingress: [{}]}
"""


def test_apply_takes_services_and_policies(agent: Agent, tmp_path: Path) -> None:
    agent.cli("network", "create", "net", "--subnet", SUBNET)
    agent.run_echo("api", "net", "--namespace", "shop", "--label", "app=api",
                   "--expose", "http=8080")
    path = tmp_path / "m.yaml"
    path.write_text(SERVICE)
    assert agent.cli("apply", "-f", str(path)).stdout.splitlines() == [
        "NetworkPolicy shop/web created", "Service shop/api created"]
    seen = json.loads(agent.cli("service", "inspect", "api", "--namespace", "shop").stdout)
    assert [e["targets"]["http:80:http/tcp"] for e in seen["endpoints"]] == [8080]
    assert (seen["affinity"], seen["affinity_timeout"], seen["origin"]) == (
        "client-ip", 30, "manifest")
    wrong = tmp_path / "bad.yaml"
    wrong.write_text(SERVICE.replace("port: 80", "port: 0").replace("name: api", "name: b"))
    bad = agent.cli("apply", "-f", str(wrong), check=False)
    assert bad.returncode == 2 and "spec.ports[0].port" in bad.stderr
    assert [s["name"] for s in agent.json("service", "ls")] == ["api"]


def test_vips_and_the_range_survive_a_restart(agent: Agent) -> None:
    agent.cli("network", "create", "net", "--subnet", SUBNET)
    vip = agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
                    "--port", "80").stdout.split()[1]
    agent.kill(signal.SIGTERM)
    agent.start()
    [listed] = agent.json("service", "ls")
    assert listed["vips"] == [vip]
    agent.kill(signal.SIGTERM)
    agent.start(extra=["--service-cidr", "10.200.0.0/24"])
    other = agent.cli("service", "create", "db", "--network", "net", "--selector", "app=db",
                      "--port", "5432").stdout.split()[1]
    assert ipaddress.ip_address(other) in ipaddress.ip_network("10.200.0.0/24")
    assert agent.json("service", "ls")[1]["vips"] == [vip]  # kept its VIP


def ready_count(agent: Agent, want: int, name: str = "web", timeout: float = 15) -> int:
    """The ready endpoints of service ``name`` once they are ``want`` (or the time is up)."""
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        count = {s["name"]: s["endpoints"] for s in agent.json("service", "ls")}[name]
        if count == want:
            break
        time.sleep(0.1)
    return int(count)


def test_readiness_checks_take_failing_containers_out_and_put_them_back(
        agent: Agent, tmp_path: Path) -> None:
    two_webs(agent)
    flag = tmp_path / "web-healthy"
    flag.touch()
    agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
              "--port", "80", "--health-cmd", f"test -e {flag}", "--health-interval", "0.2",
              "--health-threshold", "2")
    assert ready_count(agent, 2) == 2
    flag.unlink()
    assert ready_count(agent, 0) == 0
    seen = json.loads(agent.cli("service", "inspect", "web").stdout)
    assert {e["health"] for e in seen["endpoints"]} == {"failing its readiness check"}
    assert seen["health"] == {"tcp": None, "cmd": f"test -e {flag}", "interval": 0.2,
                              "threshold": 2}
    flag.touch()
    assert ready_count(agent, 2) == 2
    # a TCP check on a port nobody serves fails; on the echo servers' port 80 it passes
    agent.cli("service", "create", "tcp", "--network", "net", "--selector", "app=web",
              "--port", "80", "--health-tcp", "81", "--health-interval", "0.2")
    agent.cli("service", "create", "ok", "--network", "net", "--selector", "app=web",
              "--port", "80", "--health-tcp", "80", "--health-interval", "0.2")
    assert ready_count(agent, 0, "tcp") == 0
    counts = {s["name"]: s["endpoints"] for s in agent.json("service", "ls")}
    assert counts == {"ok": 2, "tcp": 0, "web": 2}


def test_two_hosts_on_etcd_share_the_range_the_services_and_their_names(
        world: World, tmp_path: Path) -> None:
    with cluster(world, tmp_path, ["host1", "host2"]) as (_, (a, b)):
        a.cli("network", "create", "ov", "--driver", "overlay", "--subnet", "10.78.0.0/24",
              "--block-size", "28")
        assert wait_until(lambda: "ov" in {n["name"] for n in b.json("network", "ls")},
                          timeout=20)
        b.run_echo("web", "ov", "--label", "app=web")
        b.run_echo("client", "ov")
        vips: list[str] = []
        for i in range(4):  # from both hosts in turn: one range, never one VIP twice
            who = (a, b)[i % 2]
            vips.append(who.cli("service", "create", f"s{i}", "--network", "ov", "--selector",
                                "app=web", "--port", "80").stdout.split()[1])
        assert len(set(vips)) == 4
        ranges = {ipaddress.ip_network(f"{v}/16", strict=False) for v in vips}
        assert len(ranges) == 1  # every host hands out VIPs from the one stored range
        assert wait_until(lambda: len(b.json("service", "ls")) == 4, timeout=20)
        # made on host1, its endpoint (on host2) counted and its name resolved on host2
        assert wait_until(lambda: getent(b, "client", "s0.default") == [vips[0]], timeout=20)
        [s0] = [s for s in a.json("service", "ls") if s["name"] == "s0"]
        assert s0["endpoints"] == 1


def test_a_failing_check_takes_the_backend_out_of_the_traffic_within_interval_x_threshold(
        agent: Agent) -> None:
    """Observed by traffic: web2 keeps serving port 80 (a direct connection still gets in), but
    once its health port stops answering, connections to the VIP stop landing on it within
    interval x threshold (plus one interval until the first failed check, and a generous
    margin for the watch and the kernel: the bound is a deadline, not a measurement)."""
    two_webs(agent)
    ns = {name: agent.netns(name) for name in ("web1", "web2", "client")}
    health = {name: _health_listener(ns[name], name) for name in ("web1", "web2")}
    try:
        interval, threshold = 0.3, 3
        vip = agent.cli("service", "create", "web", "--network", "net", "--selector",
                        "app=web", "--port", "80", "--health-tcp", "81", "--health-interval",
                        str(interval), "--health-threshold", str(threshold)).stdout.split()[1]
        agent.wait_listening("web1")
        agent.wait_listening("web2")
        assert set(backends(ns["client"], vip, 30)) == {"web1", "web2"}  # the control
        health.pop("web2").kill()
        bound = interval * (threshold + 1) + MARGIN
        deadline = time.monotonic() + bound
        while set(backends(ns["client"], vip, 20)) != {"web1"}:
            assert time.monotonic() < deadline, f"web2 still served after {bound} s"
        assert set(backends(ns["client"], vip, 40)) == {"web1"}  # and stays out
        assert tcp_probe(ns["client"], agent.address("web2"), 80).outcome is ANSWERED
        health["web2"] = _health_listener(ns["web2"], "web2")  # passes again: back in
        assert wait_until(lambda: set(backends(ns["client"], vip, 20)) == {"web1", "web2"},
                          timeout=bound)
    finally:
        for proc in health.values():
            proc.kill()
            proc.wait(timeout=5)


MARGIN = 5.0  # seconds beyond interval x (threshold + 1): watch, reconcile, a loaded 2-core VM


def _health_listener(ns: str, name: str) -> subprocess.Popen[bytes]:
    """A second server in the container's namespace, on the health port 81 only, so that the
    check can fail while port 80 still serves."""
    proc = subprocess.Popen(["nsenter", f"--net={netns_path(ns)}", "--", sys.executable, ECHO,
                             f"{name}-health", "81"], start_new_session=True)
    assert wait_for_answer(lambda: tcp_probe(ns, "127.0.0.1", 81, 0.5), 10), name
    return proc


def test_the_default_range_is_chosen_by_the_first_service_not_by_the_agent(
        agent: Agent) -> None:
    """An agent that never gets a service reserves nothing: a network may take 10.96.0.0/16
    (the first default candidate), and the first service's VIP then comes from the next one."""
    assert store_rows(agent.state_dir, "/plexus/meta/service-range") == {}
    agent.cli("network", "create", "net", "--subnet", "10.96.0.0/16")
    assert store_rows(agent.state_dir, "/plexus/meta/service-range") == {}
    vip = agent.cli("service", "create", "web", "--network", "net", "--selector", "app=web",
                    "--port", "80").stdout.split()[1]
    assert ipaddress.ip_address(vip) in ipaddress.ip_network("10.97.0.0/16")
    assert store_rows(agent.state_dir, "/plexus/meta/service-range") == {
        "/plexus/meta/service-range": "10.97.0.0/16,fd00:10:96::/112"}
    r = agent.cli("network", "create", "late", "--subnet", "10.97.1.0/24", check=False)
    assert r.returncode != 0 and "the service range" in r.stderr  # now it is taken

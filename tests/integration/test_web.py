"""The agent's web view in a real browser: Debian's headless chromium, in the simulated host's
namespace where the listener is, loads the page; the DOM shows the containers with their front
doors, the network's IPAM, the service and the policy; then real connections between containers
(one forwarded, one dropped by the policy) appear as flow rows without a reload. A screenshot is
kept in the test's tmp dir. Also: an unknown path is a 404 and the agent goes on serving."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexus.cni.install import install
from tests.harness.chromium import Browser, available
from tests.harness.cni import exec_plugin
from tests.harness.probes import ANSWERED, DROPPED, tcp_probe
from tests.harness.prometheus import http_get
from tests.harness.world import Agent, World

pytestmark = pytest.mark.privileged
PORT = 9100
URL = f"http://127.0.0.1:{PORT}/"
LOCK = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lock, namespace: default}
spec:
  podSelector: {matchLabels: {role: locked}}
  policyTypes: [Ingress]
"""


@pytest.fixture
def lab(world: World, tmp_path: Path) -> Iterator[Agent]:
    """host1 with the listener on its loopback; on network front: web and client (plexus
    containers), locked (behind a deny-all policy), pod (attached through the CNI plugin); a
    service selecting web."""
    agent = world.add_host("host1", start_agent=False)
    agent.start(extra=["--metrics-address", f":{PORT}"])
    agent.cli("network", "create", "front", "--subnet", "10.81.0.0/24")
    agent.run_echo("web", "front", "--label", "app=web", "-p", "8080:80")
    agent.run_echo("client", "front")
    agent.run_echo("locked", "front", "--label", "role=locked")
    for name in ("web", "locked"):
        agent.wait_listening(name)
    policy = tmp_path / "lock.yaml"
    policy.write_text(LOCK)
    agent.cli("policy", "apply", "-f", str(policy))
    agent.cli("service", "create", "websvc", "--network", "front", "--selector", "app=web",
              "--port", "80")
    bindir = tmp_path / "cni-bin"
    install([str(bindir)])
    world.add_ns("pod")
    added = exec_plugin(bindir / "plexus", "ADD",
                        {"cniVersion": "1.0.0", "name": "front", "type": "plexus",
                         "socket": str(agent.socket)},
                        container_id="pod1", netns="/run/netns/pod", in_netns="/run/netns/host1",
                        path=str(bindir))
    assert added.ok, added.stdout
    yield agent


def _rows(browser: Browser, selector: str) -> int:
    return int(browser.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length"))


@pytest.mark.timeout(150)
def test_the_page_shows_the_model_and_flows_arrive_without_a_reload(
        lab: Agent, tmp_path: Path) -> None:
    if not available():
        pytest.skip("Debian's chromium is not installed (make deps)")
    agent = lab
    browser = Browser(tmp_path / "chromium", agent.host)
    try:
        browser.start()
        browser.open(URL)
        # The map: every container under its network on host1, with its front door.
        doors = browser.wait_for(
            "Object.fromEntries([...document.querySelectorAll("
            "'.host[data-host=\"host1\"] .network[data-network=\"front\"] .container')]"
            ".map(c => [c.dataset.name, c.dataset.door]))", 10)
        assert doors == {"web": "plexus", "client": "plexus", "locked": "plexus",
                         "pod1": "cni"}, doors
        assert browser.evaluate("document.querySelector('.container[data-name=\"web\"] .ports')"
                                ".textContent") == "8080:80/tcp"
        ipam = browser.evaluate("document.querySelector('#ipam tr[data-network=\"front\"]')"
                                ".textContent")
        assert "10.81.0.0/24" in ipam and "4 / 253" in ipam, ipam
        assert "default/websvc" in browser.evaluate("document.getElementById('services')"
                                                    ".textContent")
        assert "default/lock" in browser.evaluate("document.getElementById('policies')"
                                                  ".textContent")
        # A mark on the page's window: a reload would wipe it.
        browser.evaluate("window.plexusTestMark = 'still here'")
        forwarded = ".flow[data-src='client'][data-dst='web'][data-verdict='forwarded']"
        dropped = ".flow[data-src='client'][data-dst='locked'][data-verdict='dropped']"
        assert _rows(browser, forwarded) == 0 and _rows(browser, dropped) == 0
        client = agent.netns("client")
        assert tcp_probe(client, agent.address("web"), 80, 5.0).outcome is ANSWERED
        assert tcp_probe(client, agent.address("locked"), 80, 0.5).outcome is DROPPED
        browser.wait_for(f"document.querySelectorAll({json.dumps(forwarded)}).length > 0", 10)
        browser.wait_for(f"document.querySelectorAll({json.dumps(dropped)}).length > 0", 10)
        reason = browser.evaluate(f"document.querySelector({json.dumps(dropped)}).textContent")
        assert "lock" in reason, reason
        assert browser.evaluate("window.plexusTestMark") == "still here"
        # The live part is swapped in (every 2 s) from the agent: a new container shows up.
        agent.run_echo("late", "front")
        browser.wait_for("document.querySelector('.container[data-name=\"late\"]') !== null",
                         10)
        assert browser.evaluate("window.plexusTestMark") == "still here"
        # By now the counters were read twice (the page, a swap): web's rates, which it has
        # (it answered client).
        rate = browser.evaluate("document.querySelector('.container[data-name=\"web\"] .rate')"
                                ".textContent")
        assert re.fullmatch(r"↓ [\d.]+ k?B/s ↑ [\d.]+ k?B/s", rate), rate
        shot = browser.screenshot(tmp_path / "web-view.png")
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        browser.close()
    assert browser.survivors() == [], "chromium processes outlived the test"


def test_an_unknown_path_is_404_and_the_agent_keeps_serving(lab: Agent) -> None:
    agent = lab
    for path in ("/nowhere", "/static/../../etc/passwd", "/api/flows/x"):
        status, body = http_get(agent.host, "127.0.0.1", PORT, path)
        assert status == 404 and "no page" in body, (path, status, body)
    status, body = http_get(agent.host, "127.0.0.1", PORT, "/api/flows?verdict=maybe")
    assert status == 400 and "verdict" in body, body
    status, body = http_get(agent.host, "127.0.0.1", PORT, "/api/state")
    assert status == 200
    assert {c["name"] for c in json.loads(body)["containers"]} == {"web", "client", "locked",
                                                                   "pod1"}
    status, body = http_get(agent.host, "127.0.0.1", PORT, "/")
    assert status == 200 and 'data-name="web"' in body
    assert agent.proc is not None and agent.proc.poll() is None

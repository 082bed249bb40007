"""`make demo`: python -m demo (inside tests/sandbox). The acts are in acts.py, control.py,
policy.py, observe.py (services, flows, metrics) and multihost.py."""

import sys
import tempfile
from pathlib import Path

from demo.acts import build, checks, console, report, teardown, verdicts
from demo.control import AGENT_OPTIONS, restart_and_repair
from demo.multihost import multi_host
from demo.observe import flows_act, metrics_act, services_act, services_cleanup, web_act
from demo.policy import policy_act
from tests.harness.world import World, in_sandbox


def main() -> int:
    if not in_sandbox():
        console.print("run me through `make demo` (inside tests/sandbox)")
        return 2
    with tempfile.TemporaryDirectory(prefix="plexus-demo-") as tmp, World(Path(tmp)) as world:
        console.rule("plexus demo")
        console.print("starting an agent in simulated host 'host1' (a network namespace)")
        world.add_host("host1", start_agent=False).start(extra=AGENT_OPTIONS)
        build(world)
        ok = report(world, checks(world))
        ok = verdicts("control plane", restart_and_repair(world, console)) and ok
        console.rule("network policy")
        ok = verdicts("network policy", policy_act(world, Path(tmp), console)) and ok
        console.rule("services")
        ok = verdicts("services", services_act(world, console)) and ok
        console.rule("observability")
        ok = verdicts("flow log", flows_act(world)) and ok
        ok = verdicts("Prometheus metrics", metrics_act(world)) and ok
        ok = verdicts("web view", web_act(world, console)) and ok
        services_cleanup(world)
        clean = teardown(world)
    with tempfile.TemporaryDirectory(prefix="plexus-demo-hosts-") as tmp:
        console.rule("several hosts")
        ok = verdicts("several hosts on etcd", multi_host(Path(tmp), console)) and ok
    console.rule("result")
    console.print("all checks passed" if ok and clean else "[red]some checks failed[/red]")
    return 0 if ok and clean else 1


sys.exit(main())

"""Every command line of the README's "Using it" section, run in order against a sandboxed agent.

Which blocks: the ```sh blocks under "## Using it", its own and those of its subsections, except
the subsections in SKIPPED: "CNI" (`make install-cni` writes into the machine's /opt/cni/bin, and
the rest is a config for a CNI runtime) and "Docker" (its lines are `docker` commands for a
dockerd); test_cni_spec, test_podman and test_docker cover those paths with their own harnesses.
A subsection with ```sh blocks that is in neither RUN nor SKIPPED fails the test: a new one is a
decision, not a silent skip.

How a README line becomes commands (a line no rule covers fails the test):
- a trailing `\\` joins the next line; `# comment` is stripped; `;` separates commands; `&` may
  only end the agent's line.
- `[...]` marks optional words (the README's notation, not shell; brackets do not nest). A
  read-only command (READ_ONLY) runs twice, without the optional words and with all of them;
  any other command runs once, with all of them, since the later lines may depend on them
  (`--ip 10.90.0.50`) and the bare form would change the state first.
- `sudo` is dropped: the test is root already.
- `.venv/bin/plexus agent OPTIONS &` is the World's agent on simulated host `host1`, started with
  OPTIONS except those naming paths of the machine (SANDBOXED: state dir, sockets), which the
  World chooses.
- `export PLEXUS_SOCKET=PATH`: PATH must be the client's default (as the README says); the
  commands get the sandboxed agent's socket in PLEXUS_SOCKET instead.
- `plexus ARGS` is the venv's plexus; `ip ARGS` is ip; `curl ARGS` is curl.
- Every command runs in host1's network namespace (nsenter), the host the user types on.

Each command must exit 0. CHECKS compare a few outputs with what the README implies, against
the kernel where it holds the answer; each check must apply at least once, so a README edit that
drops what a check relies on fails here rather than quietly testing less.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from plexus.api.client import DEFAULT_SOCKET
from tests.harness.world import VENV_BIN, Agent, World, http_get, nsexec

README = Path(__file__).parents[2] / "README.md"
SECTION = "Using it"
# "": the section's own blocks, before any subsection
RUN = ("", "Service discovery", "Network policy", "Services", "Flows", "Metrics", "Web view",
       "Verify")
SKIPPED = {"CNI": "needs make install-cni and a CNI runtime", "Docker": "needs dockerd",
           "Several hosts (etcd)": "needs etcd and several hosts (test_cluster_hosts.py)"}
HOST = "host1"
READ_ONLY = {
    ("network", "ls"), ("network", "inspect"), ("ps",), ("inspect",), ("status",),
    ("dns", "lookup"), ("dns", "stats"), ("logs",), ("flows",), ("service", "ls"),
    ("service", "inspect"), ("verify",),
}
SANDBOXED = {"--state-dir", "--socket", "--docker-api", "--docker-plugin-socket"}


# -- reading the README -------------------------------------------------------------------------


def sh_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(subsection heading, block) for every ```sh block of the section."""
    section = sub = ""
    block: list[str] | None = None
    for line in text.splitlines():
        if block is not None:
            if line.startswith("```"):
                if section == SECTION:
                    yield sub, "\n".join(block)
                block = None
            else:
                block.append(line)
        elif line.startswith("## "):
            section, sub = line[3:].strip(), ""
        elif line.startswith("### "):
            sub = line[4:].strip()
        elif line.strip() in ("```sh", "```bash", "```shell"):
            block = []


def runnable_blocks(text: str) -> list[str]:
    blocks = []
    for sub, block in sh_blocks(text):
        if sub in RUN:
            blocks.append(block)
        else:
            assert any(sub.startswith(s) for s in SKIPPED), (
                f"README subsection {sub!r} of {SECTION!r} has a sh block: add it to RUN or "
                "SKIPPED in tests/integration/test_readme.py"
            )
    return blocks


@dataclass
class Command:
    source: str  # the README line, for messages
    words: list[str]  # optional words still in [brackets]
    background: bool = False


def commands(block: str) -> Iterator[Command]:
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&")
        lexer.whitespace_split = True  # keep `127.0.0.1:9090:90/udp` one word
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token not in (";", "&"):
                words.append(token)
                continue
            assert token == ";" or words, f"unexpected {token!r} in README line {line!r}"
            if words:
                yield Command(line.strip(), words, background=token == "&")
            words = []


def variants(cmd: Command) -> list[list[str]]:
    """The argv to run for one command: see the module's docstring for optional words."""
    bare: list[str] = []
    full: list[str] = []
    inside = False
    for word in cmd.words:
        opens, closes = word.startswith("["), word.endswith("]")
        assert not (opens and inside), f"nested [ in README line {cmd.source!r}"
        inside = inside or opens
        plain = word.removeprefix("[") if opens else word
        plain = plain.removesuffix("]") if closes and inside else plain
        full.append(plain)
        if not inside:
            bare.append(plain)
        inside = inside and not closes
    assert not inside, f"unclosed [ in README line {cmd.source!r}"
    if bare == full:
        return [full]
    subcommand = tuple(w for w in full[1:3] if not w.startswith("-"))
    read_only = full[0] == "plexus" and (
        subcommand in READ_ONLY or subcommand[:1] in READ_ONLY
    )
    return [bare, full] if read_only else [full]


def test_the_line_rules() -> None:
    block = "sudo x agent --a b &   # c\nplexus ps [-a] [--json]; plexus rm [-f] y \\\n   z # q"
    cmds = list(commands(block))
    assert [(c.words, c.background) for c in cmds] == [
        (["sudo", "x", "agent", "--a", "b"], True),
        (["plexus", "ps", "[-a]", "[--json]"], False),
        (["plexus", "rm", "[-f]", "y", "z"], False),
    ]
    assert variants(cmds[1]) == [["plexus", "ps"], ["plexus", "ps", "-a", "--json"]]
    assert variants(cmds[2]) == [["plexus", "rm", "-f", "y", "z"]]
    attach = Command("", ["attach", "[--ip", "1.2.3.4]", "[-p", "1:2]", "--id", "x"])
    assert variants(attach) == [["attach", "--ip", "1.2.3.4", "-p", "1:2", "--id", "x"]]


# -- running it ---------------------------------------------------------------------------------


@dataclass
class Session:
    """What the README's reader has built so far, in the sandbox."""

    world: World
    agent: Agent | None = None
    attached: dict[str, str] = field(default_factory=dict)  # --id of `plexus attach` -> netns
    printed: dict[str, str] = field(default_factory=dict)  # foreground `run --name N` -> output
    services: dict[str, list[str]] = field(default_factory=dict)  # `service create` -> VIPs

    def env(self) -> dict[str, str]:
        assert self.agent is not None, "a README command runs before the agent's line"
        return {**os.environ, "PLEXUS_SOCKET": str(self.agent.socket)}

    def start_agent(self, argv: list[str]) -> None:
        assert argv[:2] == ["plexus", "agent"], f"only the agent may run in the background: {argv}"
        extra, options = [], iter(argv[2:])
        for word in options:
            name = word.split("=", 1)[0]
            if name in SANDBOXED:
                if "=" not in word:
                    next(options)  # its value: a path of the machine, the World picks one
            else:
                extra.append(word)
        self.agent = self.world.add_host(HOST, start_agent=False)
        self.agent.start(extra=extra)

    def run(self, cmd: Command, argv: list[str]) -> subprocess.CompletedProcess[str]:
        if argv[0] == "plexus":
            argv = [str(VENV_BIN / "plexus"), *argv[1:]]
        else:
            assert argv[0] in ("ip", "curl"), f"no rule to run README line {cmd.source!r}"
        r = subprocess.run(
            ["nsenter", f"--net=/run/netns/{HOST}", "--", *argv],
            capture_output=True, text=True, timeout=60, env=self.env(),
        )
        assert r.returncode == 0, (
            f"README line {cmd.source!r} ran as {argv[1:]} and exited {r.returncode}:\n"
            f"stdout: {r.stdout}\nstderr: {r.stderr}\n{self.agent_log()}"
        )
        return r

    def agent_log(self) -> str:
        log = self.agent.log if self.agent else None
        return f"agent log (tail):\n{log.read_text()[-2000:]}" if log and log.is_file() else ""


def execute(session: Session, cmd: Command, used: set[str]) -> None:
    for argv in variants(cmd):
        if argv[0] == "sudo":
            argv = argv[1:]
        if argv[0].endswith("/plexus"):  # .venv/bin/plexus
            argv = ["plexus", *argv[1:]]
        if argv[0] == "export":
            assert argv[1:] == [f"PLEXUS_SOCKET={DEFAULT_SOCKET}"], cmd.source
        elif cmd.background or argv[:2] == ["plexus", "agent"]:
            session.start_agent(argv)
        else:
            result = session.run(cmd, argv)
            for check in CHECKS:
                if check.applies(argv):
                    check.verify(session, argv[1:], result.stdout)
                    used.add(check.name)


@pytest.mark.timeout(240)
def test_every_command_line_of_the_usage_section(world: World) -> None:
    session = Session(world)
    used: set[str] = set()
    cmds = [c for block in runnable_blocks(README.read_text()) for c in commands(block)]
    assert len(cmds) >= 15, f"the section's code blocks gave only {len(cmds)} commands"
    for cmd in cmds:
        execute(session, cmd, used)
    assert used == {c.name for c in CHECKS}, "checks that no README line reached"


# -- what the README implies about a few outputs -----------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    applies: Callable[[list[str]], bool]
    verify: Callable[[Session, list[str], str], None]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def inspect(session: Session, name: str) -> dict[str, Any]:
    assert session.agent is not None
    return session.agent.container(name)


def addresses_of(container: dict[str, Any], network: str | None = None) -> list[str]:
    return [a.split("/")[0] for ep in container["endpoints"] if network in (None, ep["network"])
            for a in ep["addresses"]]


def kernel_addresses(ns: str) -> list[str]:
    data = json.loads(nsexec(ns, "ip", "-j", "addr").stdout)
    return [a["local"] for link in data for a in link["addr_info"] if a.get("scope") == "global"]


def created(session: Session, args: list[str], out: str) -> None:
    assert out.strip() == args[2], f"`network create {args[2]}` printed {out!r}"


def auto_subnets(session: Session, args: list[str], out: str) -> None:
    """`--ipv6` with no --subnet: "subnet picked from 10.89.0.0/16 (+ a ULA /64)"."""
    assert session.agent is not None
    networks = session.agent.json("network", "ls")
    subnets = next(n["subnets"] for n in networks if n["name"] == args[2])
    v4, v6 = (ipaddress.ip_network(s["cidr"]) for s in subnets)
    assert isinstance(v4, ipaddress.IPv4Network) and isinstance(v6, ipaddress.IPv6Network)
    assert v4.subnet_of(ipaddress.IPv4Network("10.89.0.0/16")), v4
    assert v6.prefixlen == 64 and v6.subnet_of(ipaddress.IPv6Network("fc00::/7")), v6


def published_port_answers(session: Session, args: list[str], out: str) -> None:
    """`-p 8080:80` with an HTTP server in the container: the host's port 8080 answers HTTP
    from another machine (the World's `outside`)."""
    port = next(p.split(":")[0] for p in args if re.fullmatch(r"\d+:\d+", p))
    host = session.world.host_addr(HOST)
    deadline = time.monotonic() + 15
    reply = http_get("outside", host, int(port))
    while not reply.startswith("HTTP/") and time.monotonic() < deadline:
        time.sleep(0.2)  # the server is still starting
        reply = http_get("outside", host, int(port))
    assert reply.startswith("HTTP/1.0 200"), f"{host}:{port} answered {reply[:200]!r}"


def exec_in_container(session: Session, args: list[str], out: str) -> None:
    """`plexus exec api -- ip addr` shows api's namespace: its addresses, not the host's."""
    container = inspect(session, args[1])
    wanted = addresses_of(container)
    assert wanted and sorted(wanted) == sorted(kernel_addresses(container["netns"]))
    assert all(f" {a}/" in out for a in wanted), (wanted, out)
    assert session.world.host_addr(HOST) not in out, out


def foreground_run(session: Session, args: list[str], out: str) -> None:
    """No -d: the command has run to its end by the time `plexus run` returns, and `plexus run`
    printed what the command prints when run directly."""
    name = option(args, "--name") or ""
    container = inspect(session, name)
    assert (container["state"], container["exit_code"]) == ("exited", 0), container
    command = args[args.index("--") + 1:]
    assert out == subprocess.run(command, capture_output=True, text=True, timeout=10).stdout
    session.printed[name] = out


def logs(session: Session, args: list[str], out: str) -> None:
    """`logs NAME`: what the foreground run printed, as the agent's log file holds it."""
    assert session.agent is not None
    name = args[-1]
    assert out == session.printed[name]
    assert out == (session.agent.state_dir / "logs" / f"{name}.log").read_text()


def removed_logs(session: Session, args: list[str], out: str) -> None:
    """`rm NAME...`: their logs are gone with them."""
    assert session.agent is not None
    names = [a for a in args[1:] if not a.startswith("-")]
    assert names and out.split() == names
    assert not any((session.agent.state_dir / "logs" / f"{n}.log").exists() for n in names)


def attached(session: Session, args: list[str], out: str) -> None:
    """`attach ... --ip X` prints the interface and X/len; the namespace holds X."""
    netns, ip = option(args, "--netns") or "", option(args, "--ip")
    assert ip is not None and out.split()[1].split("/")[0] == ip, out
    assert kernel_addresses(netns) == [ip]
    session.attached[option(args, "--id") or ""] = netns


def detached(session: Session, args: list[str], out: str) -> None:
    """`detach --id X`: the interface plexus put into X's namespace is gone."""
    netns = session.attached[option(args, "--id") or ""]
    links = json.loads(nsexec(netns, "ip", "-j", "link").stdout)
    assert [link["ifname"] for link in links] == ["lo"]


def dns_answer(session: Session, args: list[str], out: str) -> None:
    """`dns lookup api --network web` (or api.shop): api's address on that network; for a
    service (web.default), its IPv4 VIP."""
    name, network = args[2].split(".")[0], option(args, "--network")
    if name in session.services:
        assert session.services[name][0] in out, out
        return
    wanted = [a for a in addresses_of(inspect(session, name), network) if ":" not in a]
    assert wanted and all(a in out for a in wanted), (wanted, out)


def policy_denied(session: Session, args: list[str], out: str) -> None:
    """`policy explain --from 203.0.113.9 --to api`: api (app=api in shop) is isolated by
    api-from-front, which allows only namespaces labelled team=front."""
    assert "DENIED" in out and "NetworkPolicy shop/api-from-front" in out, out


def flows_listed(session: Session, args: list[str], out: str) -> None:
    """`plexus flows`: the connection the published-port check made from the outside to api
    (through the host's port 8080) is there, as a connection to api's port 80."""
    if "--json" in args:
        found = json.loads(out)
        assert found and all(f["dst"]["name"] == "api" for f in found), out
        assert any(f["dst"]["port"] == 80 and f["verdict"] == "forwarded" for f in found), out
    else:
        assert "shop/api (" in out and "forwarded" in out, out


def policy_applied(session: Session, args: list[str], out: str) -> None:
    assert out.splitlines() == ["NetworkPolicy shop/api-from-front created",
                                "CiliumNetworkPolicy shop/no-test-net created"], out


def metrics_served(session: Session, args: list[str], out: str) -> None:
    """`curl .../metrics` (the agent runs with --metrics-address): the endpoints gauge sums to
    what `plexus status` counts, and api's traffic counters are there, by name."""
    assert session.agent is not None
    endpoints = re.findall(r"^plexus_endpoints\{[^}]*\} (\S+)$", out, re.M)
    assert endpoints and sum(map(float, endpoints)) == session.agent.json("status")["endpoints"]
    assert re.search(r'^plexus_container_network_receive_bytes_total\{container="api",'
                     r'namespace="shop",network="web"\} \d', out, re.M), out[:2000]


def web_state_served(session: Session, args: list[str], out: str) -> None:
    """`curl .../api/state`: the web view's model lists the containers `plexus ps` does, api
    among them with its front door."""
    assert session.agent is not None
    state = json.loads(out)
    shown = {c["name"]: c["front_door"] for c in state["containers"]}
    assert set(shown) == {c["name"] for c in session.agent.json("ps")}, out[:2000]
    assert shown.get("api") == "plexus", shown


def service_created(session: Session, args: list[str], out: str) -> None:
    """`service create web --network web` prints its name and a VIP per family of the network
    (web is dual-stack), from the default service range."""
    name, vips = out.split()
    assert name == args[2]
    found = sorted((ipaddress.ip_address(v) for v in vips.split(",")), key=lambda a: a.version)
    assert [a.version for a in found] == [4, 6], out
    assert found[0] in ipaddress.ip_network("10.96.0.0/12"), out
    session.services[name] = [str(a) for a in found]


def service_inspected(session: Session, args: list[str], out: str) -> None:
    """`service inspect web`: its VIPs, and web1 (app=web, exposes http=80) as its ready
    endpoint with the named target port resolved; `dns lookup web.default` then answers the
    VIP (checked here too, once the VIP is known)."""
    seen = json.loads(out)
    assert seen["vips"] == session.services[args[2]], out
    [ep] = seen["endpoints"]
    assert (ep["container"], ep["ready"], list(ep["targets"].values())) == ("web1", True, [80])
    assert seen["unresolved"] == []


def manifests_applied(session: Session, args: list[str], out: str) -> None:
    assert out.splitlines() == ["Service default/web-np created",
                                "Service default/web-peers created"], out


def verified(session: Session, args: list[str], out: str) -> None:
    """`verify`: the kernel agrees; api's published port 8080 was probed and reached it."""
    if "--json" not in args:
        assert "the kernel agrees with the model" in out, out
        return
    report = json.loads(out)
    assert report["agrees"] and report["counts"]["disagree"] == 0, report["mismatches"]
    [pub, *_] = [p for p in report["probes"] if p["port"] == 8080 and p["to"] == "api"]
    assert (pub["expected"], pub["observed"], pub["outcome"]) == ("reachable", "reachable",
                                                                  "connected"), pub


def cmd(*prefix: str, has: tuple[str, ...] = (), lacks: str = "") -> Callable[[list[str]], bool]:
    """A `plexus PREFIX...` command line with every word of ``has`` and without ``lacks``."""

    def applies(argv: list[str]) -> bool:
        return (
            argv[0] == "plexus" and argv[1 : 1 + len(prefix)] == list(prefix)
            and all(w in argv for w in has) and (not lacks or lacks not in argv)
        )

    return applies


CHECKS = [
    Check("network create prints the name", cmd("network", "create"), created),
    Check("automatic subnets", cmd("network", "create", has=("--ipv6",), lacks="--subnet"),
          auto_subnets),
    Check("published port", cmd("run", has=("-d", "http.server", "-p")),
          published_port_answers),
    Check("foreground run", cmd("run", lacks="-d"), foreground_run),
    Check("logs", cmd("logs"), logs),
    Check("rm removes logs", cmd("rm"), removed_logs),
    Check("exec ip addr", lambda argv: cmd("exec")(argv) and argv[-2:] == ["ip", "addr"],
          exec_in_container),
    Check("attach --ip", cmd("attach", has=("--ip",)), attached),
    Check("detach", cmd("detach"), detached),
    Check("dns lookup", cmd("dns", "lookup"), dns_answer),
    Check("policy apply", cmd("policy", "apply"), policy_applied),
    Check("flows", cmd("flows"), flows_listed),
    Check("policy explain", cmd("policy", "explain"), policy_denied),
    Check("metrics", lambda argv: argv[0] == "curl" and argv[-1].endswith("/metrics"),
          metrics_served),
    Check("web state", lambda argv: argv[0] == "curl" and argv[-1].endswith("/api/state"),
          web_state_served),
    Check("service create", cmd("service", "create"), service_created),
    Check("service inspect", cmd("service", "inspect"), service_inspected),
    Check("apply", cmd("apply"), manifests_applied),
    Check("verify", cmd("verify"), verified),
]

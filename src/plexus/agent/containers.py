"""``plexus run``: lightweight containers, a named network namespace and one process in it.

These are not isolated beyond networking (no mount, pid or user namespaces): they exist so that
plexus can be used and demonstrated on its own, and they use exactly the attach path that the CNI
and Docker front doors use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from plexus.agent.core import Core, log
from plexus.agent.endpoints import AttachSpec, EndpointService
from plexus.dataplane import netns
from plexus.dns import dns_enabled
from plexus.errors import AlreadyExists, InUse, InvalidArgument, NotFound, PlexusError
from plexus.model import keys, parse
from plexus.model.types import Container, IPAddress, PortMapping
from plexus.store.base import Compare, Put


@dataclass(frozen=True)
class RunSpec:
    name: str
    command: Sequence[str]
    networks: Sequence[str]
    ips: Sequence[IPAddress] = ()
    ports: Sequence[PortMapping] = ()
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = ""
    aliases: Sequence[str] = ()


ETC_NETNS = Path("/etc/netns")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def resolv_conf(core: Core, c: Container) -> str | None:
    """The container's resolv.conf, or None to leave the host's (no plexus DNS reachable)."""
    net = core.networks.get(c.networks[0]) if c.networks else None
    if core.dns is None or net is None or net.driver != "bridge" or not dns_enabled(net):
        return None
    gateways = sorted(
        (s.gateway for s in net.subnets if s.gateway is not None), key=lambda g: g.version
    )
    if not gateways:
        return None
    search, options = [], []
    try:
        for line in HOST_RESOLV_CONF.read_text().splitlines():
            words = line.split()
            if words and words[0] in ("search", "domain"):
                search += words[1:]
            elif words and words[0] == "options":
                options += words[1:]
    except OSError:
        pass
    domain = core.dns.settings.domain
    lines = [f"nameserver {g}" for g in gateways[:3]]
    domains = list(dict.fromkeys([*([domain] if domain else []), *search]))
    if domains:
        lines.append("search " + " ".join(domains))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def proc_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (0 if gone): with the pid, an identity
    that survives pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The command name (field 2) may contain spaces and parentheses; fields after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def is_alive(c: Container) -> bool:
    return c.pid > 0 and proc_start_time(c.pid) == c.pid_start


class ContainerService:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.endpoints = EndpointService(core)
        self._waiters: dict[str, asyncio.Task[None]] = {}

    @property
    def _logs(self) -> Path:
        return self.core.config.state_dir / "logs"

    async def all(self) -> list[Container]:
        return [self._observed(c) for c in await self.core.containers()]

    def _observed(self, c: Container) -> Container:
        if c.state == "running" and not is_alive(c):
            return replace(c, state="exited")
        return c

    async def get(self, name: str) -> Container:
        kv = await self.core.store.get(keys.container(self.core.node, name))
        if kv is None:
            raise NotFound(f"container {name!r} not found")
        return self._observed(Container.from_json(kv.value))

    async def run(self, spec: RunSpec) -> Container:
        c = self._validate(spec)
        key = keys.container(self.core.node, c.name)
        created = await self.core.store.txn([Compare.absent(key)], [Put(key, c.to_json())])
        if not created.succeeded:
            raise AlreadyExists(f"container {c.name!r} already exists")
        try:
            c = await self._start(c, spec)
        except BaseException:
            await self._remove(c)
            raise
        log.info("container %s running (pid %d)", c.name, c.pid)
        return c

    def _validate(self, spec: RunSpec) -> Container:
        parse.name("name", spec.name)
        if not spec.command:
            raise InvalidArgument("command", "", "a command to run is required")
        if not spec.networks:
            raise InvalidArgument("network", "", "at least one --network is required")
        for n in spec.networks:
            if n not in self.core.networks:
                raise NotFound(f"network {n!r} not found")
        if shutil.which(spec.command[0]) is None:
            raise InvalidArgument("command", spec.command[0], "executable file not found in $PATH")
        subnets = [s.cidr for n in spec.networks for s in self.core.networks[n].subnets]
        for ip in spec.ips:
            if not any(ip in cidr for cidr in subnets):
                raise InvalidArgument(
                    "ip", str(ip), f"not in any subnet of {', '.join(spec.networks)}"
                )
        drivers = {self.core.networks[n].driver for n in spec.networks}
        if "host" in drivers and len(spec.networks) > 1:
            raise InvalidArgument("network", ",".join(spec.networks), "host excludes others")
        cid = secrets.token_hex(32)
        # driver host: the process shares the agent's namespace, so there is none to make.
        ns_name = "" if "host" in drivers else f"plexus-{cid[:12]}"
        return Container(
            id=cid,
            name=spec.name,
            node=self.core.node,
            netns_name=ns_name,
            networks=tuple(spec.networks),
            command=tuple(spec.command),
            ports=tuple(spec.ports),
            labels=dict(spec.labels),
            namespace=spec.namespace,
            aliases=tuple(spec.aliases),
            static_ips=tuple(spec.ips),
            created=time.time(),
        )

    @staticmethod
    def _host_mode(c: Container) -> bool:
        return not c.netns_name

    async def _start(self, c: Container, spec: RunSpec) -> Container:
        if not self._host_mode(c):
            netns.create_named(c.netns_name)
        for i, network in enumerate(c.networks):
            await self.endpoints.attach(
                AttachSpec(
                    container_id=c.id,
                    network=network,
                    netns=c.netns,
                    ifname=f"eth{i}",
                    ips=[
                        a
                        for a in spec.ips
                        if any(a in s.cidr for s in self.core.networks[network].subnets)
                    ],
                    ports=spec.ports if i == 0 else (),
                    name=c.name,
                    aliases=spec.aliases,
                    namespace=spec.namespace,
                    labels=spec.labels,
                )
            )
        c = await self._spawn(c)
        await self.core.store.put(keys.container(self.core.node, c.name), c.to_json())
        return c

    def _write_resolv_conf(self, c: Container) -> None:
        """/etc/netns/NAME/resolv.conf, which `ip netns exec` binds over /etc/resolv.conf: the
        first network's gateway as nameserver (its DNS server listens there), the plexus domain
        first in the search list, then the host's search domains and options, as Docker does."""
        text = resolv_conf(self.core, c)
        if text is None:
            return
        path = ETC_NETNS / c.netns_name / "resolv.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    async def _spawn(self, c: Container) -> Container:
        self._logs.mkdir(parents=True, exist_ok=True)
        if not self._host_mode(c):
            self._write_resolv_conf(c)
        argv = list(c.command)
        if not self._host_mode(c):
            # `ip netns exec` also binds /etc/netns/NAME/* (resolv.conf, hosts) over /etc.
            argv = ["ip", "netns", "exec", c.netns_name, *argv]
        with open(self._logs / f"{c.name}.log", "ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            except OSError as exc:
                raise InvalidArgument("command", c.command[0], exc.strerror or str(exc)) from None
        c = replace(c, pid=proc.pid, pid_start=proc_start_time(proc.pid), state="running")
        self._waiters[c.name] = asyncio.create_task(self._reap(c, proc))
        return c

    async def _reap(self, c: Container, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._waiters.pop(c.name, None)
        key = keys.container(self.core.node, c.name)
        kv = await self.core.store.get(key)
        if kv is not None and Container.from_json(kv.value).id == c.id:
            done = replace(Container.from_json(kv.value), state="exited", exit_code=code)
            await self.core.store.put(key, done.to_json())

    async def remove(self, name: str, force: bool = False) -> None:
        c = await self.get(name)
        if c.state == "running" and not force:
            raise InUse(f"container {name!r} is running: stop it first or use --force")
        errors = await self._remove(c)
        if errors:
            raise PlexusError(f"remove {name}: " + "; ".join(errors))
        log.info("container %s removed", name)

    async def _remove(self, c: Container) -> list[str]:
        """Kill, detach, delete the netns, forget: keep going on error and report them all."""
        errors: list[str] = []
        if is_alive(c):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGKILL)
            waiter = self._waiters.pop(c.name, None)
            if waiter is not None:
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), 5)
        for ep in self.endpoints.of_container(c.id):
            try:
                await self.endpoints.detach(c.id, network=ep.network)
            except PlexusError as exc:
                errors.append(str(exc))
        if not self._host_mode(c):
            try:
                netns.delete_named(c.netns_name)
            except PlexusError as exc:
                errors.append(str(exc))
            shutil.rmtree(ETC_NETNS / c.netns_name, ignore_errors=True)
        await self.core.store.delete(keys.container(self.core.node, c.name))
        return errors

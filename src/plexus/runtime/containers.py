"""``plexus run``: lightweight containers, a named network namespace and one process in it.

This is a small container runtime, a front door like Podman or Docker: it makes the namespace and
the process (runtime work), and asks the endpoint service for the networking through exactly the
path the CNI and Docker front doors use. These containers are not isolated beyond networking (no
mount, pid or user namespaces): they exist so plexus can be used and demonstrated on its own.

A container is written ("creating") in the same transaction as its endpoints; it becomes
"running" once its process runs. An agent killed in between finds it "creating" at start-up and
removes it (its requester got an error).

The process writes its stdout and stderr straight into one log file (logs/NAME.log in the state
directory), not through a pipe to the agent: a restarted agent leaves it running, and nothing it
prints passes through Python. `plexus logs` and a foreground `plexus run` read that file back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from plexus.dataplane import netns
from plexus.dns import dns_enabled
from plexus.errors import (
    AlreadyExists,
    Conflict,
    InUse,
    InvalidArgument,
    NotFound,
    PlexusError,
    StoreError,
)
from plexus.model import keys, parse
from plexus.model.drivers import traits
from plexus.model.types import Container, ExposedPort, IPAddress, Network, PortMapping
from plexus.services.context import Context
from plexus.services.endpoints import AttachSpec, EndpointService
from plexus.store.base import Compare, Delete, Put

ETC_NETNS = Path("/etc/netns")
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
LOG_CHUNK = 65536
# How often a followed log is read again while its container runs and prints nothing new (the
# container's exit itself wakes the reader at once).
LOG_POLL = 0.1


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
    exposes: Sequence[ExposedPort] = ()


def resolv_conf(net: Network | None, domain: str | None) -> str | None:
    """The container's resolv.conf, or None to leave the host's (no plexus DNS reachable):
    the first network's gateways as nameservers (its DNS server listens there), the plexus
    domain first in the search list, then the host's search domains and options, as Docker."""
    if domain is None or net is None or not traits(net.driver).dns or not dns_enabled(net):
        return None
    gateways = sorted((s.gateway for s in net.subnets if s.gateway is not None),
                      key=lambda g: g.version)
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


class ContainerRuntime:
    def __init__(self, ctx: Context, endpoints: EndpointService, dns_domain: str | None) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        self.dns_domain = dns_domain  # None: the agent runs without DNS
        self._waiters: dict[str, asyncio.Task[None]] = {}

    @property
    def logs(self) -> Path:
        return self.ctx.config.state_dir / "logs"

    def all(self) -> list[Container]:
        return [self._observed(c) for c in self.ctx.cache.containers.values()]

    def _observed(self, c: Container) -> Container:
        """A "running" container whose process is gone has exited. While this agent reaps the
        process it records the exit code itself; only a container started before a restart (no
        reaper) is judged by its pid."""
        if c.state == "running" and c.name not in self._waiters and not is_alive(c):
            return replace(c, state="exited")
        return c

    def get(self, ref: str) -> Container:
        """A container by name, by ID, or by a prefix of the ID that no other has (as Docker)."""
        cache = self.ctx.cache
        c = cache.containers.get(ref) or cache.container_by_id(ref) or self._by_prefix(ref)
        if c is None:
            raise NotFound(f"container {ref!r} not found")
        return self._observed(c)

    def _by_prefix(self, prefix: str) -> Container | None:
        found = [c for c in self.ctx.cache.containers.values() if c.id.startswith(prefix)]
        if len(found) > 1:
            names = ", ".join(sorted(c.name for c in found))
            raise Conflict(f"container ID prefix {prefix!r} is ambiguous: {names}")
        return found[0] if found else None

    def log_path(self, c: Container) -> Path:
        return self.logs / f"{c.name}.log"

    async def run(self, spec: RunSpec) -> Container:
        # A run of this name that failed while the store did not answer may have left its row.
        await self.endpoints.leftovers.clear(
            container_keys={keys.container(self.ctx.node, spec.name)})
        c = self._validate(spec)
        # The row first: an agent killed anywhere after this finds the container "creating"
        # and removes it with its namespace; a namespace made first could be left behind.
        try:
            created = await self.ctx.commit([Compare.absent(self._key(c))],
                                            [Put(self._key(c), c.to_json())])
        except BaseException:  # StoreUnavailable: it may have been applied all the same
            self.endpoints.leftovers.container(self._key(c), c.id)
            raise
        if not created.succeeded:
            raise AlreadyExists(f"container {c.name!r} already exists")
        try:
            if c.netns_name:
                netns.create_named(c.netns_name)
            await self.endpoints.attach_all(self._attachments(c, spec))
            return await self._start(c)
        except BaseException:
            await self._undo(c)
            raise

    async def _undo(self, c: Container) -> None:
        """Remove what a failed run made; what the store did not take now goes later (the
        requester's error is the answer, not this one's)."""
        try:
            errors = await self._remove(c)
        except PlexusError as exc:
            errors = [exc.message]
        if errors:
            self.endpoints.leftovers.container(self._key(c), c.id)

    def _key(self, c: Container) -> str:
        return keys.container(self.ctx.node, c.name)

    def _validate(self, spec: RunSpec) -> Container:
        parse.name("name", spec.name)
        if not spec.command:
            raise InvalidArgument("command", "", "a command to run is required")
        if not spec.networks:
            raise InvalidArgument("network", "", "at least one --network is required")
        nets = []
        for n in spec.networks:
            net = self.ctx.cache.network(n)
            if net is None:
                raise NotFound(f"network {n!r} not found")
            nets.append(net)
        if spec.name in self.ctx.cache.containers:
            raise AlreadyExists(f"container {spec.name!r} already exists")
        if shutil.which(spec.command[0]) is None:
            raise InvalidArgument("command", spec.command[0], "executable file not found in $PATH")
        for ip in spec.ips:
            if not any(ip in s.cidr for net in nets for s in net.subnets):
                raise InvalidArgument("ip", str(ip),
                                      f"not in any subnet of {', '.join(spec.networks)}")
        shared = [n for n in nets if not traits(n.driver).needs_netns]
        if shared and len(nets) > 1:
            raise InvalidArgument("network", ",".join(spec.networks),
                                  f"{shared[0].name} excludes others")
        cid = secrets.token_hex(32)
        return Container(
            id=cid, name=spec.name, node=self.ctx.node,
            # A network on the host's own namespace: there is none to make.
            netns_name="" if shared else f"plexus-{cid[:12]}",
            networks=tuple(spec.networks), command=tuple(spec.command), ports=tuple(spec.ports),
            labels=dict(spec.labels), namespace=spec.namespace, aliases=tuple(spec.aliases),
            static_ips=tuple(spec.ips), created=time.time(),
        )

    def _attachments(self, c: Container, spec: RunSpec) -> list[AttachSpec]:
        out = []
        for i, name in enumerate(c.networks):
            net = self.ctx.cache.networks[name]
            out.append(AttachSpec(
                container_id=c.id, network=name, netns=c.netns, ifname=f"eth{i}",
                ips=[a for a in spec.ips if any(a in s.cidr for s in net.subnets)],
                ports=spec.ports if i == 0 else (), name=c.name, aliases=spec.aliases,
                namespace=spec.namespace, labels=spec.labels, exposes=spec.exposes,
            ))
        return out

    async def _start(self, c: Container) -> Container:
        if c.netns_name:
            self._write_resolv_conf(c)
        c, proc = await self._spawn(c)
        try:
            result = await self.ctx.commit([], [Put(self._key(c), c.to_json())])
            await self.ctx.seen(result.revision)
        finally:
            # Reaped only once "running" is written, so that a quick exit is not overwritten by
            # it (the exit code would be lost).
            self._waiters[c.name] = asyncio.create_task(self._reap(c, proc))
        return c

    def _write_resolv_conf(self, c: Container) -> None:
        """/etc/netns/NAME/resolv.conf, which `ip netns exec` binds over /etc/resolv.conf."""
        text = resolv_conf(self.ctx.cache.network(c.networks[0]), self.dns_domain)
        if text is None:
            return
        path = ETC_NETNS / c.netns_name / "resolv.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    async def _spawn(self, c: Container) -> tuple[Container, asyncio.subprocess.Process]:
        self.logs.mkdir(parents=True, exist_ok=True)
        argv = list(c.command)
        if c.netns_name:
            # `ip netns exec` also binds /etc/netns/NAME/* (resolv.conf, hosts) over /etc.
            argv = ["ip", "netns", "exec", c.netns_name, *argv]
        # A new container: whatever a file of that name holds is not its output.
        with open(self.log_path(c), "wb") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True,
                )
            except OSError as exc:
                raise InvalidArgument("command", c.command[0], exc.strerror or str(exc)) from None
        c = replace(c, pid=proc.pid, pid_start=proc_start_time(proc.pid), state="running")
        return c, proc

    async def _reap(self, c: Container, proc: asyncio.subprocess.Process) -> None:
        """Record the exit code; the reaper ends once the cache holds it, so whoever waits for
        the reaper (a followed log, a foreground `run`) then reads the exit code."""
        code = await proc.wait()
        try:
            kv = await self.ctx.store.get(self._key(c))
            if kv is not None and Container.from_json(kv.value).id == c.id:
                done = replace(Container.from_json(kv.value), state="exited", exit_code=code)
                result = await self.ctx.commit([Compare(kv.key, "mod", "==", kv.mod_revision)],
                                               [Put(kv.key, done.to_json())])
                if result.succeeded:
                    with contextlib.suppress(StoreError):
                        await self.ctx.seen(result.revision)
        finally:
            if self._waiters.get(c.name) is asyncio.current_task():
                del self._waiters[c.name]

    # -- logs ----------------------------------------------------------------------------------

    async def log(self, c: Container, follow: bool,
                  give_up: Callable[[], bool]) -> AsyncGenerator[bytes, None]:
        """The container's output (stdout and stderr, in one file) from its start; with
        ``follow``, then what it prints until it exits (and its exit is recorded) or
        ``give_up()`` says so (the reader left, the agent stops)."""
        try:
            f = open(self.log_path(c), "rb")  # noqa: SIM115 (held across awaits)
        except FileNotFoundError:
            return
        with f:
            running = follow
            while True:
                chunk = f.read(LOG_CHUNK)
                if chunk:
                    yield chunk
                elif not running or give_up():
                    return
                else:
                    # After it exits, one more pass reads what it printed last.
                    running = await self._runs_after(c, LOG_POLL)

    async def _runs_after(self, c: Container, timeout: float) -> bool:
        """Waits up to ``timeout`` for ``c`` to exit; does it still run?"""
        current = self.ctx.cache.containers.get(c.name)
        if current is None or current.id != c.id:
            return False  # removed
        waiter = self._waiters.get(c.name)
        if waiter is not None:
            await asyncio.wait([waiter], timeout=timeout)
        elif is_alive(current):
            await asyncio.sleep(timeout)  # started before a restart: no reaper to wait for
        current = self.ctx.cache.containers.get(c.name)
        return (current is not None and current.id == c.id
                and self._observed(current).state == "running")

    async def remove(self, ref: str, force: bool = False) -> None:
        c = self.get(ref)
        if c.state == "running" and not force:
            raise InUse(f"container {c.name!r} is running: --force kills and removes it")
        errors = await self._remove(c)
        if errors:
            raise PlexusError(f"remove {c.name}: " + "; ".join(errors))

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
        try:
            await self.endpoints.release(self.endpoints.of_container(c.id))
        except PlexusError as exc:
            errors.append(str(exc))
        self._delete_netns(c, errors)
        self.log_path(c).unlink(missing_ok=True)
        result = await self.ctx.commit([], [Delete(self._key(c))])
        await self.ctx.seen(result.revision)
        return errors

    def _delete_netns(self, c: Container, errors: list[str]) -> None:
        if not c.netns_name:
            return
        try:
            netns.delete_named(c.netns_name)
        except PlexusError as exc:
            errors.append(str(exc))
        shutil.rmtree(ETC_NETNS / c.netns_name, ignore_errors=True)

    async def roll_back_creating(self) -> list[str]:
        """Start-up: containers a killed agent left "creating"."""
        rolled = [c for c in self.ctx.cache.containers.values() if c.state == "creating"]
        for c in rolled:
            await self._remove(c)
        return [c.name for c in rolled]

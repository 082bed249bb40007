"""A lab of simulated hosts on one underlay segment, for the overlay's tests and bench.

    switch        bridge "sw" (the underlay segment)
      │ veth per host
    hN            u0: 192.0.2.N/24 and 2001:db8::N/64; forwarding on
      bridges     one per overlay network (what the bridge driver makes): a gateway per block
        cN-K      containers: a namespace each, a veth into the host's bridge, an address per
                  block with the block's prefix and default routes via the block's gateways

It must run inside ``tests/sandbox`` (namespaces under a private /run/netns). The overlay
itself (the VXLAN devices, FDB, neighbours, routes) is left to the code under test; this only
builds what the bridge driver and a container runtime would, with plain ``ip``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from plexus.model.types import IPInterface, IPNetwork
from tests.harness.probes import netns_path
from tests.harness.world import ECHO, nsexec, sh

SWITCH = "sw"


def gateway(block: IPNetwork) -> IPInterface:
    """The block's gateway on the host's bridge: its first host address, the block's prefix."""
    return ipaddress.ip_interface(f"{block.network_address + 1}/{block.prefixlen}")


def member(block: IPNetwork, k: int) -> IPInterface:
    """The k-th container address of a block (after the network address and the gateway)."""
    return ipaddress.ip_interface(f"{block.network_address + 2 + k}/{block.prefixlen}")


@dataclass
class Lab:
    """Namespaces made here, deleted by ``close``; ``prefix`` keeps two labs apart."""

    prefix: str = "ov"
    namespaces: list[str] = field(default_factory=list)
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _ns(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        nsexec(full, "ip", "link", "set", "lo", "up")
        return full

    def host(self, n: int, mtu: int = 1500) -> str:
        """Host ``n`` on the underlay: 192.0.2.N and 2001:db8::N on its link u0."""
        if not self.namespaces:
            switch = self._ns(SWITCH)
            nsexec(switch, "ip", "link", "add", "sw", "mtu", str(mtu), "type", "bridge")
            nsexec(switch, "ip", "link", "set", "sw", "up")
        switch, name = f"{self.prefix}-{SWITCH}", self._ns(f"h{n}")
        sh("ip", "link", "add", "u0", "netns", name, "mtu", str(mtu), "type", "veth",
           "peer", "name", f"to-h{n}", "netns", switch, "mtu", str(mtu))
        nsexec(switch, "ip", "link", "set", f"to-h{n}", "master", "sw", "up")
        nsexec(name, "ip", "addr", "add", f"192.0.2.{n}/24", "dev", "u0")
        nsexec(name, "ip", "addr", "add", f"2001:db8::{n}/64", "dev", "u0", "nodad")
        nsexec(name, "ip", "link", "set", "u0", "up")
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            nsexec(name, "sysctl", "-qw", key)
        return name

    def bridge(self, host: str, name: str, blocks: Sequence[IPNetwork], mtu: int) -> None:
        """A network's bridge on ``host`` with the gateway of each block."""
        nsexec(host, "ip", "link", "add", name, "mtu", str(mtu), "type", "bridge")
        for block in blocks:
            nodad = ["nodad"] if block.version == 6 else []
            nsexec(host, "ip", "addr", "add", str(gateway(block)), "dev", name, *nodad)
        nsexec(host, "ip", "link", "set", name, "up")

    def container(self, host: str, bridge: str, name: str, addresses: Sequence[IPInterface],
                  mtu: int) -> str:
        """A container namespace on ``host``'s ``bridge`` with ``addresses`` (each with its
        block's prefix) and a default route per family via its block's gateway."""
        ns = self._ns(name)
        port = f"v{name}"[:15]
        sh("ip", "link", "add", port, "netns", host, "mtu", str(mtu), "type", "veth",
           "peer", "name", "eth0", "netns", ns, "mtu", str(mtu))
        nsexec(host, "ip", "link", "set", port, "master", bridge, "up")
        for address in addresses:
            nodad = ["nodad"] if address.version == 6 else []
            nsexec(ns, "ip", "addr", "add", str(address), "dev", "eth0", *nodad)
        nsexec(ns, "ip", "link", "set", "eth0", "up")
        for address in addresses:
            via = str(gateway(address.network).ip)
            nsexec(ns, "ip", f"-{address.version}", "route", "add", "default", "via", via)
        return ns

    def serve(self, ns: str, name: str, port: int = 80) -> None:
        """The echo server (tests/harness/echo.py) in namespace ``ns``."""
        argv = ["nsenter", f"--net={netns_path(ns)}", "--", sys.executable, ECHO, name, str(port)]
        self.servers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True))

    def close(self) -> None:
        for proc in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()


class Monitor:
    """``ip monitor`` of a namespace's links, addresses, routes and neighbours (FDB entries
    included), read between markers: ``mark()`` returns every event since the last mark. A
    marker is an address added to lo and waited for, so no event is missed or misplaced."""

    def __init__(self, ns: str) -> None:
        self._ns = ns
        argv = ["nsenter", f"--net={netns_path(ns)}", "--", "ip", "-o", "monitor",
                "link", "address", "route", "neigh"]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._marks = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.mark()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._lock:
                self._lines.append(line.rstrip())

    def mark(self, timeout: float = 10.0) -> list[str]:
        self._marks += 1
        tag = f"127.0.0.{self._marks + 100}/32"
        nsexec(self._ns, "ip", "addr", "add", tag, "dev", "lo")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if any(tag in line for line in self._lines):
                    events = [line for line in self._lines if "127.0.0." not in line]
                    self._lines.clear()
                    return events
            time.sleep(0.02)
        raise TimeoutError(f"ip monitor in {self._ns} never showed the marker {tag}")

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait(timeout=10)

"""What an overlay device holds in a simulated host's kernel, read cheaply (bench/cluster.py).

- ``KernelView.counts``: FDB entries, neighbours and routes of one VXLAN device, by netlink
  dumps the kernel filters to the device (plexus's own request builders and parsers,
  ``dataplane/overlay/wire``): a few milliseconds for thousands of entries, where ``ip -j``
  and ``bridge -j`` cost a process and a JSON document each.
- ``NewHostWatch``: netlink notifications (neighbour and IPv4 route groups) on a socket of the
  host's namespace, so the arrival of one host's entries is timed without polling.

Both sockets are opened in the namespace by a throw-away thread (``netns.netlink_socket``); a
socket stays in the namespace it was made in.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import time
from pathlib import Path

from _common import vm_status

from plexus.dataplane import netns, rtnl
from plexus.dataplane.overlay import wire
from plexus.dataplane.overlay.apply import read_link
from plexus.dataplane.overlay.channel import OverlaySocket
from plexus.model.types import IPAddress, IPNetwork
from tests.harness.probes import netns_path

RTNLGRP_NEIGH = 3
RTNLGRP_IPV4_ROUTE = 7
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33


class KernelView:
    """Counts of one device's entries in namespace ``host`` (None: no such device)."""

    def __init__(self, host: str, device: str) -> None:
        self._sock = OverlaySocket.open(netns_path(host))
        self._device = device

    def index(self) -> int | None:
        link = read_link(self._sock, self._device)
        return None if link is None or link.kind != "vxlan" else link.index

    def counts(self) -> dict[str, int] | None:
        index = self.index()
        if index is None:
            return None
        fdb = self._sock.dump(lambda seq: wire.neigh_dump_request(seq, wire.AF_BRIDGE, index))
        neigh = self._sock.dump(lambda seq: wire.neigh_dump_request(seq, socket.AF_UNSPEC,
                                                                    index))
        routes = self._sock.dump(lambda seq: wire.route_dump_request(seq, socket.AF_INET,
                                                                     index))
        return {"fdb": sum(1 for _ in wire.parse_neighbours(iter(fdb), index, wire.AF_BRIDGE)),
                "neigh": sum(1 for _ in wire.parse_neighbours(iter(neigh), index, 0)),
                "routes": sum(1 for _ in wire.parse_routes(iter(routes), index))}

    def close(self) -> None:
        self._sock.close()


class NewHostWatch:
    """Waits for one remote host's FDB entry, neighbour and route on device ``index``."""

    def __init__(self, host: str, index: int) -> None:
        self._sock = netns.netlink_socket(netns_path(host))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self._sock.bind((0, 0))
        for group in (RTNLGRP_NEIGH, RTNLGRP_IPV4_ROUTE):
            self._sock.setsockopt(rtnl.SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        self._index = index
        self._want: set[tuple[str, object]] = set()
        self.overruns = 0

    def expect(self, mac: str, vtep: IPAddress, block: IPNetwork) -> None:
        """Arm the watch for one host (before its records are written)."""
        self._want = {("fdb", mac), ("neigh", vtep), ("route", block)}

    def _seen(self, data: memoryview) -> None:
        for kind, _, _, payload in rtnl.messages(data):
            one = [(kind, payload)]
            for _, mac in wire.parse_neighbours(iter(one), self._index, wire.AF_BRIDGE):
                self._want.discard(("fdb", mac))
            for ip, _ in wire.parse_neighbours(iter(one), self._index, 0):
                self._want.discard(("neigh", ip))
            for route in wire.parse_routes(iter(one), self._index):
                self._want.discard(("route", route.dst))

    def wait(self, t0: float, timeout: float) -> float:
        """Seconds from ``t0`` to the last of the expected entries (NaN: not in time)."""
        deadline = t0 + timeout
        while self._want:
            left = deadline - time.perf_counter()
            if left <= 0:
                return math.nan
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                return math.nan
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1  # notifications were lost: count it, keep waiting
                continue
            self._seen(memoryview(data))
        return time.perf_counter() - t0

    def close(self) -> None:
        self._sock.close()


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and its descendants (one that exits meanwhile counts nothing)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += vm_status(p).get("VmRSS", 0)
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the agent's helpers: DNS workers, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return [p for p in found if os.path.exists(f"/proc/{p}")]

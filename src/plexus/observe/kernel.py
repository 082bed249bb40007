"""Feeds the flow log from the kernel: conntrack's new and destroy events, and the packets the
tables log to ``flows.LOG_GROUP``, each read on the event loop as it arrives (``add_reader``).

Conntrack accounting (``net.netfilter.nf_conntrack_acct``) is turned on in the agent's
namespace while flows are on, so that an ended connection says its bytes and packets; it was
off here by default. If the kernel's socket buffer overflows (a burst of connections faster
than the loop reads), the kernel says so (ENOBUFS, counted here as ``lost`` once per overrun)
and counts every message it dropped on that socket (the Drops column of /proc/net/netlink, which
``observe.flowmetrics`` reads by the sockets' inodes): those records are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from pathlib import Path

from plexus.dataplane.nft import setelem
from plexus.dataplane.nft.render import LOG_GROUP
from plexus.errors import DataplaneError
from plexus.observe import nfwire as w
from plexus.observe.flows import FlowLog

log = logging.getLogger("plexus.flows")
ACCOUNTING = Path("/proc/sys/net/netfilter/nf_conntrack_acct")
RCVBUF = 8 << 20
SO_RCVBUFFORCE = 33


class KernelFlows:
    def __init__(self, flows: FlowLog) -> None:
        self._flows = flows
        self._ct: socket.socket | None = None
        self._log: socket.socket | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            ACCOUNTING.write_text("1\n")
        self._ct = _socket((1 << (w.NFNLGRP_CONNTRACK_NEW - 1))
                           | (1 << (w.NFNLGRP_CONNTRACK_DESTROY - 1)))
        self._log = _socket(0)
        _bind_log(self._log, LOG_GROUP)
        self._ct.setblocking(False)
        self._log.setblocking(False)
        self._flows.sockets = {"conntrack": _inode(self._ct), "nflog": _inode(self._log)}
        loop.add_reader(self._ct.fileno(), self._read, self._ct)
        loop.add_reader(self._log.fileno(), self._read, self._log)

    def _read(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded: let the loop breathe under a flood
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._flows.stats["lost"] += 1
                    continue
                log.warning("flow events: %s", exc)
                return
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        now = time.time()
        for kind, _, family, body in w.messages(data):
            if kind >> 8 == w.NFNL_SUBSYS_CTNETLINK and not self._flows.room(now):
                continue
            ev = w.ct_event(kind, body)
            if ev is not None:
                self._flows.connection(ev)
                continue
            lg = w.logged(kind, family, body)
            if lg is not None:
                self._flows.packet(lg)

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in (self._ct, self._log):
            if sock is not None:
                loop.remove_reader(sock.fileno())
                sock.close()
        self._ct = self._log = None
        self._flows.sockets = {}
        self._flows.close()


def _socket(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, w.NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((0, groups))
    return sock


def _inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def _bind_log(sock: socket.socket, group: int) -> None:
    """Ask nfnetlink_log for the packets of ``group``; DataplaneError if another process has
    the group (EBUSY) or the kernel has no nfnetlink_log."""
    sock.settimeout(2.0)
    sock.send(w.bind_group(1, group))
    try:
        for seq, code in setelem.answers(sock.recv(1 << 16)):
            if seq == 1 and code:
                raise DataplaneError(f"cannot receive logged packets (nfnetlink_log group "
                                     f"{group}): {errno.errorcode.get(code, code)}")
    except TimeoutError as exc:
        raise DataplaneError("no answer from nfnetlink_log") from exc

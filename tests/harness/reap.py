"""Reaping the daemons' orphans inside tests/sandbox.

conmon, containerd, its shims and runc double-fork or daemonize; inside tests/sandbox an
orphan's new parent is the sandbox's PID 1, usually this (pytest / bench / demo) process, and
nothing else would ever wait for it. Only zombie children whose name starts with one of
``names`` are waited for, by pid, so subprocess's own children are not disturbed.
"""

from __future__ import annotations

import contextlib
import os


def reap_zombies(names: tuple[str, ...]) -> None:
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        if comm.startswith(names) and fields[0] == "Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)

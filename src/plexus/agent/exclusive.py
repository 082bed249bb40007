"""One agent per state directory, per network namespace, and per socket.

A second agent in the same network namespace would fight the first over the kernel (the same
bridges, the same nftables table), and a second agent on the same socket or state directory would
take them over. So an agent starting up claims three things, each released by the kernel when it
dies, whatever way it dies, and refuses to start with one clear line if any is held:

- its state directory: an flock on ``agent.lock`` (the file keeps the holder's pid);
- its network namespace: an abstract unix socket, ``\\0plexus-agent`` (abstract names are per
  network namespace, and vanish with the socket: nothing to clean up after a SIGKILL);
- each socket it serves: a live one (someone answers a connect) is never taken over; a stale one
  (nobody answers) is replaced; and on the way out, only a socket file this agent created (same
  inode) is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from plexus.errors import PlexusError

NETNS_LOCK = b"\0plexus-agent"


def lock_state_dir(state_dir: Path) -> IO[str]:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / "agent.lock", "a+")  # noqa: SIM115 - held for the agent's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise PlexusError(
            f"another agent (pid {pid}) is running with state directory {state_dir}"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def lock_netns(state_dir: Path) -> socket.socket:
    """Held for the agent's life; its peer learns who holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(NETNS_LOCK)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PlexusError(
            "another plexus agent already manages this network namespace "
            f"(it holds {NETNS_LOCK[1:].decode()!r}{_holder()}); one agent per host"
        ) from None
    sock.listen(4)
    sock.setblocking(False)
    _holder_note[0] = f"pid {os.getpid()}, state directory {state_dir}"
    return sock


_holder_note = [""]


def _holder() -> str:
    """Who holds the namespace lock, asked of it (it answers on accept, see ``answer``)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(NETNS_LOCK)
        said = s.recv(512).decode(errors="replace").strip()
        return f": {said}" if said else ""
    return ""


def answer(lock: socket.socket) -> None:
    """Tell whoever connects to the namespace lock who holds it (a reader callback)."""
    with contextlib.suppress(OSError):
        conn, _ = lock.accept()
        with conn:
            conn.sendall(_holder_note[0].encode())


def claim_socket(path: Path) -> None:
    """Refuse a socket a live process answers on; clear a stale one."""
    if not (path.exists() or path.is_symlink()):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale: nobody listens there any more
            return
    raise PlexusError(f"another process already serves {path}: is an agent running there?")


def inode(path: Path) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        st = path.stat()
        return st.st_dev, st.st_ino
    return None


def release_socket(path: Path, made: tuple[int, int] | None) -> None:
    """Remove the socket file only if it is still the one this agent made."""
    if made is not None and inode(path) == made:
        path.unlink(missing_ok=True)

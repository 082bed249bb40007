"""Network namespaces as explicit handles.

The trap: ``setns(2)`` moves only the calling *thread* into another namespace, and it stays there.
Calling it on the event-loop thread, or on a pooled executor thread that later runs unrelated
work, silently sends that other work into the wrong namespace. So plexus never switches the
namespace of a long-lived thread. Instead, a short-lived thread that exists only for this purpose
enters the namespace, does one thing that binds to it (opens a netlink socket, creates a
namespace, writes a sysctl), hands the result back, and dies. A netlink socket keeps the namespace
it was created in for its whole life, so everything after that runs on ordinary threads.

Python 3.11 has neither ``os.setns`` nor ``os.unshare`` (both arrived in 3.12), hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from plexus.errors import DataplaneError, InvalidArgument, NotFound

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), linux/nsfs.h
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
NETNS_RUN_DIR = Path("/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a throw-away thread that has entered the netns at ``path``."""
    result: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            failure.append(NotFound(f"network namespace {path} does not exist"))
            del exc
            return
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns({path})")
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=body, name=f"netns:{path}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def netlink_socket(path: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket bound to the netns at ``path`` (None: this process's own).

    SOCK_DGRAM, because asyncio's datagram transport (used by pyroute2's AsyncIPRoute) refuses
    SOCK_RAW.
    """

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)

    return make() if path is None else run_in_netns(path, make)


def check_netns(path: str) -> None:
    """Raise InvalidArgument unless ``path`` names a network namespace.

    ``ioctl(NS_GET_NSTYPE)`` on the opened file asks nsfs what kind of namespace it is (Linux
    4.11+): exact, and no thread (entering the namespace to find out cost a thread start and
    join per attach, up to 16 ms of the event loop's time under load)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument("netns", path, "no such network namespace") from None
    except OSError as exc:
        raise InvalidArgument("netns", path, f"cannot open it ({exc.strerror})") from None
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = 0  # ENOTTY: not an nsfs file at all
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise InvalidArgument("netns", path, "not a network namespace")


def same_netns(path: str) -> bool:
    """True when ``path`` is this process's own network namespace."""
    a, b = os.stat(path), os.stat("/proc/self/ns/net")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _ensure_run_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does, so that namespaces
    mounted here are visible to other mount namespaces (``ip netns exec`` makes one each time)."""
    NETNS_RUN_DIR.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(NETNS_RUN_DIR):
        return
    path = str(NETNS_RUN_DIR).encode()
    _check(_libc.mount(path, path, b"none", MS_BIND | MS_REC, None), "bind /run/netns")
    _check(_libc.mount(b"none", path, None, MS_SHARED | MS_REC, None), "share /run/netns")


def create_named(name: str) -> str:
    """Create the named netns /run/netns/NAME (with ``lo`` still down) and return its path."""
    _ensure_run_dir()
    target = NETNS_RUN_DIR / name
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except FileExistsError:
        raise DataplaneError(f"network namespace {name} already exists") from None
    os.close(fd)

    def body() -> None:
        # unshare(CLONE_NEWNET) on this throw-away thread gives it a new netns; the bind mount
        # keeps that namespace alive after the thread is gone.
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(_libc.mount(src, str(target).encode(), b"none", MS_BIND, None), "bind netns")

    result: list[BaseException] = []

    def guarded() -> None:
        try:
            body()
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=guarded, name=f"netns-create:{name}", daemon=True)
    thread.start()
    thread.join()
    if result:
        with contextlib.suppress(OSError):
            target.unlink()
        raise DataplaneError(f"cannot create network namespace {name}: {result[0]}")
    return str(target)


def delete_named(name: str) -> None:
    """Remove /run/netns/NAME; tolerate it being gone already."""
    target = NETNS_RUN_DIR / name
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise DataplaneError(f"cannot unmount {target}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        target.unlink()


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Write /proc/sys/KEY (dots or slashes) as seen from ``netns`` (None: our own).

    /proc/sys/net resolves against the namespace of the thread that opens it, which is why the
    write happens on the throw-away thread.
    """
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    if netns is None:
        write()
    else:
        run_in_netns(netns, write)


def read_sysctl(key: str) -> str:
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()

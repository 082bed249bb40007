"""tx checksum offload of one link, through the ethtool ioctl (SIOCETHTOOL).

ETHTOOL_GTXCSUM / ETHTOOL_STXCSUM (linux/ethtool.h) read and set the whole "tx-checksumming"
group (NETIF_F_CSUM_MASK), which is what ``ethtool -K DEV tx off`` turns off; the kernel then
drops TSO as well (no segmentation offload without checksum offload).

The ioctl acts in the network namespace of the socket it is made on, whatever thread makes it,
so the overlay's own netlink socket (bound to the host's namespace) serves: a netlink socket
has no ioctls of its own and hands SIOCETHTOOL to the device layer (sock_do_ioctl).
"""

from __future__ import annotations

import ctypes
import fcntl
import struct

from plexus.errors import DataplaneError

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17
IFNAMSIZ = 16
_VALUE = struct.Struct("=II")  # struct ethtool_value: cmd, data
# struct ifreq: the name, then a union whose ifr_data is a pointer; 40 bytes on 64-bit Linux.
_IFREQ = struct.Struct(f"@{IFNAMSIZ}sP{40 - IFNAMSIZ - ctypes.sizeof(ctypes.c_void_p)}x")


def _call(fd: int, name: str, cmd: int, value: int = 0) -> int:
    data = ctypes.create_string_buffer(_VALUE.pack(cmd, value), _VALUE.size)
    ifreq = bytearray(_IFREQ.pack(name.encode(), ctypes.addressof(data)))
    try:
        fcntl.ioctl(fd, SIOCETHTOOL, ifreq)
    except OSError as exc:
        raise DataplaneError(f"ethtool on {name}: {exc.strerror}") from exc
    return int(_VALUE.unpack(data.raw)[1])


def tx_checksum(fd: int, name: str) -> bool:
    """Whether link ``name`` offloads tx checksums (ethtool -k: tx-checksumming)."""
    return bool(_call(fd, name, ETHTOOL_GTXCSUM))


def set_tx_checksum(fd: int, name: str, on: bool) -> None:
    _call(fd, name, ETHTOOL_STXCSUM, int(on))

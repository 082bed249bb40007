"""The facts of the CNI specification plexus relies on, written once (SPEC.md 1.1.0).

Read by the agent (validation, results), by the stdlib-only Python shim (installed next to it as
a module of its own), and compiled into the C shim (``install.py`` passes ``VERSIONS`` as a
define). It therefore imports nothing, not even ``typing`` (its annotations are builtins).
"""

VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = VERSIONS[-1]
DEFAULT_SOCKET = "/run/plexus/plexus.sock"

# Environment variables each verb needs (VERSION needs none and is answered by the shims).
REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "STATUS": (),
    "GC": (),
}
# The first version that has each verb.
SINCE = {"CHECK": (0, 4), "STATUS": (1, 1), "GC": (1, 1)}

# Error codes (the spec's table).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs now
GENERIC = 999

_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")


def valid_name(name: str) -> bool:
    """The spec's ``^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$`` (container IDs, network names)."""
    return bool(name) and name[0] in _NAME_FIRST and all(c in _NAME_REST for c in name)


def version_tuple(version: str) -> tuple[int, ...]:
    """(1, 0, 0) for "1.0.0"; raises ValueError for what is not a version."""
    return tuple(int(x) for x in version.split("."))

"""plexus's firewall: one ``table inet plexus``, rendered from a ``FirewallState``.

- ``state``: the input values (``NetRule``, ``Publication``, ``FirewallState``, ``firewall_state``);
- ``render``: pure renderers to libnftables JSON (the design notes live there);
- ``readback``: the kernel's listing back into a ``FirewallState``;
- ``libnft``: the applier (libnftables via ctypes on a dedicated thread, or ``nft -j -f -``);
- ``firewall``: the ``Firewall`` seam, ``FirewallDelta`` and ``NftFirewall`` (its in-memory
  double is ``plexus.testing.FakeFirewall``).
"""

from plexus.dataplane.nft.firewall import Firewall, FirewallDelta, NftFirewall
from plexus.dataplane.nft.libnft import LibNft, Nft, NftCli, open_nft
from plexus.dataplane.nft.readback import parse_table
from plexus.dataplane.nft.render import (
    render_net_delta,
    render_pub_delta,
    render_table,
    render_teardown,
    render_update,
)
from plexus.dataplane.nft.state import FirewallState, NetRule, Publication, firewall_state

__all__ = [
    "Firewall",
    "FirewallDelta",
    "FirewallState",
    "LibNft",
    "NetRule",
    "Nft",
    "NftCli",
    "NftFirewall",
    "Publication",
    "firewall_state",
    "open_nft",
    "parse_table",
    "render_net_delta",
    "render_pub_delta",
    "render_table",
    "render_teardown",
    "render_update",
]

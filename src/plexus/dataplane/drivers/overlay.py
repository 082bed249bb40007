"""Overlay networks on this host: the network's bridge and its containers' veths, as the bridge
driver makes them. The VXLAN device and the routes, FDB and neighbour entries towards other
hosts' blocks are the overlay dataplane's (``dataplane/overlay``), fed from the datastore's hosts
and blocks; on a host alone the bridge is all there is."""

from __future__ import annotations

from plexus.dataplane.drivers.bridge import BridgeDriver
from plexus.model.drivers import DRIVERS


class OverlayDriver(BridgeDriver):
    traits = DRIVERS["overlay"]

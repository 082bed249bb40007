"""VXLAN overlay networks spanning hosts: the kernel half (issue 9).

Design notes
------------
The L3 model of flannel's and Calico's VXLAN backends. Per overlay network, on each host:

- the network's Linux bridge (the bridge driver's ``pxbr-..``) with one gateway address per
  block this host holds (a block: a /26 by default, claimed per host from the network's pool);
  containers get their address with the block's prefix and a default route via its gateway,
  so everything to other blocks is routed by the host. (The agent does so for IPv6; for IPv4
  it gives containers the subnet's prefix and one anycast gateway on every host, with proxy ARP
  on the bridge: ``dataplane/drivers/overlay.py``. This module works the same either way: it
  routes blocks.);
- one VXLAN device ``pxvx-..`` (``model.device_name``): the network's VNI, ``local`` = this
  host's underlay address, UDP port 4789, no learning, no group or remote (so no flooding: a
  frame without an FDB entry is dropped), MTU = underlay MTU - 50 (- 70 over an IPv6 underlay),
  no IPv6 link-local address, and a MAC derived from (node, VNI) (``model.vtep_mac``);
- the device holds this host's VTEP address per IP version: the network address of its lowest
  block (``model.vtep_addresses``), /32 or /128. Another host routes a block of ours via that
  address; our own packets to other blocks take it as their source, which the other hosts route
  back through the overlay;
- per remote host holding blocks: one FDB entry (its VTEP MAC -> its underlay address), one
  permanent neighbour per IP version (its VTEP address -> its VTEP MAC) and one route per block
  (``BLOCK via VTEP dev pxvx-.. onlink proto 112``). Nothing per container: the kernel state of
  a host grows with the hosts and blocks of the network.

Why permanent neighbours and FDB entries from the datastore rather than learning or L2/L3 miss
notifications (flannel's first VXLAN design): nothing to answer at packet time, no flooding,
and a restarted agent finds the kernel still forwarding. Why derived MACs: a host's entries
are computed from the datastore's host list alone (flannel stores its MAC in the lease; with a
derived one there is nothing to keep in step).

Modules: ``model`` (types and derivations), ``render`` (pure: desired state, diff), ``wire``
(netlink messages), ``channel`` (a blocking netlink socket: dumps and batches), ``ethtool``
(tx checksum offload), ``apply`` (reads and applies).
"""

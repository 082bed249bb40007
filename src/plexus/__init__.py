"""plexus: container networking for Linux.

The kernel is the dataplane; plexus is the control plane.
"""

__version__ = "0.1.0"

"""Test doubles shipped as real, typed code (as trio.testing does): in-memory fakes of the seams
that unit tests swap in (``MemoryStore`` is the datastore's, in ``plexus.store``). Harnesses
that drive other programs (dockerd, Podman, containerd) live with the tests, in tests/harness."""

from plexus.testing.dataplane import FakeDriver, FakeHost, FakeKernel, fake_drivers
from plexus.testing.firewall import FakeFirewall

__all__ = ["FakeDriver", "FakeFirewall", "FakeHost", "FakeKernel", "fake_drivers"]

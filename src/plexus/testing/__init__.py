"""Test doubles shipped as real, typed code (as trio.testing does): fakes of the seams that unit
tests swap in. Harnesses that drive other programs (dockerd, Podman, containerd) live with the
tests, in tests/harness."""

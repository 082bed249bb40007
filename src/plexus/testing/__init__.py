"""Test doubles and a sandbox world, shipped as real typed code for tests, the demo and bench."""

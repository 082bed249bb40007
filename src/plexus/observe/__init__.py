"""Observability: what the network does, told from the kernel (``verify``: does the kernel do
what the model says)."""

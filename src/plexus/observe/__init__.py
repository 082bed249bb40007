"""Observability: flow log, metrics, web view, verify."""

"""What the agent tells about itself: Prometheus metrics, the flow log and
``plexus verify`` (does the kernel do what the model says) now; the web view as it lands.

    agent state (cache, reconcilers, DNS, kernel counters) ──read at scrape time──▶ collectors
    front doors, store ──observe one duration per request──▶ timing.Timings ──▶ collectors
    collectors ──▶ registry ──▶ GET /metrics on the opt-in TCP listener (``server``)

Collectors read what the agent already keeps when Prometheus asks, so nothing is updated on every
change; the only per-request work is one histogram observation (``timing``).
"""

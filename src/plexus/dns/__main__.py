"""``python -m plexus.dns``: one DNS worker process (started by ``WorkerPool``, never by hand)."""

from plexus.dns.workers import main

main()

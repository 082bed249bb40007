"""The agent's view of desired state and how far the kernel has got with it.

    cache.py      the one read-only view of desired state, fed by the informer
    work.py       the reconcilers' common part: work queue, retries, errors, progress
    progress.py   waiting until a transaction is working ("done means working")

Services read the cache and wait on progress; reconcilers (``plexus.agent.reconcilers``) read
the cache and report progress. Neither writes the cache: only the datastore's watch does.
"""

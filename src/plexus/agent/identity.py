"""Which agent made a kernel object: the owner token an agent tags its links with.

``NODE@STOREID8``: the node's name and the first 8 hex digits of the datastore's id, a random
id the first agent to open the store writes once (``keys.STORE_ID``). The same state directory
(the same store) gives the same token after every restart, so a restarted agent adopts its own
links and changes nothing; another store (another state directory on the same host, or another
cluster's etcd) gives another, so its agent never takes these links for its orphans. On a shared
store the node's name tells the hosts apart. ``dataplane/links.py`` has the alias format.
"""

from __future__ import annotations

import secrets

from plexus.model import keys
from plexus.store.base import Compare, Datastore, Get, Put

STORE_ID_DIGITS = 8  # in the token: 32 bits tell apart the few stores one host ever sees


async def store_id(store: Datastore) -> str:
    """The datastore's id, made now if it has none (one transaction: of two agents opening a
    new store at once, one writes it and both read the same)."""
    fresh = secrets.token_hex(16)
    result = await store.txn([Compare.absent(keys.STORE_ID)], [Put(keys.STORE_ID, fresh)],
                             [Get(keys.STORE_ID)])
    return fresh if result.succeeded else result.responses[0][0].value


def owner_token(node: str, store: str) -> str:
    return f"{node}@{store[:STORE_ID_DIGITS]}"


async def agent_owner(store: Datastore, node: str) -> str:
    """The token the agent of ``node`` on ``store`` tags its kernel objects with."""
    return owner_token(node, await store_id(store))

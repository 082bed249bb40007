"""Every link an agent makes carries its owner token in the alias (``plexus:OWNER:KIND:NAME``):
the format, the legacy form of agents before owners, and the token made once per datastore."""

from __future__ import annotations

import pytest

from plexus.agent import identity
from plexus.dataplane import links
from plexus.errors import DataplaneError
from plexus.model import keys
from plexus.store import MemoryStore

ME = "host1@0a1b2c3d"


@pytest.mark.parametrize(("raw", "split"), [
    ("plexus:host1@0a1b2c3d:net:web", ("host1@0a1b2c3d", "net:web")),
    ("plexus:host1@0a1b2c3d:ep:c1/eth0", ("host1@0a1b2c3d", "ep:c1/eth0")),
    ("plexus:host2@ffffffff:ep:c1/eth0", ("host2@ffffffff", "ep:c1/eth0")),
    # A node's name is not validated: whatever it holds, the owner is all before KIND.
    ("plexus:a:b@0a1b2c3d:net:web", ("a:b@0a1b2c3d", "net:web")),
    ("plexus:net@0a1b2c3d:net:web", ("net@0a1b2c3d", "net:web")),
    # Legacy: written by an agent before owners.
    ("plexus:net:web", (None, "net:web")),
    ("plexus:ep:c1/eth0", (None, "ep:c1/eth0")),
])
def test_split_reads_owner_and_alias(raw: str, split: tuple[str | None, str]) -> None:
    assert links.split(raw) == split
    assert links.tag(*split) == raw  # the inverse
    assert links.untag(raw) == split[1]


@pytest.mark.parametrize("raw", [None, "", "eth0 uplink", "PLEXUS:net:web", "plexus:",
                                 "plexus:web", "plexus:net:", "plexus::net:web",
                                 "plexus:h@1:vxlan:x", "xplexus:net:web"])
def test_split_ignores_what_plexus_does_not_write(raw: str | None) -> None:
    assert links.split(raw) is None
    assert links.untag(raw) is None
    assert not links.is_owned(raw, ME)


def test_a_link_is_owned_when_tagged_by_this_agent_or_legacy() -> None:
    assert links.is_owned(links.tag(ME, "net:web"), ME)
    assert links.is_owned("plexus:net:web", ME)
    assert not links.is_owned(links.tag("host1@ffffffff", "net:web"), ME)
    assert not links.is_owned(links.tag("host2@0a1b2c3d", "net:web"), ME)


def test_another_agents_link_is_refused_by_name_and_owner() -> None:
    links.check_owner("pxbr-1", None, ME)  # legacy, or no alias at all: taken
    links.check_owner("pxbr-1", ME, ME)
    with pytest.raises(DataplaneError, match=r"link pxbr-1 belongs to another plexus agent "
                                             r"\(host1@ffffffff\)"):
        links.check_owner("pxbr-1", "host1@ffffffff", ME)


def test_the_longest_alias_fits_the_kernels_limit() -> None:
    # IFALIASZ is 256 with the NUL: container ids are at most 128, ifnames 15, host names 64.
    longest = links.tag(f"{'h' * 64}@0a1b2c3d", f"ep:{'c' * 128}/{'i' * 15}")
    assert len(longest.encode()) < 256


async def test_the_store_id_is_made_once_and_kept() -> None:
    store = MemoryStore()
    first = await identity.store_id(store)
    revision = await store.revision()
    assert await identity.store_id(store) == first
    assert await store.revision() == revision  # a restart writes nothing
    kv = await store.get(keys.STORE_ID)
    assert kv is not None and kv.value == first
    assert await identity.agent_owner(store, "host1") == f"host1@{first[:8]}"


async def test_two_stores_give_two_owners() -> None:
    owners = {await identity.agent_owner(MemoryStore(), "host1") for _ in range(5)}
    assert len(owners) == 5

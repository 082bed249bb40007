"""Pure address arithmetic."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.errors import Exhausted, InvalidArgument
from plexus.ipam import allocator

NET = ipaddress.ip_network("10.0.0.0/29")


def test_sequential_from_the_cursor_and_wrapping() -> None:
    a = allocator.next_free(NET, NET, [], None)
    assert str(a) == "10.0.0.1"
    b = allocator.next_free(NET, NET, [a], a)
    assert str(b) == "10.0.0.2"
    # .6 is the last host; after it the search wraps to the start
    last = ipaddress.ip_address("10.0.0.6")
    assert str(allocator.next_free(NET, NET, [last], last)) == "10.0.0.1"


def test_a_freed_address_is_not_handed_straight_back() -> None:
    taken = [ipaddress.ip_address(f"10.0.0.{i}") for i in (1, 3)]
    cursor = ipaddress.ip_address("10.0.0.3")  # .2 was just freed
    assert str(allocator.next_free(NET, NET, taken, cursor)) == "10.0.0.4"


def test_exhaustion_names_the_pool() -> None:
    taken = [ipaddress.ip_address(f"10.0.0.{i}") for i in range(1, 7)]
    with pytest.raises(Exhausted, match="10.0.0.0/29"):
        allocator.next_free(NET, NET, taken, None)


def test_ip_range_limits_allocation() -> None:
    net = ipaddress.ip_network("10.0.0.0/24")
    rng = ipaddress.ip_network("10.0.0.128/25")
    assert str(allocator.next_free(net, rng, [], None)) == "10.0.0.128"


def test_static_address_checks() -> None:
    with pytest.raises(InvalidArgument, match="not in subnet"):
        allocator.check_static(NET, ipaddress.ip_address("10.0.1.1"), [])
    with pytest.raises(InvalidArgument, match="reserved"):
        allocator.check_static(NET, ipaddress.ip_address("10.0.0.7"), [])
    with pytest.raises(InvalidArgument, match="already in use"):
        allocator.check_static(
            NET, ipaddress.ip_address("10.0.0.2"), [ipaddress.ip_address("10.0.0.2")]
        )


def test_pick_subnet_avoids_everything_taken() -> None:
    pool = ipaddress.ip_network("10.89.0.0/16")
    avoid = [ipaddress.ip_network("10.89.0.0/24"), ipaddress.ip_network("10.89.1.7/32")]
    assert str(allocator.pick_subnet(pool, 24, avoid)) == "10.89.2.0/24"
    with pytest.raises(Exhausted):
        allocator.pick_subnet(ipaddress.ip_network("10.89.0.0/23"), 24, avoid)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.integers(min_value=24, max_value=30),
    taken_idx=st.sets(st.integers(min_value=0, max_value=255)),
    cursor_idx=st.one_of(st.none(), st.integers(min_value=0, max_value=255)),
)
def test_next_free_never_returns_taken_or_reserved(
    prefix: int, taken_idx: set[int], cursor_idx: int | None
) -> None:
    net = ipaddress.ip_network(f"10.1.0.0/{prefix}")
    size = net.num_addresses
    taken = [net.network_address + (i % size) for i in taken_idx]
    cursor = None if cursor_idx is None else net.network_address + (cursor_idx % size)
    try:
        got = allocator.next_free(net, net, taken, cursor)
    except Exhausted:
        assert set(taken) | allocator.unusable(net) >= set(net)
        return
    assert got in net
    assert got not in taken
    assert got not in allocator.unusable(net)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=255), max_size=20))
def test_picked_subnets_never_overlap(order: list[int]) -> None:
    pool = ipaddress.ip_network("10.89.0.0/16")
    picked: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for _ in order:
        picked.append(allocator.pick_subnet(pool, 24, picked))
    assert all(not a.overlaps(b) for i, a in enumerate(picked) for b in picked[i + 1 :])

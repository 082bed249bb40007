"""Counters as plain data: histograms and the merge of several worker processes' stats."""

from __future__ import annotations

from collections import Counter

from plexus.dns.metrics import Histogram, merge_stats, nested


def test_histogram_buckets_are_cumulative_in_to_dict() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0005, 0.002, 0.002, 0.5):
        h.observe(v)
    d = h.to_dict()
    assert d["buckets"] == [(0.001, 1), (0.01, 3), (0.1, 3), ("+Inf", 4)]
    assert d["count"] == 4 and abs(d["sum"] - 0.5045) < 1e-9
    assert h.quantile(0.5) == 0.01 and h.quantile(1.0) == float("inf")
    assert Histogram().quantile(0.99) == 0.0


def test_histogram_merge_round_trips() -> None:
    a, b = Histogram(), Histogram()
    for v in (0.0001, 0.003, 0.2):
        a.observe(v)
    b.merge(a.to_dict())
    b.merge(a.to_dict())
    assert b.count == 6 and b.counts == [2 * n for n in a.counts]


def test_merge_stats_adds_numbers_and_merges_nested_dicts() -> None:
    h = Histogram()
    h.observe(0.002)
    one = {"queries": {"udp": 3, "tcp": 1}, "responses": {"A": {"NOERROR": 2}},
           "upstreams": {"x": {"healthy": True, "latency_seconds": h.to_dict()}},
           "listeners": ["front 10.0.0.1:53"]}
    two = {"queries": {"udp": 4, "tcp": 0}, "responses": {"A": {"NXDOMAIN": 1}},
           "upstreams": {"x": {"healthy": False, "latency_seconds": h.to_dict()}},
           "listeners": ["front 10.0.0.1:53"]}
    merged = merge_stats([one, two])
    assert merged["queries"] == {"udp": 7, "tcp": 1}
    assert merged["responses"] == {"A": {"NOERROR": 2, "NXDOMAIN": 1}}
    assert merged["upstreams"]["x"]["healthy"] is False
    assert merged["upstreams"]["x"]["latency_seconds"]["count"] == 2
    assert merged["listeners"] == ["front 10.0.0.1:53"] * 2
    assert merge_stats([]) == {}
    assert one["queries"] == {"udp": 3, "tcp": 1}  # inputs untouched


def test_nested_counter() -> None:
    c: Counter[tuple[str, str]] = Counter({("A", "NOERROR"): 2, ("AAAA", "NOERROR"): 1})
    assert nested(c) == {"A": {"NOERROR": 2}, "AAAA": {"NOERROR": 1}}

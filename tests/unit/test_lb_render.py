"""The services table's renderers and placement: the elements a frontend becomes, and that a
change touches only what differs (the kernel's view: tests/integration/test_lb_dataplane.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from plexus.dataplane.nft import lb
from plexus.dataplane.nft.lb_slots import Placement, Plan
from plexus.errors import DataplaneError
from plexus.lb.model import Backend, Change, Frontend, Published, diff, index

ip = ipaddress.ip_address


def backends(*addrs: str, port: int = 80) -> tuple[Backend, ...]:
    return tuple(Backend(ip(a), port) for a in addrs)


WEB = Frontend("ns/web", "http", "tcp", ip("10.96.0.1"), 80,
               backends("10.1.0.2", "10.1.0.3", "10.1.0.4"),
               published=(Published(None, 8080),))
STICKY = Frontend("ns/sticky", "", "tcp", ip("10.96.0.2"), 80, backends("10.1.0.2", "10.1.0.3"),
                  affinity=600)
EMPTY = Frontend("ns/empty", "", "udp", ip("10.96.0.3"), 53,
                 published=(Published(ip("203.0.113.1"), 5353),))
V6 = Frontend("ns/six", "", "tcp", ip("fd96::1"), 443, backends("fd01::2", port=8443))
ALL = (WEB, STICKY, EMPTY, V6)


def placed(*frontends: Frontend) -> Placement:
    p = Placement()
    p.commit(p.everything(frontends))
    return p


def touched(plan: Plan) -> dict[tuple[str, bool], set[object]]:
    return {(c.set, c.add): set(c.elements) for c in plan.elements}


# -- a frontend's elements -------------------------------------------------------------------


def test_a_frontend_is_its_keys_slots_and_backends() -> None:
    p = placed(*ALL)
    web = p.held[WEB.key]
    mark = web.mark
    assert mark == lb.OURS | web.fid << lb.ID_SHIFT | 2  # no affinity, 3 backends
    e = web.elements()
    assert e["vips4"] == {(lb.packed(WEB.vip), "tcp", 80): mark}
    assert e["ports4"] == {("tcp", 8080): mark}
    assert sorted(e["slots"]) == [(web.fid << lb.ID_SHIFT, i) for i in range(3)]
    assert sorted(e["backends4"].values()) == [(b.address.packed, 80) for b in WEB.backends]


def test_without_backends_a_frontend_is_refused_not_drawn() -> None:
    e = placed(EMPTY).held[EMPTY.key].elements()
    assert set(e) == {"noep4"}  # a published address: another key of the same set
    assert set(e["noep4"]) == {(EMPTY.vip.packed, "udp", 53),
                               (ip("203.0.113.1").packed, "udp", 5353)}


def test_affinity_has_a_class_and_its_own_chain() -> None:
    p = placed(*ALL)
    sticky = p.held[STICKY.key]
    assert sticky.klass == 1 and sticky.pick == (2, 600)
    assert p.picks == {2, 1 | 1 << lb.CLASS_SHIFT, 0}  # pick_3, pick_2_aff_600, pick_1
    assert p.chains == {(3, 0), (2, 600), (1, 0)}
    text = lb.render_pick(2, 600)
    assert "update @aff4 { meta mark & 0x7fffc000 . ip saddr timeout 600s : ct mark }" in text
    assert "jhash ip saddr mod 2" in text and "numgen" not in text  # first connections agree
    assert "numgen random mod 3" in lb.render_pick(3, 0)


def test_the_body_declares_every_set_and_hooks_last() -> None:
    body = lb.render_body(hooked=False)
    for name in lb.SETS:
        assert f" {name} {{ type " in body or f" {name} {{ typeof " in body
    assert "hook" not in body
    assert "flags timeout; size" in body and lb.LAYOUT in body
    assert lb.render_hooks().count("hook") == 6


# -- changes ---------------------------------------------------------------------------------


def test_a_new_backend_is_one_slot_one_backend_and_a_new_number() -> None:
    p = placed(*ALL)
    more = replace(WEB, backends=backends("10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5"))
    plan = p.plan(diff(index([WEB]), index([more])))
    t = touched(plan)
    fid = p.held[WEB.key].fid << lb.ID_SHIFT
    assert t[("slots", True)] == {(fid, 3)}
    assert len(t[("backends4", True)]) == 1
    # The frontend's number says 4 backends now: its two keys are written again.
    assert t[("vips4", False)] == t[("vips4", True)] == {(WEB.vip.packed, "tcp", 80)}
    assert t[("ports4", True)] == {("tcp", 8080)}
    assert plan.chains == [(4, 0)] and plan.dead == set()
    assert not any(c.set.startswith(("vips6", "noep")) for c in plan.elements)


def test_a_leaving_backend_frees_its_slot_for_the_last_one() -> None:
    p = placed(*ALL)
    before = dict(p.held[WEB.key].slots)
    fewer = replace(WEB, backends=backends("10.1.0.3", "10.1.0.4"))  # .2 (slot 0) leaves
    plan = p.plan(diff(index([WEB]), index([fewer])))
    p.commit(plan)
    after = p.held[WEB.key].slots
    assert [b.address for _, b in after] == [ip("10.1.0.4"), ip("10.1.0.3")]
    assert all(before[n] == b for n, b in after)  # numbers kept
    assert plan.dead == {n for n, b in before.items() if b.address == ip("10.1.0.2")}


def test_an_unchanged_state_needs_nothing_and_removal_frees_the_id() -> None:
    p = placed(*ALL)
    assert p.plan(diff(index(ALL), index(ALL))).elements == []
    fid = p.held[V6.key].fid
    plan = p.plan(Change((V6,), ()))
    assert {c.set for c in plan.elements} == {"vips6", "slots", "backends6"}
    assert all(not c.add for c in plan.elements)
    p.commit(plan)
    assert V6.key not in p.held and fid in p.free_ids


def test_a_plan_takes_nothing_until_it_is_committed() -> None:
    """What the applier relies on when the kernel refuses a plan's transaction."""
    p = placed(*ALL)
    before = (dict(p.held), set(p.chains), set(p.picks), dict(p.classes), list(p.free_ids),
              p.next_backend, p.next_id)
    p.plan(Change((V6,), (replace(WEB, backends=backends("10.9.0.1")),
                          replace(STICKY, vip=ip("10.96.0.9"), affinity=60))))
    assert (dict(p.held), set(p.chains), set(p.picks), dict(p.classes), list(p.free_ids),
            p.next_backend, p.next_id) == before


def test_the_expected_key_counts_follow_the_frontends() -> None:
    p = placed(*ALL)
    assert p.keys() == {"vips4": 2, "vips6": 1, "ports4": 1, "ports6": 0,
                        "noep4": 2, "noep6": 0, "noports4": 0, "noports6": 0}


def test_more_than_fifteen_affinity_timeouts_is_an_error() -> None:
    many = [replace(STICKY, vip=ip(f"10.96.1.{i}"), affinity=100 + i) for i in range(16)]
    with pytest.raises(DataplaneError, match="affinity timeouts"):
        Placement().everything(many)


def test_a_frontend_uses_at_most_the_first_backends() -> None:
    huge = replace(WEB, backends=tuple(Backend(ip(f"10.2.{i // 200}.{i % 200 + 1}"), 80)
                                       for i in range(lb.MAX_BACKENDS + 5)))
    p = placed(huge)
    assert len(p.held[huge.key].slots) == lb.MAX_BACKENDS

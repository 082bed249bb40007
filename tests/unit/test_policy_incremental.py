"""The compiler's answers to changes, one at a time, add up to what compiling everything again
gives, and each delta it hands out turns what was applied into what it holds."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from plexus.model.types import Endpoint
from plexus.policy import documents
from plexus.policy.compile import OUTCOMES, Compiler, Inputs
from plexus.policy.identity import Key
from plexus.policy.journal import Delta, Sets
from plexus.policy.model import Policy
from tests.policy_cases import ALL, CASES
from tests.unit.test_policy_truth import _addresses, _endpoint

NAMESPACES = {ns: {"ns": ns} for ns in ("x", "y", "z")}


def _canonical(c: Compiler) -> dict[str, set[object]]:
    """The sets with identity and outcome numbers replaced by what they stand for."""
    of: dict[int, Key] = {n: k for k, n in c.numbers._of.items()}
    verdicts = c.sets[OUTCOMES]

    def ident(v: object) -> object:
        return of.get(v, v) if isinstance(v, int) else v

    out: dict[str, set[object]] = {}
    for name, elems in c.sets.items():
        found: set[object] = set()
        for k, d in elems.items():
            if name.endswith(("_port", "_range", "_proto", "_any")):
                assert isinstance(k, tuple)
                k = (ident(k[0]), ident(k[1]), *k[2:])
            elif name.endswith(("_wport", "_wrange", "_wproto")):
                assert isinstance(k, tuple)
                k = (ident(k[0]), *k[1:])
            elif name.endswith("_default"):
                k = ident(k)
            if name.startswith(("ep", "world")):
                d = ident(d)
            elif name.startswith(("eg_", "in_")):
                d = verdicts[d]
            elif name == OUTCOMES:
                k = None
            found.add((repr(k), repr(d)))
        out[name] = found
    return out


def _apply(shadow: Sets, delta: Delta) -> None:
    for name, gone in delta.removed.items():
        for k, d in gone.items():
            assert shadow[name].pop(k) == d, (name, k)
    for name, came in delta.added.items():
        for k, d in came.items():
            assert k not in shadow[name], (name, k)
            shadow[name][k] = d


def _policies(names: list[str]) -> list[Policy]:
    text = "\n---\n".join(c.text(_addresses()) for c in CASES if c.name in names)
    return documents.load(text) if text else []


@pytest.mark.parametrize("seed", range(10))
def test_changes_one_by_one_add_up_to_compiling_everything(seed: int) -> None:
    rnd = random.Random(seed)
    endpoints: dict[str, Endpoint] = {n: _endpoint(n) for n in ALL}
    chosen = rnd.sample([c.name for c in CASES], 2)
    live = Compiler()
    shadow: Sets = {n: {} for n in live.sets}
    _apply(shadow, live.compile(Inputs(_policies(chosen), NAMESPACES, endpoints, "n1")))
    for step in range(25):
        what = rnd.choice(["label", "label", "remove", "add", "policies"])
        if what == "policies":
            chosen = rnd.sample([c.name for c in CASES],
                                rnd.randint(0, 3))
            delta = live.policies(_policies(chosen))
        else:
            name = rnd.choice(ALL)
            if what in ("remove", "add"):
                ep: Endpoint | None = None if name in endpoints else _endpoint(name)
            else:
                base = endpoints.get(name) or _endpoint(name)
                ep = replace(base, labels={"pod": rnd.choice("abcd")})
            if ep is None:
                endpoints.pop(name, None)
            else:
                endpoints[name] = ep
            delta = live.endpoint(name, ep)
        _apply(shadow, delta)
        assert shadow == live.sets, f"step {step}: the deltas do not add up"
        fresh = Compiler()
        fresh.compile(Inputs(_policies(chosen), NAMESPACES, dict(endpoints), "n1"))
        assert _canonical(live) == _canonical(fresh), f"step {step} ({what})"

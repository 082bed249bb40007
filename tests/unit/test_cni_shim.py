"""The CNI shim's own JSON codec and name rules (it avoids the json and re modules for speed)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexus.cni import shim

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_codec_agrees_with_the_json_module(value: Any) -> None:
    assert json.loads(shim.dumps(value)) == value
    assert shim.loads(json.dumps(value)) == value
    assert shim.loads("  \n" + json.dumps(value, indent=2) + "\n") == value


@pytest.mark.parametrize("text", ["", "{", "{} x", "[1,]", "nul", "{'a': 1}"])
def test_malformed_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        shim.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_name_rule_is_the_spec_regex(name: str) -> None:
    # fullmatch: with re.match, "$" also matches before a trailing newline, which the spec's
    # (Go) regex does not.
    spec = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
    assert shim.valid_name(name) == bool(spec.fullmatch(name))


@pytest.mark.parametrize(("name", "valid"), [("eth0", True), ("a.b-c_d", True), ("", False),
                                             ("-x", False), ("eth0\n", False), ("é", False)])
def test_name_rule_examples(name: str, valid: bool) -> None:
    assert shim.valid_name(name) is valid

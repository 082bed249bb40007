"""Label selectors, as apimachinery defines them, shared by every kind of policy.

``matchLabels`` and ``matchExpressions`` are ANDed; an empty selector selects everything. The
operators: ``In`` needs the key with one of the values, ``NotIn`` matches when the key is absent
or has none of the values, ``Exists``/``DoesNotExist`` test only the key's presence. ``In`` and
``NotIn`` need at least one value; ``Exists`` and ``DoesNotExist`` take none (the API server's
validation, applied here since documents do not pass through one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from plexus.errors import InvalidArgument

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist

    def describe(self) -> str:
        if self.operator in ("Exists", "DoesNotExist"):
            return self.key if self.operator == "Exists" else f"!{self.key}"
        op = "in" if self.operator == "In" else "notin"
        return f"{self.key} {op} ({','.join(sorted(self.values))})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed selector. Hashable, so that equal selectors of different policies are one set
    in the compiled form."""

    labels: tuple[tuple[str, str], ...] = ()
    requirements: tuple[Requirement, ...] = ()

    @property
    def everything(self) -> bool:
        return not self.labels and not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.labels)
                and all(r.matches(labels) for r in self.requirements))

    def describe(self) -> str:
        """The selector in kubectl's ``-l`` syntax; ``{}`` for everything."""
        parts = [f"{k}={v}" for k, v in self.labels] + [r.describe() for r in self.requirements]
        return ",".join(parts) or "{}"


EVERYTHING = LabelSelector()


def match_labels(labels: Mapping[str, str]) -> LabelSelector:
    return LabelSelector(labels=tuple(sorted(labels.items())))


def parse(field: str, raw: Any, sources: tuple[str, ...] = ()) -> LabelSelector:
    """A selector from its document form; InvalidArgument naming ``field`` (a path such as
    ``spec.podSelector``) on anything the API server would refuse. ``sources``: prefixes a key
    may carry (Cilium's ``k8s:``), kept in the key for the caller to interpret."""
    if raw is None:
        return EVERYTHING
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "a label selector is a mapping")
    unknown = set(raw) - {"matchLabels", "matchExpressions"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidArgument(f"{field}.{name}", raw[name], "unknown field of a label selector")
    labels = _labels(f"{field}.matchLabels", raw.get("matchLabels") or {}, sources)
    exprs = raw.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise InvalidArgument(f"{field}.matchExpressions", exprs, "a list of expressions")
    reqs = tuple(_requirement(f"{field}.matchExpressions[{i}]", e, sources)
                 for i, e in enumerate(exprs))
    return LabelSelector(labels=tuple(sorted(labels.items())), requirements=reqs)


def _labels(field: str, raw: Any, sources: tuple[str, ...]) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "a mapping of label keys to values")
    out: dict[str, str] = {}
    for key, value in raw.items():
        check_key(field, key, sources)
        if not isinstance(value, (str, int, bool)) or isinstance(value, bool):
            raise InvalidArgument(f"{field}.{key}", value, "a label value is a string")
        out[str(key)] = str(value)
    return out


def _requirement(field: str, raw: Any, sources: tuple[str, ...]) -> Requirement:
    if not isinstance(raw, dict):
        raise InvalidArgument(field, raw, "an expression is a mapping (key, operator, values)")
    key, op, values = raw.get("key"), raw.get("operator"), raw.get("values")
    check_key(f"{field}.key", key, sources)
    if op not in OPERATORS:
        raise InvalidArgument(f"{field}.operator", op, f"one of {', '.join(OPERATORS)}")
    if values is not None and not isinstance(values, list):
        raise InvalidArgument(f"{field}.values", values, "a list of strings")
    vals = frozenset(str(v) for v in values or [])
    if op in ("In", "NotIn") and not vals:
        raise InvalidArgument(f"{field}.values", values, f"operator {op} needs at least one value")
    if op in ("Exists", "DoesNotExist") and vals:
        raise InvalidArgument(f"{field}.values", values, f"operator {op} takes no values")
    return Requirement(str(key), str(op), vals)


def check_key(field: str, key: Any, sources: tuple[str, ...] = ()) -> None:
    """A label key: an optional DNS-subdomain prefix and ``/``, then a name of up to 63
    characters."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument(field, key, "a label key is a non-empty string")
    for source in sources:
        key = key.removeprefix(source)
    name = key.rsplit("/", 1)[-1]
    if not name or len(name) > 63 or not (name[0].isalnum() and name[-1].isalnum()) or any(
            not (c.isalnum() or c in "-_.") for c in name):
        raise InvalidArgument(field, key, "not a valid label key")

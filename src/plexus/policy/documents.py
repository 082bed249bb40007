"""Policy documents (``plexus policy apply -f``) to the policy model: multi-document YAML or
JSON, every document checked before any is applied, so that a file applies whole or not at all.

An error names the document (its place in the file, kind and name), the field and the value, in
one line. Documents are kept as given (``Policy.document``) for ``plexus policy get``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import yaml

from plexus.errors import InvalidArgument
from plexus.policy import admin, cilium, k8s
from plexus.policy.model import AUDIT_ANNOTATION, Policy

KINDS = {
    (k8s.API_VERSION, k8s.KIND): "namespaced",
    (cilium.API_VERSION, cilium.KIND): "namespaced",
    (admin.API_VERSION, admin.ADMIN): "cluster",
    (admin.API_VERSION, admin.BASELINE): "cluster",
}
DEFAULT_NAMESPACE = "default"
T = TypeVar("T")


class InvalidDocument(InvalidArgument):
    """A document of a policy file that cannot be applied: which one, and why."""

    def __init__(self, where: str, cause: InvalidArgument) -> None:
        super().__init__(cause.field, cause.value, cause.message.split(": ", 1)[-1])
        self.message = f"{where}: {cause.message}"
        self.args = (self.message,)


def load(text: str, source: str = "-") -> list[Policy]:
    """Every policy of a file, or InvalidDocument for the first that is wrong."""
    docs = split(text, source)
    policies = [_one(i + 1, d, source) for i, d in enumerate(docs)]
    no_duplicates(policies, source)
    return policies


def split(text: str, source: str = "-") -> list[Any]:
    """The documents of a YAML or JSON file (a ``kind: List`` stands for its items)."""
    try:
        raw = [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidArgument("file", f"{source}{line}", f"not YAML or JSON: {problem}") from None
    return _flatten(raw)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _flatten(raw: list[Any]) -> list[Any]:
    """A ``kind: List`` (as ``kubectl get -o yaml`` writes) stands for its items."""
    out: list[Any] = []
    for d in raw:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            out += d["items"]
        else:
            out.append(d)
    return out


def _one(index: int, doc: Any, source: str) -> Policy:
    return one(index, doc, source, parse)


def one(index: int, doc: Any, source: str, parser: Callable[[dict[str, Any]], T]) -> T:
    """``parser(doc)``, its error naming the document (place, kind, name): InvalidDocument."""
    where = f"{source} document {index}"
    try:
        if not isinstance(doc, dict):
            raise InvalidArgument("document", doc,
                                  "a mapping with apiVersion, kind, metadata, spec")
        where += f" ({doc.get('kind')} {_name_of(doc)})"
        return parser(doc)
    except InvalidDocument:
        raise
    except InvalidArgument as exc:
        raise InvalidDocument(where, exc) from None


def _name_of(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    name = str(meta.get("name", "?"))
    return f"{meta['namespace']}/{name}" if meta.get("namespace") else name


def parse(doc: dict[str, Any]) -> Policy:
    """One document to the model; InvalidArgument naming the field."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    scope = KINDS.get((api, kind))  # type: ignore[arg-type]
    if scope is None:
        known = ", ".join(f"{a} {k}" for a, k in KINDS)
        field, value = ("kind", kind) if kind not in {k for _, k in KINDS} else ("apiVersion", api)
        raise InvalidArgument(field, value, f"plexus applies {known}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise InvalidArgument("metadata", meta, "required: a mapping with a name")
    name = dns_label("metadata.name", meta.get("name"))
    namespace = "" if scope == "cluster" else dns_label(
        "metadata.namespace", meta.get("namespace") or DEFAULT_NAMESPACE)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise InvalidArgument("spec", spec, "required: a mapping")
    audit = _audit(meta)
    if kind == k8s.KIND:
        policy = k8s.parse(namespace, name, spec, audit)
    elif kind == cilium.KIND:
        policy = cilium.parse(namespace, name, spec, audit)
    else:
        policy = admin.parse(str(kind), name, spec, audit)
    return _with_document(policy, doc)


def _with_document(policy: Policy, doc: dict[str, Any]) -> Policy:
    return replace(policy, document=doc)


def _audit(meta: dict[str, Any]) -> bool:
    notes = meta.get("annotations") or {}
    value = notes.get(AUDIT_ANNOTATION) if isinstance(notes, dict) else None
    if value is None:
        return False
    if str(value).lower() not in ("true", "false"):
        field = f"metadata.annotations.{AUDIT_ANNOTATION}"
        raise InvalidArgument(field, value, '"true" or "false"')
    return str(value).lower() == "true"


def dns_label(field: str, raw: Any) -> str:
    """A namespace or policy name: lowercase letters, digits, '-' and '.', at most 253."""
    ok = (isinstance(raw, str) and 0 < len(raw) <= 253 and raw[0].isalnum() and raw[-1].isalnum()
          and all(c.islower() or c.isdigit() or c in "-." for c in raw))
    if not ok:
        raise InvalidArgument(field, raw, "a name of lowercase letters, digits, '-' and '.'")
    assert isinstance(raw, str)
    return raw


def no_duplicates(policies: list[Policy], source: str) -> None:
    seen: set[tuple[str, str, str]] = set()
    for p in policies:
        key = (p.kind, p.namespace, p.name)
        if key in seen:
            raise InvalidArgument("file", source, f"{p.kind} {p.ref} appears twice")
        seen.add(key)

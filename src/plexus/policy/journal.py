"""The compiled elements and the journal of what a change did to them (``Delta``): every put
and drop of ``Journal`` is recorded, and a put that restores what a drop of the same change took
cancels out, so the delta holds only what the kernel must change."""

from __future__ import annotations

from dataclasses import dataclass, field

Sets = dict[str, dict[object, object]]  # set name -> element -> data (None for a plain set)


@dataclass
class Delta:
    removed: Sets = field(default_factory=dict)
    added: Sets = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.removed.values()) or any(self.added.values())


_MISSING = object()


class Journal:
    """Element sets with the journal of the current change."""

    def __init__(self, names: list[str]) -> None:
        self.sets: Sets = {name: {} for name in names}
        self._delta = Delta()

    def _put(self, name: str, elem: object, data: object) -> None:
        s = self.sets[name]
        if elem in s:
            if s[elem] == data:
                return
            self._drop(name, elem)
        s[elem] = data
        removed = self._delta.removed.get(name, {})
        if removed.get(elem, _MISSING) == data:
            del removed[elem]  # put back as it was: no change at all
        else:
            self._delta.added.setdefault(name, {})[elem] = data

    def _drop(self, name: str, elem: object) -> None:
        s = self.sets[name]
        if elem not in s:
            return
        data = s.pop(elem)
        added = self._delta.added.get(name, {})
        if elem in added:
            del added[elem]  # added in this same change: it never reached the kernel
        else:
            self._delta.removed.setdefault(name, {})[elem] = data

    def _take(self) -> Delta:
        delta, self._delta = self._delta, Delta()
        return delta


def diff(old: Sets, new: Sets) -> Delta:
    """What turns ``old`` into ``new``."""
    delta = Delta()
    for name in set(old) | set(new):
        a, b = old.get(name, {}), new.get(name, {})
        gone = {k: v for k, v in a.items() if b.get(k, _MISSING) != v}
        came = {k: v for k, v in b.items() if a.get(k, _MISSING) != v}
        if gone:
            delta.removed[name] = gone
        if came:
            delta.added[name] = came
    return delta

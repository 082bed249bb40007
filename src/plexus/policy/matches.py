"""Which identities each peer of the policies matches, kept as identities come and go.

A row needs, for every rule with peers, the identities the rule's peers select; asking every
identity for every rule is O(identities) per rule. Here a selector is answered once from
indexes (identities by namespace and by label, by the CIDR peers covering them, by kind) and
then kept: an identity that arrives is tested against the selectors already asked (O(selectors)),
one that leaves is dropped from their answers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from plexus.policy.evaluate import Evaluator, Party
from plexus.policy.identity import Key
from plexus.policy.model import EndpointSelector, Peer


class Matches:
    def __init__(self, ev: Evaluator) -> None:
        self.evaluator = ev
        self._reps: dict[Key, Party] = {}
        self._by_namespace: dict[str, set[Key]] = defaultdict(set)
        self._by_label: dict[tuple[str, str, str], set[Key]] = defaultdict(set)
        self._others: set[Key] = set()  # the world's and the hosts' identities
        self._answers: dict[Peer, set[Key]] = {}
        self._named: dict[str, set[Key]] = defaultdict(set)  # port name -> identities

    def add(self, key: Key, rep: Party) -> None:
        self._reps[key] = rep
        if key.kind == "ep":
            self._by_namespace[key.namespace].add(key)
            for k, v in key.labels:
                self._by_label[(key.namespace, k, v)].add(key)
            for name, _, _ in key.ports:
                self._named[name].add(key)
        else:
            self._others.add(key)
        for peer, found in self._answers.items():
            if self.evaluator.peer_matches(peer, rep):
                found.add(key)

    def remove(self, key: Key) -> None:
        self._reps.pop(key, None)
        self._by_namespace[key.namespace].discard(key)
        for k, v in key.labels:
            self._by_label[(key.namespace, k, v)].discard(key)
        for name, _, _ in key.ports:
            self._named[name].discard(key)
        self._others.discard(key)
        for found in self._answers.values():
            found.discard(key)

    def of(self, peer: Peer) -> set[Key]:
        found = self._answers.get(peer)
        if found is None:
            found = {k for k in self._candidates(peer)
                     if self.evaluator.peer_matches(peer, self._reps[k])}
            self._answers[peer] = found
        return found

    def named(self, names: Iterable[str]) -> set[Key]:
        """Identities with a port of one of these names."""
        out: set[Key] = set()
        for name in names:
            out |= self._named.get(name, set())
        return out

    def _candidates(self, peer: Peer) -> Iterable[Key]:
        if not isinstance(peer, EndpointSelector):
            return list(self._reps)  # CIDRs and entities: endpoints and the rest alike
        if peer.namespaces is not None:
            spaces = [n for n in self._by_namespace
                      if peer.namespaces.matches(self.evaluator.namespace_labels(n))]
        else:
            spaces = [peer.namespace] if peer.namespace else list(self._by_namespace)
        out: set[Key] = set()
        for ns in spaces:
            postings = [self._by_label.get((ns, k, v), set()) for k, v in peer.pods.labels]
            out |= min(postings, key=len) if postings else self._by_namespace.get(ns, set())
        return out

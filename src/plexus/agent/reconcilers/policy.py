"""Network policy: the compiled form of the policies in force (``policy.compile``), kept in the
kernel (``nft.policy``) by element deltas.

One object, ``policy``, queued by every change that can change a verdict: policies, namespaces,
endpoints (labels, addresses, named ports) and hosts. Each batch compiles the whole state from
the cache and applies the difference with what it applied last, in one nft batch; a request
that committed revision R waits as for any reconciler, so ``policy apply`` returns when the
policy is in force. While no policy exists there is no table at all: containers pay nothing.

Compiling everything on each change is O(local identities x identities) of Python work: the
rows of one local identity are independent (``compile._row``), which is where an incremental
compiler will cut it. Left for now, measured in bench/policy.py.
"""

from __future__ import annotations

import ipaddress
import logging

from plexus.dataplane.nft import policy as render
from plexus.dataplane.nft.policy_table import Counters, PolicyKernel
from plexus.policy.compile import Compiler, Inputs
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")
OBJECT = "policy"
VERIFY = "policy:verify"


class PolicyReconciler(Reconciler):
    name = "policy"
    batch = True
    prefixes = (OBJECT,)

    def __init__(self, cache: Cache, kernel: PolicyKernel) -> None:
        super().__init__()
        self._cache = cache
        self._kernel = kernel
        self._compiler = Compiler()
        self._applied: render.Elements | None = None
        self._known = False  # False: the kernel's table is not known to be ``_applied``
        self.repairs = 0

    def desired(self) -> render.Elements | None:
        cache = self._cache
        if not cache.policies:
            return None
        hosts = []
        for name, h in cache.hosts.items():
            if name != cache.node and h.address:
                hosts.append(ipaddress.ip_address(h.address))
        namespaces = {n: ns.all_labels for n, ns in cache.namespaces.items()}
        inputs = Inputs(list(cache.policies.values()), namespaces,
                        list(cache.endpoints.values()), cache.node, hosts)
        return render.elements(self._compiler.compile(inputs))

    async def reconcile_batch(self, keys: list[str]) -> dict[str, Exception | None]:
        want = self.desired()
        if VERIFY in keys and self._known and not await self._in_step():
            self.repairs += 1
            self._known = False
        old = self._applied if self._known else None
        if old is None and want is None and self._known:
            return {}
        try:
            await self._kernel.apply(old, want)
        except Exception:
            self._known = False
            raise
        self._applied, self._known = want, True
        return {}

    async def _in_step(self) -> bool:
        """The kernel's table has what was applied (element counts: a flushed set, a deleted
        table or chain shows; a hand-edited element does not)."""
        sizes = await self._kernel.sizes()
        if self._applied is None:
            return sizes is None
        if sizes is None:
            return False
        return all(sizes.get(n, -1) == len(e) for n, e in self._applied.sets.items())

    async def counters(self) -> dict[str, dict[str, int]]:
        """Per policy ("Kind ref"): packets allowed, denied and audited (would-be drops)."""
        raw: Counters = await self._kernel.counters()
        out: dict[str, dict[str, int]] = {}
        chains = self._applied.chains if self._applied else {}
        for base, policy in chains.items():
            out[policy] = {outcome: raw.get(f"{base}-{outcome}", (0, 0))[0]
                           for outcome in render.OUTCOMES}
        return out

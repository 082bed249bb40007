"""Network policy: the compiled form of the policies in force (``policy.compile``), kept in the
kernel (``nft.policy``) by element deltas of what changed.

Objects: ``policy:ep:STORE_KEY`` (an endpoint of any host: labels, addresses, named ports),
``policy:policies`` (any policy), ``policy:namespaces`` and ``policy:hosts``. A batch hands each
to the compiler, which answers with the elements it changes, and sends them all as one nft
batch: an endpoint or a policy costs what it touches (a namespace's labels or the hosts, which
every verdict may depend on, compile everything). A request that committed revision R waits as
for any reconciler, so ``policy apply`` returns when the policy is in force. While no policy
exists there is no table and no work at all: containers pay nothing.

If the kernel refuses a delta (a table deleted or flushed by hand), the whole table is written
again from what the compiler holds; the periodic pass (``policy:verify``) compares element
counts with the kernel's and does the same when they differ.
"""

from __future__ import annotations

import gc
import ipaddress
import logging

from plexus.dataplane.nft.policy_table import Counters, PolicyKernel
from plexus.errors import DataplaneError
from plexus.model.types import IPAddress
from plexus.policy.compile import Compiler, Inputs
from plexus.policy.journal import Delta
from plexus.policy.model import Direction
from plexus.state.cache import Cache
from plexus.state.work import Reconciler

log = logging.getLogger("plexus.reconcile")
PREFIX = "policy:"
ENDPOINT = PREFIX + "ep:"
POLICIES, NAMESPACES, HOSTS = PREFIX + "policies", PREFIX + "namespaces", PREFIX + "hosts"
VERIFY = PREFIX + "verify"
EVERYTHING = (NAMESPACES, HOSTS)  # changes that compile everything again
OUTCOMES = ("allow", "deny", "audit")


def settle() -> None:
    """Move what the process holds now (the compiled policy above all: millions of objects at
    10,000 endpoints) out of the cyclic garbage collector's reach. A full collection otherwise
    walks all of it now and then, 50 ms at that size (measured, bench/policy.py), in the middle
    of whatever change comes next. Those objects are freed by reference counting as before;
    only cycles among them would stay."""
    gc.collect()
    gc.freeze()


class PolicyReconciler(Reconciler):
    name = "policy"
    batch = True
    batch_max = 512
    prefixes = (PREFIX,)

    def __init__(self, cache: Cache, kernel: PolicyKernel) -> None:
        super().__init__()
        self._cache = cache
        self._kernel = kernel
        self._compiler = Compiler()
        self._active = False  # the compiler holds the state and the kernel holds the table
        self._chains: dict[str, str] = {}
        self._started = False  # the first table is written (start-up is behind)
        self.repairs = 0

    def reason(self, prefix: str, mark: int) -> str:
        """What a logged packet's prefix and ``meta mark`` (a decision's number) say dropped
        it: "policy Kind ns/name" for a policy's deny or audit."""
        if prefix not in ("deny", "audit"):
            return prefix
        base = self._compiler.outcomes.base_of(mark)
        what = self._compiler.chains.get(base) if base else None
        return f"policy {what}" if what else "policy"

    def _inputs(self) -> Inputs:
        cache = self._cache
        hosts: list[IPAddress] = [ipaddress.ip_address(h.address)
                                  for name, h in sorted(cache.hosts.items())
                                  if name != cache.node and h.address]
        namespaces = {n: ns.all_labels for n, ns in cache.namespaces.items()}
        return Inputs(list(cache.policies.values()), namespaces, cache.endpoints, cache.node,
                      hosts)

    async def reconcile_batch(self, keys: list[str]) -> dict[str, Exception | None]:
        if not self._cache.policies:
            if self._active or VERIFY in keys:
                await self._kernel.remove()
            self._active = False
            return {}
        if VERIFY in keys and self._active and not await self._in_step():
            self.repairs += 1
            self._active = False
        if HOSTS in keys and self._inputs().hosts == self._compiler.hosts:
            keys = [k for k in keys if k != HOSTS]  # a host said it is alive: nothing moved
        if not self._active or any(k in EVERYTHING for k in keys):
            await self._everything()
            return {}
        deltas: list[Delta] = []
        if POLICIES in keys:
            deltas.append(self._compiler.policies(list(self._cache.policies.values())))
        for key in keys:
            if key.startswith(ENDPOINT):
                store_key = key[len(ENDPOINT):]
                deltas.append(self._compiler.endpoint(store_key, self._cache.endpoint(store_key)))
        try:
            await self._kernel.change([d for d in deltas if d], self._chains,
                                      self._compiler.chains)
        except DataplaneError as e:
            log.warning("policy delta refused, writing the whole table: %s", e.message)
            self._active = False
            await self._everything()
            return {}
        self._chains = dict(self._compiler.chains)
        await self._judge_again(deltas)
        return {}

    async def _judge_again(self, deltas: list[Delta]) -> None:
        """Connections of the endpoints whose verdicts changed are judged again."""
        sources: set[IPAddress] = set()
        destinations: set[IPAddress] = set()
        for delta in deltas:
            judged = self._compiler.judged(delta)
            sources |= judged[Direction.EGRESS]
            destinations |= judged[Direction.INGRESS]
        if sources or destinations:
            await self._kernel.forget_connections(sorted(sources, key=str),
                                                  sorted(destinations, key=str))

    async def _everything(self) -> None:
        delta = self._compiler.compile(self._inputs())
        self._active = False
        await self._kernel.replace(self._compiler.sets, self._compiler.chains)
        settle()  # once the table is in force
        self._chains = dict(self._compiler.chains)
        self._active = True
        if self._started:  # at start-up the kernel already judged what runs: leave it be
            await self._judge_again([delta])
        self._started = True

    async def _in_step(self) -> bool:
        """The kernel's table has what was applied (element counts: a flushed set, a deleted
        table shows; a hand-edited element does not)."""
        sizes = await self._kernel.sizes()
        if sizes is None:
            return False
        return all(sizes.get(n, -1) == len(e) for n, e in self._compiler.sets.items())

    async def counters(self) -> dict[str, dict[str, int]]:
        """Per policy ("Kind ref"): packets allowed, denied and audited (would-be drops)."""
        raw: Counters = await self._kernel.counters()
        return {policy: {o: raw.get(f"{base}-{o}", (0, 0))[0] for o in OUTCOMES}
                for base, policy in self._chains.items()}

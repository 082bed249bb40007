"""What every service shares: the datastore, the read-only cache, and the way to wait for the
reconcilers ("done means working")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from plexus.config import AgentConfig
from plexus.errors import Conflict, NotReady
from plexus.model.types import IPAddress, IPNetwork
from plexus.state.cache import Cache
from plexus.state.progress import Progress
from plexus.store.base import Compare, Datastore, Op, TxnResult


class HostView(Protocol):
    """What services may *read* of the host (they never change it)."""

    async def local_prefixes(self) -> list[tuple[IPNetwork, str]]:
        """The host's addresses and routes, (prefix, where): what an automatic subnet avoids."""
        ...

    def check_netns(self, path: str) -> None:
        """Raise InvalidArgument (field netns) unless ``path`` is a network namespace."""
        ...

    async def has_address(self, ip: IPAddress) -> bool:
        """Is ``ip`` an address of the host (a port can be published on it)?"""
        ...


@dataclass
class Context:
    config: AgentConfig
    store: Datastore
    cache: Cache
    progress: Progress
    host: HostView
    ready: bool = False

    @property
    def node(self) -> str:
        return self.config.node

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("the agent is still starting (recovering state)")

    async def settle(self, revision: int, objects: Iterable[str] = ()) -> None:
        """Until the reconcilers have applied ``revision``; raises their error on ``objects``."""
        await self.progress.wait(revision, objects)

    async def refresh(self, store_key: str) -> None:
        """Check an endpoint against the kernel now, repairing it; raises what went wrong."""
        await self.progress.refresh([endpoint_object(store_key)])

    async def seen(self, revision: int) -> None:
        """Until the cache holds ``revision`` (no kernel work waited for)."""
        await self.progress.informer.wait_for(revision)

    async def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> TxnResult:
        return await self.store.txn(compares, ops)

    async def retrying(self, attempt: Callable[[], Awaitable[TxnResult | None]],
                       what: str) -> TxnResult:
        """Runs ``attempt`` (plan, then one transaction) until it commits; it returns None
        when it lost a race and should plan again."""
        for _ in range(self.config.txn_retries):
            result = await attempt()
            if result is not None:
                return result
        raise Conflict(f"{what}: too much contention, try again")


def endpoint_object(store_key: str) -> str:
    """The reconcilers' name of an endpoint (links, firewall, DNS all use it)."""
    return "ep:" + store_key


def network_object(name: str) -> str:
    return "net:" + name

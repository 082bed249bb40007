"""Coexisting with dockerd's iptables rules.

dockerd (with its default ``--iptables``) sets the iptables FORWARD policy to DROP and turns on
``bridge-nf-call-iptables``. A packet must be accepted by every base chain of a hook, so from then
on every packet plexus forwards — between containers, to the outside, to published ports — dies
in Docker's FORWARD chain, whatever plexus's own nftables table says. Docker reserves the
DOCKER-USER chain, evaluated first and preserved across its restarts, for exactly this: other
software's and the administrator's rules. plexus puts two rules there (``-i pxbr+`` and
``-o pxbr+`` ACCEPT, covering every plexus bridge by wildcard, so they never change per network)
and leaves the decision to its own ``inet plexus`` table, where isolation and internal networks
are enforced. These are the only rules plexus writes outside its own table.
"""

from __future__ import annotations

import asyncio
import logging
import shutil

log = logging.getLogger("plexus.dataplane")
RULES = (("-i", "pxbr+"), ("-o", "pxbr+"))
CHAIN = "DOCKER-USER"


async def _run(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def ensure_accept_rules() -> bool:
    """Insert the two ACCEPT rules into DOCKER-USER if dockerd made that chain (IPv4 and IPv6);
    idempotent. False when there is no such chain (no dockerd, or dockerd without iptables)."""
    found = False
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None or await _run(tool, "-w", "-n", "-L", CHAIN) != 0:
            continue
        found = True
        for flag, ifname in RULES:
            rule = (CHAIN, flag, ifname, "-j", "ACCEPT")
            if await _run(tool, "-w", "-C", *rule) != 0:
                await _run(tool, "-w", "-I", *rule)
                log.info("%s: accepted plexus bridges (%s %s) in %s", tool, flag, ifname, CHAIN)
    return found

"""The same services as kube-proxy's iptables mode lays them out, as an ``iptables-restore``
script (bench/services.py loads it instead of plexus's table to compare first-packet latency).

    *nat
    PREROUTING, OUTPUT  -j KUBE-SERVICES
    KUBE-SERVICES       -d VIP/32 -p tcp -m tcp --dport PORT -j KUBE-SVC-<hash>   (one per service)
    KUBE-SVC-<hash>     -m statistic --mode random --probability 1/(n-i) -j KUBE-SEP-<hash>
                        ... the last endpoint without a probability
    KUBE-SEP-<hash>     -s EP/32 -j KUBE-MARK-MASQ                                 (hairpin)
                        -p tcp -m tcp -j DNAT --to-destination EP:PORT
    KUBE-MARK-MASQ      -j MARK --set-xmark 0x4000/0x4000
    POSTROUTING         -j KUBE-POSTROUTING: mark 0x4000 -> MASQUERADE

A new connection walks KUBE-SERVICES rule by rule until its VIP matches: the cost kube-proxy's
nftables mode was written to remove. The measured service is written last (the worst case; an
average service walks half the chain). Chain names are hashes of the service and endpoint, as
kube-proxy's are (16 characters of base32 of a SHA-256).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable

from plexus.lb.model import Frontend


def _chain(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:16]


def _service(f: Frontend) -> tuple[list[str], list[str], list[str]]:
    """(chains, KUBE-SERVICES rule, the service's own rules)."""
    svc = _chain("KUBE-SVC-", f.service, f.name, f.proto)
    chains, rules = [svc], []
    n = len(f.backends)
    for i, b in enumerate(f.backends):
        sep = _chain("KUBE-SEP-", f.service, f.name, f.proto, str(b.address), str(b.port))
        chains.append(sep)
        chance = f" -m statistic --mode random --probability {1 / (n - i):.10f}" \
            if i < n - 1 else ""
        rules.append(f"-A {svc}{chance} -j {sep}")
        rules.append(f"-A {sep} -s {b.address}/32 -j KUBE-MARK-MASQ")
        rules.append(f"-A {sep} -p {f.proto} -m {f.proto} -j DNAT "
                     f"--to-destination {b.address}:{b.port}")
    entry = [f"-A KUBE-SERVICES -d {f.vip}/32 -p {f.proto} -m {f.proto} --dport {f.port} "
             f"-j {svc}"]
    return chains, entry, rules


def script(frontends: Iterable[Frontend]) -> tuple[str, int]:
    """The ``iptables-restore`` input for ``frontends`` (in that order), and its rule count."""
    chains = ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
    entries: list[str] = []
    rules: list[str] = []
    for f in frontends:
        c, e, r = _service(f)
        chains += c
        entries += e
        rules += r
    fixed = ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES",
             "-A POSTROUTING -j KUBE-POSTROUTING",
             "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
             "-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE"]
    lines = ["*nat", *(f":{c} - [0:0]" for c in chains), *fixed, *entries, *rules, "COMMIT"]
    return "\n".join(lines) + "\n", len(fixed) + len(entries) + len(rules)

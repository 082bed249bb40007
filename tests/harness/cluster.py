"""A cluster in the sandbox: simulated hosts of a ``World`` whose agents share one real etcd.

etcd runs in the sandbox's own namespace, on an address of the hosts' segment: a veth from there
to the outside namespace's switch (``br-out``) gives it 203.0.113.250, which every host reaches
over its ``up0``. The veth dies with the outside namespace; etcd is stopped by ``close``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.harness.etcd import EtcdCluster
from tests.harness.world import Agent, World, nsexec, sh

ETCD_ADDR = "203.0.113.250"


def _wire_etcd_address() -> None:
    sh("ip", "link", "add", "etcd0", "type", "veth", "peer", "name", "to-etcd", "netns",
       "outside")
    nsexec("outside", "ip", "link", "set", "to-etcd", "master", "br-out", "up")
    sh("ip", "addr", "add", f"{ETCD_ADDR}/24", "dev", "etcd0")
    sh("ip", "link", "set", "etcd0", "up")


@contextlib.contextmanager
def cluster(world: World, workdir: Path, hosts: Sequence[str], members: int = 1,
            start: Sequence[str] | None = None) -> Iterator[tuple[EtcdCluster, list[Agent]]]:
    """etcd plus one agent per host (``start``: which of them to start; default all), each
    with ``--store`` pointing at etcd and ``--node`` its host's name."""
    agents = [world.add_host(h, start_agent=False) for h in hosts]
    _wire_etcd_address()
    etcd = EtcdCluster(workdir / "etcd", members, host=ETCD_ADDR)
    try:
        etcd.start()
        for agent in agents:
            if start is None or agent.host in start:
                agent.start(extra=["--store", etcd.url])
        yield etcd, agents
    finally:
        for agent in agents:
            agent.kill()
        etcd.close()
        sh("ip", "link", "del", "etcd0", check=False)

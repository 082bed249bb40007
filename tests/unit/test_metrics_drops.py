"""The IP stack's "no route" drops, read from /proc/net files (here: files written by the
test, in the kernel's formats)."""

from __future__ import annotations

from pathlib import Path

from plexus.observe.drops import no_route_packets

SNMP = """Ip: Forwarding DefaultTTL InReceives OutRequests OutNoRoutes
Ip: 1 64 100 90 7
Icmp: InMsgs OutNoRoutes
Icmp: 1 1000
"""
NETSTAT = """TcpExt: SyncookiesSent
TcpExt: 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 5 0
"""
SNMP6 = """Ip6InReceives                   \t12
Ip6InNoRoutes                   \t3
Ip6OutNoRoutes                  \t2
"""


def test_no_route_sums_both_families_in_and_out(tmp_path: Path) -> None:
    for name, text in (("snmp", SNMP), ("netstat", NETSTAT), ("snmp6", SNMP6)):
        (tmp_path / name).write_text(text)
    assert no_route_packets(tmp_path) == 7 + 5 + 3 + 2  # not Icmp's field of the same name
    (tmp_path / "snmp6").unlink()  # a kernel without IPv6
    assert no_route_packets(tmp_path) == 12

"""The firewall appliers without a kernel: NftFirewall over a scripted Nft, FakeFirewall, NftCli."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest

from plexus.dataplane.nft import (
    Firewall,
    FirewallState,
    NetRule,
    NftCli,
    NftFirewall,
    Publication,
    open_nft,
    render_table,
    render_teardown,
    render_update,
)
from plexus.dataplane.nft._json import Json
from plexus.dataplane.nft.libnft import LibNft, document, netns_path
from plexus.errors import DataplaneError, NotReady, Unsupported
from plexus.testing import FakeFirewall

NETS = (NetRule("pxbr-a", (ipaddress.ip_network("10.1.0.0/24"),)),)
P1 = Publication("tcp", None, 8080, ipaddress.ip_address("10.1.0.2"), 80)
P2 = Publication("udp", None, 53, ipaddress.ip_address("10.1.0.3"), 53)
OLD = FirewallState(NETS, frozenset({P1}))
NEW = FirewallState(NETS, frozenset({P1, P2}))


class ScriptedNft:
    """An Nft that records batches, can refuse some, and lists a given table."""

    def __init__(self, listing: Json | None = None, failures: int = 0) -> None:
        self.batches: list[list[Json]] = []
        self.listing = listing or {"nftables": []}
        self.failures = failures

    async def run(self, cmds: list[Json]) -> Json:
        return self.run_sync(cmds)

    def run_sync(self, cmds: list[Json]) -> Json:
        if self.failures:
            self.failures -= 1
            raise DataplaneError("nft: Error: No such file or directory")
        self.batches.append(cmds)
        return {}

    async def list_table(self) -> Json:
        return self.list_table_sync()

    def list_table_sync(self) -> Json:
        return self.listing

    def close(self) -> None:
        pass


# -- NftFirewall ---------------------------------------------------------------------------------


def test_both_firewalls_implement_the_seam() -> None:
    assert isinstance(NftFirewall(ScriptedNft()), Firewall)
    assert isinstance(FakeFirewall(), Firewall)


async def test_sync_sends_the_whole_table_as_one_batch() -> None:
    nft = ScriptedNft()
    await NftFirewall(nft).sync(NEW)
    assert nft.batches == [render_table(NEW)]


async def test_update_sends_only_the_difference() -> None:
    nft = ScriptedNft()
    await NftFirewall(nft).update(OLD, NEW)
    assert nft.batches == [render_update(OLD, NEW)]
    assert all("element" in next(iter(c.values())) for c in nft.batches[0])


async def test_update_without_a_difference_sends_nothing() -> None:
    nft = ScriptedNft()
    await NftFirewall(nft).update(NEW, NEW)
    assert nft.batches == []


async def test_a_refused_delta_falls_back_to_replacing_the_table() -> None:
    nft = ScriptedNft(failures=1)
    await NftFirewall(nft).update(OLD, NEW)
    assert nft.batches == [render_table(NEW)]


async def test_a_refused_full_sync_is_reported() -> None:
    with pytest.raises(DataplaneError):
        await NftFirewall(ScriptedNft(failures=2)).update(OLD, NEW)


async def test_teardown_deletes_the_table() -> None:
    nft = ScriptedNft()
    await NftFirewall(nft).teardown()
    assert nft.batches == [render_teardown()]


async def test_current_is_none_without_a_table() -> None:
    assert await NftFirewall(ScriptedNft()).current() is None


# -- FakeFirewall --------------------------------------------------------------------------------


async def test_fake_keeps_the_state_and_records_calls() -> None:
    fw = FakeFirewall()
    await fw.sync(OLD)
    await fw.update(OLD, NEW)
    assert await fw.current() == NEW.canonical()
    assert [kind for kind, _ in fw.calls] == ["sync", "update"]


async def test_fake_update_from_a_state_it_does_not_hold_is_a_full_sync() -> None:
    fw = FakeFirewall(FirewallState())
    await fw.update(OLD, NEW)
    assert fw.calls == [("sync", NEW.canonical())]
    assert fw.syncs == 1


async def test_fake_teardown_and_injected_failure() -> None:
    fw = FakeFirewall(OLD)
    fw.fail = NotReady("kernel busy")
    with pytest.raises(NotReady):
        await fw.sync(NEW)
    assert fw.state == OLD.canonical()
    await fw.teardown()
    assert await fw.current() is None


# -- libnftables and the nft command -------------------------------------------------------------


def test_a_missing_library_is_unsupported() -> None:
    with pytest.raises(Unsupported, match=r"libnftables\.so\.1 not found: install the nftables"):
        LibNft(library="libplexus-no-such-library.so.1")


def test_open_nft_falls_back_to_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/sbin/{name}")
    assert isinstance(open_nft(library="libplexus-no-such-library.so.1"), NftCli)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(Unsupported):
        open_nft(library="libplexus-no-such-library.so.1")


def test_a_batch_is_one_document_that_starts_with_metainfo() -> None:
    doc = json.loads(document(render_teardown()))
    assert doc["nftables"][0] == {"metainfo": {"json_schema_version": 1}}
    assert doc["nftables"][1:] == render_teardown()


def test_netns_by_name_or_path() -> None:
    assert netns_path("host") == "/run/netns/host"
    assert netns_path("/proc/1/ns/net") == "/proc/1/ns/net"
    assert netns_path(None) is None


def fake_nft(tmp_path: Path, script: str) -> str:
    path = tmp_path / "nft"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


async def test_cli_returns_the_output_and_raises_nft_errors(tmp_path: Path) -> None:
    ok = NftCli(nft=fake_nft(tmp_path, """cat >/dev/null; echo '{"nftables": [1]}'"""))
    assert ok.run_sync([]) == {"nftables": [1]}
    assert await ok.run([]) == {"nftables": [1]}
    bad = NftCli(nft=fake_nft(tmp_path, "cat >/dev/null; echo 'Error: boom' >&2; exit 1"))
    with pytest.raises(DataplaneError, match="nft: Error: boom"):
        bad.run_sync([])
    with pytest.raises(DataplaneError, match="nft: Error: boom"):
        await bad.run([])


async def test_cli_lists_an_absent_table_as_empty(tmp_path: Path) -> None:
    # "list table" fails; "list tables" shows other tables only.
    script = """if grep -q '"tables"'; then echo '{"nftables": [{"table": {"name": "x"}}]}';
                else echo 'Error: No such file or directory' >&2; exit 1; fi"""
    cli = NftCli(nft=fake_nft(tmp_path, script))
    assert cli.list_table_sync() == {"nftables": []}
    assert await cli.list_table() == {"nftables": []}


async def test_cli_does_not_hide_other_listing_errors(tmp_path: Path) -> None:
    script = """if grep -q '"tables"'; then echo '{"nftables": [{"table": {"name": "plexus"}}]}';
                else echo 'Error: Operation not permitted' >&2; exit 1; fi"""
    with pytest.raises(DataplaneError, match="not permitted"):
        NftCli(nft=fake_nft(tmp_path, script)).list_table_sync()


def test_cli_enters_a_netns_with_nsenter() -> None:
    assert NftCli("host")._argv[:2] == ["nsenter", "--net=/run/netns/host"]

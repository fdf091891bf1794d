"""The broker's table of authorised keys and its ZAP policy, with a fake clock and a real folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from zmq.utils import z85

from zlink import security
from zlink.security import AllowedKeys, BrokerHome, ZapPolicy, generate_keypair

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def zap_request(public: str) -> list[bytes]:
    return [b"1.0", b"r1", b"", b"127.0.0.1", b"", b"CURVE", z85.decode(public.encode())]


@pytest.fixture
def home(tmp_path: Path) -> BrokerHome:
    h = BrokerHome(tmp_path / "home")
    h.ensure()
    return h


def settle(table: AllowedKeys, clock: Clock) -> None:
    """Let the folder's stamp age past 2 s, so it is no longer 'racy' (see AllowedKeys), and read it."""
    clock.t += 2.5
    table.refresh()
    assert not table.racy()


def counting_scans(table: AllowedKeys, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the table's folder scans in the returned one-item list."""
    scans = [0]
    real_scan = table._scan

    def count_scan() -> tuple[tuple[str, int, int], ...]:
        scans[0] += 1
        return real_scan()

    monkeypatch.setattr(table, "_scan", count_scan)
    return scans


def test_a_known_key_costs_no_scan_until_the_folder_changes(home: BrokerHome, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [generate_keypair() for _ in range(20)]
    for i, k in enumerate(keys):
        home.allow(k.public, name=f"n{i}", role="node")
    clock = Clock()
    table = AllowedKeys(home.allowed, clock=clock)
    settle(table, clock)
    zap = ZapPolicy(table)
    scans = counting_scans(table, monkeypatch)
    parses = 0
    real_parse = table._parse

    def count_parse(name: str) -> security.AllowedKey | None:
        nonlocal parses
        parses += 1
        return real_parse(name)

    monkeypatch.setattr(table, "_parse", count_parse)

    # a join storm: every node handshakes (twice: tasks and heartbeats) within a second
    for k in keys * 2:
        assert zap.reply(zap_request(k.public))[2] == b"200"
    assert (scans[0], parses, zap.allowed) == (0, 0, 40)

    # a key invited now gets in at once; only its file is parsed
    new = generate_keypair()
    home.allow(new.public, name="late", role="client")
    assert zap.reply(zap_request(new.public))[2] == b"200"
    assert (scans[0], parses) == (1, 1)

    # a revoked key is refused from its next handshake on, with no wait
    home.revoke("n0")
    assert zap.reply(zap_request(keys[0].public))[2] == b"400"
    assert table.take_removed() == {keys[0].public}
    assert parses == 1  # nothing new to parse


def test_strangers_cannot_keep_the_broker_scanning(home: BrokerHome, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    table = AllowedKeys(home.allowed, clock=clock)
    settle(table, clock)
    zap = ZapPolicy(table)
    scans = counting_scans(table, monkeypatch)
    for _ in range(500):
        assert zap.reply(zap_request(generate_keypair().public))[2:4] == [b"400", b"key not authorised"]
    assert scans[0] == 0 and zap.denied == 500  # the table was read a moment ago
    clock.t += 0.1
    for _ in range(100):
        zap.reply(zap_request(generate_keypair().public))
    assert scans[0] == 1


def test_a_key_file_edited_in_place_is_seen_within_a_second(home: BrokerHome) -> None:
    k = generate_keypair()
    path = home.allow(k.public, name="w", role="node")
    clock = Clock()
    table = AllowedKeys(home.allowed, clock=clock)
    settle(table, clock)
    zap = ZapPolicy(table)
    assert zap.reply(zap_request(k.public))[2] == b"200"
    # the role changes by rewriting the file in place: the folder's mtime stays, so the change
    # shows when the table is a second old, and counts as a removal (peers are disconnected)
    st = os.stat(home.allowed)
    path.unlink()
    security.write_cert(path, security.KeyPair(k.public), metadata={"name": "w", "role": "client"})
    os.utime(home.allowed, ns=(st.st_atime_ns, st.st_mtime_ns))
    zap.reply(zap_request(k.public))
    assert table.get(k.public) is not None and table.get(k.public).role == "node"  # type: ignore[union-attr]
    clock.t += 1.01
    zap.reply(zap_request(k.public))
    assert table.get(k.public).role == "client"  # type: ignore[union-attr]
    assert table.take_removed() == {k.public}


def test_bad_files_are_listed_and_skipped(home: BrokerHome) -> None:
    (home.allowed / "junk.key").write_text("not a certificate")
    k = generate_keypair()
    home.allow(k.public, name="good", role="node")
    table = AllowedKeys(home.allowed)
    assert table.bad_files == ["junk.key"] and [a.name for a in table.by_key.values()] == ["good"]


def test_a_key_written_in_the_same_mtime_tick_as_the_last_scan_gets_in(
    home: BrokerHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder's mtime is as coarse as the kernel's clock tick: a key invited right after a scan
    (a client invited while the node invited just before is handshaking) may leave it unchanged.
    A stranger's handshake then scans anyway, until the folder's stamp has been seen for 2 s."""
    first = generate_keypair()
    home.allow(first.public, name="node", role="node")
    clock = Clock()
    table = AllowedKeys(home.allowed, clock=clock)
    zap = ZapPolicy(table)
    assert zap.reply(zap_request(first.public))[2] == b"200"
    # the second invite lands in the same tick: the folder's mtime does not move
    st = os.stat(home.allowed)
    second = generate_keypair()
    home.allow(second.public, name="client", role="client")
    os.utime(home.allowed, ns=(st.st_atime_ns, st.st_mtime_ns))
    clock.t += 1.9
    assert zap.reply(zap_request(second.public))[2] == b"200"  # no wait, no refusal

    # once the stamp has been seen for 2 s it is trusted: a stranger within a tenth of a second
    # of the last scan costs none (a key can only arrive by changing the mtime from now on)
    settle(table, clock)
    scans = counting_scans(table, monkeypatch)
    for _ in range(50):
        assert zap.reply(zap_request(generate_keypair().public))[2] == b"400"
    assert scans[0] == 0
    # a change starts the 2 s again
    third = generate_keypair()
    home.allow(third.public, name="third", role="client")
    assert zap.reply(zap_request(third.public))[2] == b"200" and scans[0] == 1
    assert table.racy()


def test_a_folder_stamped_in_the_future_is_trusted_after_2_s_all_the_same(
    home: BrokerHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window runs on the broker's monotonic clock, not the file's stamp: a folder whose
    mtime is ahead (a file server's clock, or this machine's stepped back) does not keep every
    stranger's handshake scanning."""
    st = os.stat(home.allowed)
    os.utime(home.allowed, ns=(st.st_atime_ns, st.st_mtime_ns + 3_600_000_000_000))  # an hour ahead
    clock = Clock()
    table = AllowedKeys(home.allowed, clock=clock)
    zap = ZapPolicy(table)
    assert table.racy()
    settle(table, clock)
    scans = counting_scans(table, monkeypatch)
    for _ in range(50):
        zap.reply(zap_request(generate_keypair().public))
    assert scans[0] == 0


def test_a_missing_folder_is_always_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No folder, no stamp to trust: every stranger's handshake looks again (a failed scandir)."""
    clock = Clock()
    table = AllowedKeys(tmp_path / "nowhere", clock=clock)
    zap = ZapPolicy(table)
    clock.t += 10
    scans = counting_scans(table, monkeypatch)
    for _ in range(3):
        assert zap.reply(zap_request(generate_keypair().public))[2] == b"400"
    assert table.racy() and table.by_key == {} and scans[0] == 3

"""Unit tests for end-to-end sealed payloads (:mod:`zlink.seal`): pure, no sockets.

What the broker (or anyone between a client and a node) can do to a sealed
payload is flip, cut, move or forge bytes; every such change must end in
:class:`zlink.SealError`, never in a plaintext and never in another exception.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zlink
from zlink import protocol as P
from zlink import seal as S
from zlink.errors import ConfigError, SealError, TaskError
from zlink.protocol import Outcome
from zlink.seal import SEAL_OVERHEAD, SEAL_PREFIX, ClientSealer, NodeSealer, SealKey, is_sealed
from zlink.security import Join, generate_keypair, load_seal_key, resolve_seal_key

KEY = SealKey(bytes(range(32)))
OTHER = SealKey(bytes(range(1, 33)))
SESSION = b"sess-001"


def tid(n: int, session: bytes = SESSION) -> bytes:
    """A task id as a client makes it: 8-byte session + 8-byte counter."""
    return session + n.to_bytes(8, "big")


def pair(key: SealKey = KEY) -> tuple[ClientSealer, NodeSealer]:
    return ClientSealer(key), NodeSealer(key)


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(
    plain=st.binary(max_size=2000),
    skill=st.text(min_size=1, max_size=40),
    counter=st.integers(1, 2**64 - 1),
    attempt=st.integers(1, 100),
    status=st.sampled_from([Outcome.OK, Outcome.ERROR, Outcome.PARTIAL]),
    result=st.binary(max_size=2000),
)
def test_task_and_result_round_trip(
    plain: bytes, skill: str, counter: int, attempt: int, status: int, result: bytes
) -> None:
    client, node = pair()
    t = tid(counter)
    sealed = client.seal_task(t, skill, plain)
    assert is_sealed(sealed)
    assert len(plain) < 16 or plain not in sealed  # (a short one may occur by chance)
    opened, client_pub = node.open_task(t, skill, sealed)
    assert opened == plain
    assert client_pub == client.public
    back = node.seal_result(client_pub, t, skill, attempt, status, result)
    assert is_sealed(back)
    assert len(result) < 16 or result not in back
    assert client.open_result(t, skill, attempt, status, back) == result
    # the node and the client accept memoryviews (zmq frames' buffers) as well
    assert node.open_task(t, skill, memoryview(sealed))[0] == plain
    assert client.open_result(t, skill, attempt, status, memoryview(back)) == result


def test_a_real_task_payload_round_trips_and_adds_at_most_the_overhead() -> None:
    client, node = pair()
    payload = P.pack_value([[3, "x" * 100], {"k": b"\x00\xff"}])
    t = tid(7)
    sealed = client.seal_task(t, "square", payload)
    assert sealed[:3] == S.TASK_MAGIC
    assert len(payload) < len(sealed) <= len(payload) + SEAL_OVERHEAD
    plain, pub = node.open_task(t, "square", sealed)
    assert P.unpack_value(plain) == [[3, "x" * 100], {"k": b"\x00\xff"}]
    res = node.seal_result(pub, t, "square", 1, Outcome.OK, P.pack_value(9))
    assert res[:3] == S.RESULT_MAGIC
    assert len(res) == len(P.pack_value(9)) + SEAL_OVERHEAD
    assert P.unpack_value(client.open_result(t, "square", 1, Outcome.OK, res)) == 9


def test_one_node_serves_many_clients_and_one_client_many_nodes() -> None:
    clients = [ClientSealer(KEY) for _ in range(4)]
    nodes = [NodeSealer(KEY) for _ in range(3)]
    for i, c in enumerate(clients):
        for j, n in enumerate(nodes):
            t = tid(i * 10 + j + 1)
            plain, pub = n.open_task(t, "s", c.seal_task(t, "s", b"task %d %d" % (i, j)))
            assert plain == b"task %d %d" % (i, j)
            out = n.seal_result(pub, t, "s", 1, Outcome.OK, b"res %d %d" % (i, j))
            assert c.open_result(t, "s", 1, Outcome.OK, out) == b"res %d %d" % (i, j)


def test_the_peer_key_cache_evicts_and_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "_CACHE", 2)
    node = NodeSealer(KEY)
    clients = [ClientSealer(KEY) for _ in range(5)]
    for rnd in range(3):  # round robin over more clients than the cache holds
        for i, c in enumerate(clients):
            t = tid(rnd * 100 + i + 1)
            plain, pub = node.open_task(t, "s", c.seal_task(t, "s", b"%d" % i))
            assert plain == b"%d" % i
            assert c.open_result(t, "s", 1, Outcome.OK, node.seal_result(pub, t, "s", 1, Outcome.OK, plain)) == plain
    assert len(node._tasks) <= 2 and len(node._results) <= 2


# --------------------------------------------------------------------------- associated data


def test_a_task_opens_only_under_its_own_task_id_and_skill() -> None:
    client, node = pair()
    t = tid(5)
    sealed = client.seal_task(t, "square", b"args")
    for other_tid, other_skill in [
        (tid(6), "square"),  # another counter
        (b"sess-002" + t[8:], "square"),  # same counter, another session prefix (same nonce)
        (t + b"x", "square"),  # a longer id ending in other bytes
        (t, "Square"),
        (t, "square2"),
        (t, "cube"),
    ]:
        with pytest.raises(SealError, match="failed to open"):
            node.open_task(other_tid, other_skill, sealed)
    assert node.open_task(t, "square", sealed)[0] == b"args"


def test_a_task_payload_replayed_into_another_task_fails() -> None:
    # the broker takes the payload of task 1 and sends it as the payload of task 2
    client, node = pair()
    t1, t2 = tid(1), tid(2)
    p1 = client.seal_task(t1, "transfer", b"pay alice 10")
    p2 = client.seal_task(t2, "transfer", b"pay bob 99")
    with pytest.raises(SealError):
        node.open_task(t2, "transfer", p1)
    with pytest.raises(SealError):
        node.open_task(t1, "transfer", p2)
    with pytest.raises(SealError):  # or into another skill, same id
        node.open_task(t1, "delete_all", p1)
    # splicing: the ciphertext of one task behind the header of another
    spliced = p2[: 3 + 32] + p1[3 + 32 :]
    with pytest.raises(SealError):
        node.open_task(t2, "transfer", spliced)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tid", tid(99)), ("skill", "other"), ("attempt", 2), ("status", Outcome.ERROR)],
)
def test_a_result_opens_only_under_its_own_tid_skill_attempt_and_status(field: str, value: object) -> None:
    client, node = pair()
    t = tid(3)
    _, pub = node.open_task(t, "square", client.seal_task(t, "square", b"a"))
    good = {"tid": t, "skill": "square", "attempt": 1, "status": Outcome.OK}
    sealed = node.seal_result(pub, t, "square", 1, Outcome.OK, b"\x09")
    assert client.open_result(good["tid"], good["skill"], good["attempt"], good["status"], sealed) == b"\x09"
    bad = {**good, field: value}
    with pytest.raises(SealError, match="failed to open"):
        client.open_result(bad["tid"], bad["skill"], bad["attempt"], bad["status"], sealed)  # type: ignore[arg-type]


def test_every_status_and_attempt_is_bound() -> None:
    client, node = pair()
    t = tid(4)
    for status in (Outcome.OK, Outcome.ERROR, Outcome.PARTIAL):
        for attempt in (1, 2, 3):
            sealed = node.seal_result(client.public, t, "s", attempt, status, b"v")
            for s2 in (Outcome.OK, Outcome.ERROR, Outcome.PARTIAL):
                for a2 in (1, 2, 3):
                    if (s2, a2) == (status, attempt):
                        assert client.open_result(t, "s", a2, s2, sealed) == b"v"
                    else:
                        with pytest.raises(SealError):
                            client.open_result(t, "s", a2, s2, sealed)


# --------------------------------------------------------------------------- tampering


def _task_envelope() -> tuple[ClientSealer, NodeSealer, bytes, bytes]:
    client, node = pair()
    t = tid(11)
    return client, node, t, client.seal_task(t, "echo", b"the arguments of task eleven")


def _result_envelope() -> tuple[ClientSealer, NodeSealer, bytes, bytes]:
    client, node = pair()
    t = tid(12)
    return client, node, t, node.seal_result(client.public, t, "echo", 1, Outcome.OK, b"the result of task twelve")


TASK_LEN = len(_task_envelope()[3])
RESULT_LEN = len(_result_envelope()[3])


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, TASK_LEN - 1), mask=st.integers(1, 255))
def test_flipping_any_byte_of_a_task_envelope_fails(pos: int, mask: int) -> None:
    _, node, t, sealed = _task_envelope()
    with pytest.raises(SealError):
        node.open_task(t, "echo", flip(sealed, pos, mask))


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, RESULT_LEN - 1), mask=st.integers(1, 255))
def test_flipping_any_byte_of_a_result_envelope_fails(pos: int, mask: int) -> None:
    client, _, t, sealed = _result_envelope()
    with pytest.raises(SealError):
        client.open_result(t, "echo", 1, Outcome.OK, flip(sealed, pos, mask))


def test_flipping_each_byte_of_both_envelopes_fails_exhaustively() -> None:
    # every position once (hypothesis above picks positions and masks at random)
    _, node, t, sealed = _task_envelope()
    for pos in range(len(sealed)):
        with pytest.raises(SealError):
            node.open_task(t, "echo", flip(sealed, pos))
    client, _, t, sealed = _result_envelope()
    for pos in range(len(sealed)):
        with pytest.raises(SealError):
            client.open_result(t, "echo", 1, Outcome.OK, flip(sealed, pos, 0x80))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_cut_or_extended_envelopes_fail(data: st.DataObject) -> None:
    client, node, t, task = _task_envelope()
    cut = data.draw(st.integers(0, len(task) - 1))
    with pytest.raises(SealError):
        node.open_task(t, "echo", task[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=20))
    with pytest.raises(SealError):
        node.open_task(t, "echo", task + extra)
    client, _, t, res = _result_envelope()
    cut = data.draw(st.integers(0, len(res) - 1))
    with pytest.raises(SealError):
        client.open_result(t, "echo", 1, Outcome.OK, res[:cut])
    with pytest.raises(SealError):
        client.open_result(t, "echo", 1, Outcome.OK, res + extra)


# --------------------------------------------------------------------------- keys and parties


def test_another_client_cannot_open_a_result_sealed_to_a_different_client() -> None:
    alice, node = pair()
    mallory = ClientSealer(KEY)  # holds the very same seal key
    t = tid(1)
    _, pub = node.open_task(t, "s", alice.seal_task(t, "s", b"a"))
    sealed = node.seal_result(pub, t, "s", 1, Outcome.OK, b"alice's secret result")
    with pytest.raises(SealError):
        mallory.open_result(t, "s", 1, Outcome.OK, sealed)
    # not even by swapping in its own public key where alice's would go
    assert alice.open_result(t, "s", 1, Outcome.OK, sealed) == b"alice's secret result"


def test_a_node_with_another_seal_key_cannot_open_tasks() -> None:
    client = ClientSealer(KEY)
    stranger = NodeSealer(OTHER)
    t = tid(1)
    with pytest.raises(SealError, match="another seal key"):
        stranger.open_task(t, "s", client.seal_task(t, "s", b"secret args"))


def test_a_client_with_another_seal_key_cannot_open_results() -> None:
    node = NodeSealer(KEY)
    client = ClientSealer(OTHER)
    t = tid(1)
    with pytest.raises(SealError):
        client.open_result(t, "s", 1, Outcome.OK, node.seal_result(client.public, t, "s", 1, Outcome.OK, b"r"))


def test_a_forged_result_without_the_seal_key_fails() -> None:
    # an attacker (say the broker) knows the client's session public key (it is in every
    # task envelope) and makes its own X25519 pair; it lacks only the seal key
    client = ClientSealer(KEY)
    t = tid(1)
    task = client.seal_task(t, "s", b"args")
    client_pub = task[3 : 3 + 32]
    forger = NodeSealer(OTHER)
    forged = forger.seal_result(client_pub, t, "s", 1, Outcome.OK, P.pack_value("forged"))
    with pytest.raises(SealError, match="failed to open"):
        client.open_result(t, "s", 1, Outcome.OK, forged)
    # nor with a random guess at the key schedule
    forged2 = S.RESULT_MAGIC + os.urandom(32) + os.urandom(12) + os.urandom(40)
    with pytest.raises(SealError):
        client.open_result(t, "s", 1, Outcome.OK, forged2)


def test_a_result_naming_an_invalid_node_key_is_a_seal_error() -> None:
    client = ClientSealer(KEY)
    t = tid(1)
    # an all-zero (low-order) X25519 public key makes the key agreement fail
    bogus = S.RESULT_MAGIC + bytes(32) + bytes(12) + bytes(30)
    with pytest.raises(SealError, match="invalid node key"):
        client.open_result(t, "s", 1, Outcome.OK, bogus)


@pytest.mark.parametrize(
    "payload",
    [
        P.pack_value(42),
        P.pack_value([["x"]]),
        P.pack_value(["ValueError", "boom", "tb", "node"]),
        b"",
        b"\xc1",
        b"\xc1T",
        b"\xc1R\x01",
    ],
    ids=["int", "args", "error", "empty", "c1", "c1T", "result-magic-only"],
)
def test_unsealed_or_truncated_data_is_a_seal_error(payload: bytes) -> None:
    client, node = pair()
    t = tid(1)
    with pytest.raises(SealError, match="not sealed"):
        node.open_task(t, "s", payload)
    with pytest.raises(SealError, match="not sealed"):
        client.open_result(t, "s", 1, Outcome.OK, payload)


def test_a_task_envelope_is_not_a_result_and_vice_versa() -> None:
    client, node = pair()
    t = tid(1)
    task = client.seal_task(t, "s", b"x" * 64)
    res = node.seal_result(client.public, t, "s", 1, Outcome.OK, b"y" * 64)
    with pytest.raises(SealError, match="not sealed"):
        client.open_result(t, "s", 1, Outcome.OK, task)
    with pytest.raises(SealError, match="not sealed"):
        node.open_task(t, "s", res)


def test_seal_error_is_a_task_error() -> None:
    assert issubclass(zlink.SealError, TaskError)
    assert zlink.SealError is SealError


def test_equal_plaintexts_give_different_ciphertexts() -> None:
    a, b = ClientSealer(KEY), ClientSealer(KEY)
    t = tid(1)
    ta, tb = a.seal_task(t, "s", b"same"), b.seal_task(t, "s", b"same")
    assert ta != tb
    assert ta[3 + 32 :] != tb[3 + 32 :]  # not just the public key differs
    # within one session, other task ids give other ciphertexts
    assert a.seal_task(tid(1), "s", b"same")[35:] != a.seal_task(tid(2), "s", b"same")[35:]
    # one node sealing the same result twice (e.g. a resend) uses a fresh nonce
    node = NodeSealer(KEY)
    r1 = node.seal_result(a.public, t, "s", 1, Outcome.OK, b"same")
    r2 = node.seal_result(a.public, t, "s", 1, Outcome.OK, b"same")
    assert r1 != r2 and r1[35:47] != r2[35:47]
    assert a.open_result(t, "s", 1, Outcome.OK, r1) == a.open_result(t, "s", 1, Outcome.OK, r2) == b"same"
    # and the same client session seen by two node processes: different keys and nonces
    r3 = NodeSealer(KEY).seal_result(a.public, t, "s", 1, Outcome.OK, b"same")
    assert r3[3:35] != r1[3:35]


def test_result_nonces_never_repeat_within_a_node() -> None:
    client, node = pair()
    t = tid(1)
    nonces = {node.seal_result(client.public, t, "s", 1, Outcome.OK, b"")[35:47] for _ in range(5000)}
    assert len(nonces) == 5000
    assert len({NodeSealer(KEY)._prefix for _ in range(50)}) > 1  # each node process its own prefix


# --------------------------------------------------------------------------- is_sealed


def test_is_sealed() -> None:
    client, node = pair()
    t = tid(1)
    assert is_sealed(client.seal_task(t, "s", b""))
    assert is_sealed(node.seal_result(client.public, t, "s", 1, Outcome.OK, b""))
    assert is_sealed(memoryview(client.seal_task(t, "s", b"x")))
    assert is_sealed(b"\xc1\x00\x00")
    for plain in (b"", b"\xc1", b"\xc1T", P.pack_value(None), P.pack_value([[1, 2]]), b"\xc0\xc1\xc1"):
        assert not is_sealed(plain)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(value=_msgpack_values)
def test_no_plain_msgpack_payload_looks_sealed(value: object) -> None:
    # 0xC1 is the one byte msgpack never emits: a plain payload is never taken for a sealed one
    packed = msgpack.packb(value, use_bin_type=True)
    assert not is_sealed(packed)


# --------------------------------------------------------------------------- SealKey


def test_seal_key_text_round_trip() -> None:
    k = SealKey.generate()
    text = k.text()
    assert text.startswith(SEAL_PREFIX)
    assert SealKey.parse(text) == k
    assert SealKey.parse(f"  {text}\n") == k  # pasted with whitespace
    assert SealKey.parse(text) != SealKey.generate()
    assert hash(SealKey.parse(text)) == hash(k)
    assert k != text  # a key is not equal to its text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not a zlink seal key"),
        ("hello", "not a zlink seal key"),
        ("zlink1:AAAA", "not a zlink seal key"),
        ("ZLINKSEAL1:" + "A" * 43, "not a zlink seal key"),
        (SEAL_PREFIX, "wrong length"),
        (SEAL_PREFIX + "AAAA", "wrong length"),
        (SEAL_PREFIX + "A" * 44, "wrong length"),
        (SEAL_PREFIX + "A" * 41, "damaged"),  # 41 base64 characters cannot be a whole number of bytes
        (SEAL_PREFIX + "!!!!" * 11, "damaged"),
    ],
)
def test_bad_seal_key_text_is_a_clear_config_error(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        SealKey.parse(text)
    if "not a zlink seal key" in words:
        assert "zlink seal-key" in str(info.value)  # says how to make one
    assert "damaged" in str(info.value) or "not a zlink seal key" in str(info.value)


def test_truncated_key_text_says_it_is_damaged() -> None:
    text = SealKey.generate().text()
    for cut in (1, 2, 5, 20):
        with pytest.raises(ConfigError, match="damaged"):
            SealKey.parse(text[:-cut])


def test_raw_keys_must_be_32_bytes() -> None:
    for n in (0, 16, 31, 33, 64):
        with pytest.raises(ConfigError, match="32 bytes"):
            SealKey(bytes(n))


def test_key_id_is_stable_short_and_reveals_nothing() -> None:
    k = SealKey.generate()
    again = SealKey.parse(k.text())
    assert k.key_id == again.key_id
    assert len(k.key_id) == 12 and int(k.key_id, 16) >= 0
    assert KEY.key_id == SealKey(bytes(range(32))).key_id  # a pure function of the key
    assert KEY.key_id != OTHER.key_id
    raw = k._key
    assert k.key_id not in raw.hex() and k.key_id not in k.text()
    assert raw.hex()[:12] != k.key_id
    # repr (and so logs, tracebacks) show the id, never the key
    assert repr(k) == f"SealKey(id={k.key_id})"
    body = k.text()[len(SEAL_PREFIX) :]
    assert body not in repr(k) and body not in str(k)


def test_join_strings_carry_the_key_but_never_show_it() -> None:
    keys = generate_keypair()
    broker = generate_keypair()
    join = Join(endpoints=("tcp://127.0.0.1:7700",), broker_key=broker.public, keys=keys, name="n", role="client")
    assert join.seal_key is None
    sealed = join.with_seal_key(KEY)
    assert sealed.seal_key == KEY and join.seal_key is None  # a copy
    parsed = Join.parse(sealed.dump())
    assert parsed.seal_key == KEY
    assert parsed.keys == keys and parsed.name == "n"
    assert KEY.key_id in repr(parsed) and KEY.text() not in repr(parsed)
    assert Join.parse(parsed.with_seal_key(None).dump()).seal_key is None
    assert Join.parse(join.dump()).seal_key is None


def test_save_and_load(tmp_path: Path) -> None:
    k = SealKey.generate()
    path = tmp_path / "swarm.key"
    k.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == k.text()
    assert SealKey.load(path) == k
    assert SealKey.load(str(path)) == k
    assert load_seal_key(str(path)) == k
    assert load_seal_key(k.text()) == k
    assert load_seal_key(k) is k


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    first = SealKey.generate()
    first.save(path)
    with pytest.raises(FileExistsError):
        SealKey.generate().save(path)
    assert SealKey.load(path) == first
    other = tmp_path / "other.txt"
    other.write_text("precious")
    with pytest.raises(FileExistsError):
        first.save(other)
    assert other.read_text() == "precious"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_load_refuses_a_key_file_others_can_use(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "swarm.key"
    SealKey.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match="readable by other users") as info:
        SealKey.load(path)
    assert "chmod 600" in str(info.value)
    with pytest.raises(ConfigError):
        load_seal_key(str(path))


def test_load_accepts_owner_only_modes(tmp_path: Path) -> None:
    k = SealKey.generate()
    path = tmp_path / "swarm.key"
    k.save(path)
    for mode in (0o400, 0o600, 0o700):
        os.chmod(path, mode)
        assert SealKey.load(path) == k


def test_load_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the seal key file"):
        SealKey.load(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="cannot read"):
        SealKey.load(tmp_path)  # a directory
    junk = tmp_path / "junk.key"
    fd = os.open(junk, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key\n")
    os.close(fd)
    with pytest.raises(ConfigError, match="not a zlink seal key"):
        SealKey.load(junk)
    # and a key text that is not a file path either
    with pytest.raises(ConfigError):
        load_seal_key(str(tmp_path / "nope"))


def _join(seal: SealKey | None = None) -> Join:
    return Join(
        endpoints=("tcp://127.0.0.1:7700",), broker_key=generate_keypair().public,
        keys=generate_keypair(), seal_key=seal,
    )  # fmt: skip


def test_key_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, c, d = (SealKey.generate() for _ in range(4))
    path = tmp_path / "d.key"
    d.save(path)
    monkeypatch.delenv("ZLINK_SEAL_KEY", raising=False)
    assert resolve_seal_key(None, _join()) is None
    monkeypatch.setenv("ZLINK_SEAL_KEY", c.text())
    assert resolve_seal_key(None, _join()) == c  # the environment, last
    monkeypatch.setenv("ZLINK_SEAL_KEY", str(path))
    assert resolve_seal_key(None, _join()) == d  # a path in the environment
    assert resolve_seal_key(None, _join(b)) == b  # the join string beats the environment
    assert resolve_seal_key(a, _join(b)) == a  # the argument beats everything
    assert resolve_seal_key(a.text(), _join(b)) == a
    assert resolve_seal_key(str(path), _join(b)) == d
    monkeypatch.setenv("ZLINK_SEAL_KEY", "   ")
    assert resolve_seal_key(None, _join()) is None  # blank is unset
    monkeypatch.setenv("ZLINK_SEAL_KEY", "zlinkseal1:short")
    with pytest.raises(ConfigError, match="damaged"):
        resolve_seal_key(None, _join())
    os.chmod(path, 0o644)
    monkeypatch.setenv("ZLINK_SEAL_KEY", str(path))
    with pytest.raises(ConfigError, match="readable by other users"):
        resolve_seal_key(None, _join())


# --------------------------------------------------------------------------- odd inputs never escape as other errors


@settings(max_examples=100, deadline=None)
@given(t=st.binary(max_size=64), junk=st.binary(min_size=48, max_size=120))
def test_any_task_id_and_junk_gives_seal_error_only(t: bytes, junk: bytes) -> None:
    # the protocol allows task ids of 0 to 64 bytes: none may crash the node's opener
    client, node = pair()
    with pytest.raises(SealError):
        node.open_task(t, "s", S.TASK_MAGIC + junk)
    sealed = client.seal_task(t, "s", b"ok")
    assert node.open_task(t, "s", sealed)[0] == b"ok"


@pytest.mark.parametrize("short", [b"", b"a", b"1234567"])
def test_a_short_task_id_is_a_seal_error(short: bytes) -> None:
    node = NodeSealer(KEY)
    envelope = S.TASK_MAGIC + os.urandom(32) + os.urandom(40)
    with pytest.raises(SealError):
        node.open_task(short, "s", envelope)


@pytest.mark.parametrize("pub", [bytes(32), (1).to_bytes(32, "little")], ids=["zero", "one"])
def test_a_low_order_client_key_is_a_seal_error(pub: bytes) -> None:
    # a holder of the seal key seals a task under a low-order X25519 public key: no result
    # key can be agreed for it, which must be a SealError, not a ValueError in the node
    node = NodeSealer(KEY)
    t = tid(1)
    nonce = t[-8:].rjust(12, b"\0")  # the task id's counter
    body = KEY.task_aead(pub).encrypt(nonce, P.pack_value([[1]]), S._task_ad(t, "s"))
    with pytest.raises(SealError, match="invalid client key"):
        _, got = node.open_task(t, "s", S.TASK_MAGIC + pub + body)
        node.seal_result(got, t, "s", 1, Outcome.OK, P.pack_value(1))

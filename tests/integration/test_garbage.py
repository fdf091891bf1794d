"""Garbage from an authenticated peer: the broker answers ERROR, counts it, and keeps serving.

The broker is a CLI process started with ``--max-message-size 65536``; the raw
peer is a pyzmq DEALER with a real client key (CurveZMQ handshake succeeds).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import zlink
from zlink import protocol as P
from zlink.demo import LocalSwarm

from .conftest import RawPeer, invite, start_swarm, wait_for

LIMIT = 64 * 1024
MakeRaw = Callable[[str, "zlink.Join | None"], RawPeer]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    sw = start_swarm(
        tmp_path_factory.mktemp("garbage") / "home",
        ["garbage-node"],
        slots=2,
        broker_args=("--max-message-size", str(LIMIT)),
        seal=False,  # raw peers here send hand-made plain payloads to the node
    )
    try:
        yield sw
    finally:
        sw.close()


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.invite("client", "normal-client"), connect_timeout=15) as c:
        assert c.max_message_size == LIMIT  # learnt from WELCOME
        yield c


@pytest.fixture(scope="module")
def raw_join(swarm: LocalSwarm) -> zlink.Join:
    return zlink.Join.parse(swarm.invite("client", "raw-garbage"))


def _spec(i: int, skill: str = "square") -> list[Any]:
    return [os.urandom(8) + i.to_bytes(8, "big"), skill, None, 3, [], []]


def _hdr(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _submit1(task: list[Any]) -> list[bytes]:
    """A SUBMIT header carrying one (possibly malformed) task record, plus one payload frame."""
    return [_hdr({"v": 1, "c": "SUBMIT", "tasks": [task]}), b"x"]


# (id, frames, expected ERROR code)
CASES: list[tuple[str, list[bytes], str]] = [
    ("random-bytes", [b"\xc1" + bytes(range(256)) * 4], "malformed"),
    ("empty-frame", [b""], "malformed"),
    ("not-a-map", [_hdr([1, "HELLO", 3])], "malformed"),
    ("int-keys", [_hdr({1: 1, 2: "STATUS"})], "malformed"),
    ("truncated", [_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec(1)]})[:-7], b"x"], "malformed"),
    ("too-deep", [b"\x91" * 5000 + b"\xc0"], "malformed"),
    ("wrong-version", [_hdr({"v": 2, "c": "STATUS"})], "bad-version"),
    ("no-version", [_hdr({"c": "STATUS"})], "bad-version"),
    ("version-as-string", [_hdr({"v": "1", "c": "STATUS"})], "bad-version"),
    ("unknown-command", [_hdr({"v": 1, "c": "FROBNICATE"})], "unknown-command"),
    ("command-not-a-string", [_hdr({"v": 1, "c": 7})], "unknown-command"),
    ("tasks-not-a-list", [_hdr({"v": 1, "c": "SUBMIT", "tasks": "abc"})], "bad-field"),
    ("task-record-short", _submit1([b"t", "square"]), "bad-field"),
    ("task-id-not-bytes", _submit1(["t", "square", None, 3, [], []]), "bad-field"),
    ("negative-timeout", _submit1([b"t", "square", -1.0, 3, [], []]), "bad-field"),
    ("attempts-out-of-range", _submit1([b"t", "square", None, 0, [], []]), "bad-field"),
    ("hello-session-int", [_hdr({"v": 1, "c": "HELLO", "session": 123, "role": "client"})], "bad-field"),
    ("hello-no-session", [_hdr({"v": 1, "c": "HELLO", "role": "client"})], "bad-field"),
    ("cancel-ids-ints", [_hdr({"v": 1, "c": "CANCEL", "tids": [1, 2]})], "bad-field"),
    ("skill-name-too-long", _submit1(_spec(1, "s" * 500)), "bad-field"),
    ("submit-extra-frame", [_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec(1)]}), b"x", b"y"], "frame-count"),
    ("submit-missing-frame", [_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec(1), _spec(2)]}), b"x"], "frame-count"),
    ("status-with-frame", [_hdr({"v": 1, "c": "STATUS"}), b"x"], "frame-count"),
    (
        "multi-frame-over-limit",
        [_hdr({"v": 1, "c": "SUBMIT", "tasks": [_spec(i) for i in range(3)]}), *(b"p" * 30_000 for _ in range(3))],
        "too-large",
    ),
]


def _counts(client: zlink.Client) -> tuple[int, dict[str, int]]:
    st = client.status()
    return st["counters"]["protocol_errors"], st["errors"]


def _serves(client: zlink.Client, n: int = 300) -> None:
    assert list(client.map("square", range(n), timeout=30)) == [x * x for x in range(n)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("frames", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_garbage_gets_error_and_is_counted(
    swarm: LocalSwarm, client: zlink.Client, raw_join: zlink.Join, raw_peer: MakeRaw, frames: list[bytes], code: str
) -> None:
    before_total, before = _counts(client)
    # a normal client keeps working while the garbage goes in
    errors: list[BaseException] = []

    def run_bg() -> None:
        try:
            _serves(client)
        except BaseException as exc:  # reported below
            errors.append(exc)

    background = threading.Thread(target=run_bg)
    background.start()
    try:
        raw = raw_peer(swarm.endpoint, raw_join)
        reply = raw.ask(frames, timeout=10)
    finally:
        background.join(40)
    assert not background.is_alive()
    assert not errors, errors
    assert isinstance(reply, P.Error), reply
    assert reply.code == code, reply
    assert reply.message
    assert reply.tids == ()
    # nothing more comes back for one bad message
    assert raw.recv(timeout=0.2) is None
    after_total, after = _counts(client)
    assert after.get(code, 0) - before.get(code, 0) == 1
    assert after_total - before_total == 1
    _serves(client, 100)


@pytest.mark.timeout(30)
def test_garbage_after_hello_does_not_unregister_the_peer(
    swarm: LocalSwarm, client: zlink.Client, raw_join: zlink.Join, raw_peer: MakeRaw
) -> None:
    raw = raw_peer(swarm.endpoint, raw_join)
    welcome = raw.ask([P.encode(P.Hello(name="raw-garbage", role="client", session=os.urandom(8)))])
    assert isinstance(welcome, P.Welcome)
    for frames, code in [c[1:] for c in CASES[:8]]:
        reply = raw.ask(frames)
        assert isinstance(reply, P.Error) and reply.code == code
    # a valid command from the wrong role
    item = P.ResultItem(b"x" * 16, 1, P.Outcome.OK)
    reply = raw.ask([P.encode(P.Result(results=(item,))), b"\x01"])
    assert isinstance(reply, P.Error) and reply.code == "unexpected"
    # still registered: a real task goes through on the raw connection
    spec = P.TaskSpec(os.urandom(16), "square", 20.0, 1, (), ())
    reply = raw.ask([P.encode(P.Submit(tasks=(spec,))), P.pack_value([[11]])], timeout=20)
    assert isinstance(reply, P.Result)
    assert [(r.tid, r.status) for r in reply.results] == [(spec.tid, P.Outcome.OK)]
    _serves(client, 100)


@pytest.mark.timeout(30)
def test_undecodable_task_payload_is_a_remote_error(
    swarm: LocalSwarm, client: zlink.Client, raw_join: zlink.Join, raw_peer: MakeRaw
) -> None:
    # the broker never decodes payloads; the node does, and answers ERROR for garbage
    raw = raw_peer(swarm.endpoint, raw_join)
    assert isinstance(raw.ask([P.encode(P.Hello(name="raw-payload", role="client", session=os.urandom(8)))]), P.Welcome)
    specs = tuple(P.TaskSpec(os.urandom(16), "square", 20.0, 1, (), ()) for _ in range(3))
    payloads = [b"\x93\xc1\xc1", P.pack_value({"not": "a list"}), P.pack_value([["a", "b"]])]
    raw.send([P.encode(P.Submit(tasks=specs)), *payloads])
    outcomes: dict[bytes, tuple[int, Any]] = {}
    while len(outcomes) < 3:
        frames = raw.recv(timeout=20)
        assert frames is not None, f"only {len(outcomes)} of 3 results came back"
        msg = P.decode(frames[0], len(frames) - 1)
        assert isinstance(msg, P.Result)
        for item, payload in zip(msg.results, frames[1:], strict=True):
            outcomes[item.tid] = (item.status, P.unpack_value(payload))
    for spec in specs:
        status, value = outcomes[spec.tid]
        assert status == P.Outcome.ERROR
        assert isinstance(value, list) and len(value) >= 3
    # the third payload decodes but square("a", "b") is a TypeError in the skill
    assert outcomes[specs[2].tid][1][0] == "TypeError"
    assert outcomes[specs[0].tid][1][0].endswith("RemoteProtocolError")
    _serves(client, 100)


@pytest.mark.timeout(30)
def test_single_frame_over_limit_drops_or_errors_but_broker_survives(
    swarm: LocalSwarm, client: zlink.Client, raw_join: zlink.Join, raw_peer: MakeRaw
) -> None:
    raw = raw_peer(swarm.endpoint, raw_join)
    big = _hdr({"v": 1, "c": "STATUS", "pad": "x" * (LIMIT + 1024)})
    raw.send([big])
    reply = raw.recv(timeout=2.0)
    # libzmq's ZMQ_MAXMSGSIZE drops the connection (silence); an ERROR reply is also acceptable
    if reply is not None:
        msg = P.decode(reply[0], len(reply) - 1)
        assert isinstance(msg, P.Error) and msg.code == "too-large"
    _serves(client)
    assert swarm.broker is not None and swarm.broker.poll() is None
    # the same key can come back (the DEALER reconnects by itself) and is answered as before
    again = wait_for(
        lambda: raw.ask([_hdr({"v": 1, "c": "NOPE"})], timeout=1.0), timeout=15, what="an answer after the drop"
    )
    assert isinstance(again, P.Error) and again.code == "unknown-command"


@pytest.mark.timeout(30)
def test_client_refuses_arguments_over_the_limit(client: zlink.Client) -> None:
    with pytest.raises(zlink.RejectedError) as info:
        client.submit("echo", "x" * (LIMIT + 1))
    assert info.value.code == "too-large"
    assert client.submit("echo", "y" * 1000).result(timeout=20) == "y" * 1000


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=300))
def test_fuzzed_headers_get_the_error_decode_predicts(
    swarm: LocalSwarm, client: zlink.Client, raw_join: zlink.Join, raw_peer: MakeRaw, data: bytes
) -> None:
    try:
        P.decode(data, 0)
    except zlink.RemoteProtocolError as exc:
        expected = exc.code
    else:
        assume(False)  # a well-formed command: not garbage
    raw = _fuzz_peer(swarm, raw_join, raw_peer)
    reply = raw.ask([data], timeout=10)
    assert isinstance(reply, P.Error) and reply.code == expected


_FUZZ: dict[str, RawPeer] = {}


def _fuzz_peer(swarm: LocalSwarm, join: zlink.Join, raw_peer: MakeRaw) -> RawPeer:
    # one connection for all examples (raw_peer closes it when the test ends)
    peer = _FUZZ.get(swarm.endpoint)
    if peer is None or peer.sock.closed:
        peer = _FUZZ[swarm.endpoint] = raw_peer(swarm.endpoint, join)
    return peer


@pytest.mark.timeout(30)
def test_broker_alive_and_errors_counted_at_the_end(swarm: LocalSwarm, client: zlink.Client) -> None:
    assert swarm.broker is not None and swarm.broker.poll() is None
    total, errors = _counts(client)
    for _, _, code in CASES:
        assert errors.get(code, 0) >= 1, (code, errors)
    assert total >= len(CASES)
    assert total == sum(errors.values())
    _serves(client)


@pytest.mark.timeout(60)
def test_results_batched_over_the_limit_still_arrive(tmp_path: Any) -> None:
    broker = zlink.Broker(bind="tcp://127.0.0.1:*", home=tmp_path / "home", max_message_size=LIMIT).start()
    try:
        node = zlink.Node(invite(broker, "blob-node", "node"), slots=4, connect_timeout=15)

        @node.skill()
        def blob(n: int) -> str:
            return "x" * n

        node.start()
        try:
            with zlink.Client(invite(broker, "blob-client", "client"), connect_timeout=15) as c:
                # each result is well under the limit; two of them together are not
                futs = [c.submit("blob", 40_000, timeout=5) for _ in range(16)]
                assert [len(f.result(timeout=20)) for f in futs] == [40_000] * 16
        finally:
            node.stop()
    finally:
        broker.stop()

"""Unit tests for the sans-IO wire protocol in :mod:`zlink.protocol`."""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zlink import protocol as P
from zlink.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from zlink.protocol import Outcome

SETTINGS = settings(
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DECODE_CODES = {"malformed", "bad-version", "unknown-command", "bad-field", "frame-count", "too-large"}

# --------------------------------------------------------------------------- strategies

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
#: values that survive a msgpack round trip unchanged (lists, not tuples; str keys)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
#: any msgpack value, including maps with non-string keys
any_msgpack = st.recursive(
    msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(st.text(max_size=5), st.integers(-5, 5), st.binary(max_size=3)), inner, max_size=4)
    ),
    max_leaves=12,
)


def text(limit: int) -> st.SearchStrategy[str]:
    # mostly short, sometimes exactly at the limit
    return st.text(max_size=min(limit, 40)) | st.just("z" * limit)


ids = st.binary(max_size=P.MAX_ID)
names = text(P.MAX_NAME)
keys = st.lists(text(256), max_size=4).map(tuple) | st.just(tuple("k" for _ in range(P.MAX_KEYS)))
timeouts = st.none() | st.floats(min_value=0.0, max_value=1e7, allow_nan=False)
running = st.lists(st.tuples(ids, st.integers(0, P.MAX_ATTEMPT)), max_size=4).map(tuple)
statuses = st.sampled_from(sorted(Outcome.ALL))

task_specs = st.builds(P.TaskSpec, ids, names, timeouts, st.integers(1, 100), keys, keys)
dispatch_items = st.builds(P.DispatchItem, ids, names, st.integers(1, P.MAX_ATTEMPT), timeouts)
result_items = st.builds(P.ResultItem, ids, st.integers(0, P.MAX_ATTEMPT), statuses)


def batch(items: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(items, max_size=5).map(tuple)


STRATEGIES: dict[str, st.SearchStrategy[P.Message]] = {
    "HELLO": st.builds(
        P.Hello,
        name=names,
        role=text(16),
        session=ids,
        skills=st.dictionaries(st.text(max_size=20), msgpack_values, max_size=5),
        slots=st.integers(0, 100_000),
        prefetch=st.integers(0, 100_000),
        running=running,
        epoch=st.none() | ids,
        agent=text(128),
    ),
    "WELCOME": st.builds(
        P.Welcome,
        epoch=ids,
        name=names,
        role=text(16),
        heartbeat_interval=st.floats(0.001, 3600),
        liveness=st.integers(1, 1000),
        max_message_size=st.integers(1, 2**40),
        beacon_port=st.integers(0, 65535),
        heartbeat_port=st.integers(0, 65535),
        time=st.floats(0.0, 1e12),
    ),
    "SUBMIT": st.builds(P.Submit, tasks=batch(task_specs), resubmit=st.booleans()),
    "DISPATCH": st.builds(P.Dispatch, tasks=batch(dispatch_items)),
    "RESULT": st.builds(P.Result, results=batch(result_items)),
    "CANCEL": st.builds(P.Cancel, tids=batch(ids)),
    "HEARTBEAT": st.builds(
        P.Heartbeat, session=ids, epoch=st.none() | ids, free=st.integers(0, 100_000), running=running
    ),
    "BEACON": st.builds(P.Beacon, epoch=ids, time=st.floats(0.0, 1e12)),
    "STATUS": st.just(P.Status()),
    "STATUS_REPLY": st.builds(P.StatusReply, status=st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5)),
    "ERROR": st.builds(P.Error, code=text(64), message=text(4096), tids=batch(ids)),
    "BYE": st.builds(P.Bye, reason=text(4096)),
    "ACK": st.builds(P.Ack, tids=batch(ids)),
    "DRAIN": st.builds(P.Drain, reason=text(4096)),
    "CREDIT": st.builds(P.Credit, slots=st.integers(0, 100_000)),
    "SEND": st.builds(P.SendMessage, to=names, mid=ids, ttl=st.floats(0.0, 86_400.0)),
    "PUBLISH": st.builds(P.Publish, topic=names, mid=ids),
    "SUBSCRIBE": st.builds(P.Subscribe, topics=st.lists(names, max_size=10).map(tuple), stop=st.booleans()),
    "DELIVER": st.builds(P.Deliver, sender=names, mid=ids, topic=names),
    "SENT": st.builds(P.Sent, mid=ids, ok=st.booleans(), reason=text(4096)),
    "ANSWER": st.builds(P.Answer, tid=ids, seq=st.integers(1, 2**31), attempt=st.integers(0, P.MAX_ATTEMPT)),
}

any_message = st.sampled_from(sorted(STRATEGIES)).flatmap(lambda c: STRATEGIES[c])

#: one minimal valid instance of every command (required fields only)
MINIMAL: dict[str, P.Message] = {
    "HELLO": P.Hello(session=b"s"),
    "WELCOME": P.Welcome(epoch=b"e", name="n", role="client", heartbeat_interval=0.5, liveness=3, max_message_size=10),
    "SUBMIT": P.Submit(tasks=(P.TaskSpec(b"t1", "echo"), P.TaskSpec(b"t2", "echo", 1.5, 2, ("r",), ("w",)))),
    "DISPATCH": P.Dispatch(tasks=(P.DispatchItem(b"t1", "echo", 1),)),
    "RESULT": P.Result(results=(P.ResultItem(b"t1", 1, Outcome.OK), P.ResultItem(b"t2", 0, Outcome.PARTIAL))),
    "CANCEL": P.Cancel(tids=(b"t1",)),
    "HEARTBEAT": P.Heartbeat(session=b"s"),
    "BEACON": P.Beacon(epoch=b"e"),
    "STATUS": P.Status(),
    "STATUS_REPLY": P.StatusReply(status={"a": 1}),
    "ERROR": P.Error(code="oops"),
    "BYE": P.Bye(),
    "ACK": P.Ack(tids=(b"t1",)),
    "DRAIN": P.Drain(),
    "CREDIT": P.Credit(slots=0),
    "SEND": P.SendMessage(to="bob", mid=b"m1"),
    "PUBLISH": P.Publish(topic="news", mid=b"m2"),
    "SUBSCRIBE": P.Subscribe(topics=("news",)),
    "DELIVER": P.Deliver(sender="alice", mid=b"m1"),
    "SENT": P.Sent(mid=b"m1"),
    "ANSWER": P.Answer(tid=b"t1", seq=1),
}

REQUIRED: dict[str, set[str]] = {
    "HELLO": {"session"},
    "WELCOME": {"epoch", "name", "role", "heartbeat_interval", "liveness", "max_message_size"},
    "SUBMIT": {"tasks"},
    "DISPATCH": {"tasks"},
    "RESULT": {"results"},
    "CANCEL": {"tids"},
    "HEARTBEAT": {"session"},
    "BEACON": {"epoch"},
    "STATUS": set(),
    "STATUS_REPLY": {"status"},
    "ERROR": {"code"},
    "BYE": set(),
    "ACK": {"tids"},
    "DRAIN": set(),
    "CREDIT": {"slots"},
    "SEND": {"to", "mid"},
    "PUBLISH": {"topic", "mid"},
    "SUBSCRIBE": {"topics"},
    "DELIVER": {"sender", "mid"},
    "SENT": {"mid"},
    "ANSWER": {"tid", "seq"},
}

#: values no validator in the protocol accepts, whatever the field
WRONG_FOR_EVERY_FIELD: list[Any] = [True, False, -1, 1e300, [[[]]], "x" * 5000]


def header_of(msg: P.Message) -> dict[str, Any]:
    header = msgpack.unpackb(P.encode(msg), raw=False)
    assert isinstance(header, dict)
    return header


def pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode_code(data: bytes | memoryview, frames: int = 0) -> str | P.Message:
    """Decode; return the message, or the error code. Anything else propagates."""
    try:
        return P.decode(data, frames)
    except RemoteProtocolError as exc:
        assert type(exc) is RemoteProtocolError
        assert exc.code in DECODE_CODES, exc.code
        assert str(exc)
        return exc.code


def roundtrip(msg: P.Message) -> P.Message:
    data = P.encode(msg)
    assert isinstance(data, bytes)
    return P.decode(data, msg.payload_count())


# --------------------------------------------------------------------------- round trips


def test_strategies_cover_every_command() -> None:
    assert set(STRATEGIES) == set(P.COMMANDS)
    assert set(MINIMAL) == set(P.COMMANDS)
    assert set(REQUIRED) == set(P.COMMANDS)
    for command, cls in P.COMMANDS.items():
        assert command == cls.COMMAND
        assert type(MINIMAL[command]) is cls


@pytest.mark.parametrize("command", sorted(P.COMMANDS))
def test_minimal_roundtrip(command: str) -> None:
    msg = MINIMAL[command]
    back = roundtrip(msg)
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("command", sorted(P.COMMANDS))
@SETTINGS
@given(data=st.data())
def test_roundtrip_generated(command: str, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[command])
    back = roundtrip(msg)
    assert type(back) is type(msg)
    assert back == msg
    # tuples stay tuples, records come back as their record types
    for name, _ in msg.SCHEMA:
        value = getattr(back, name)
        if isinstance(getattr(msg, name), tuple):
            assert type(value) is tuple
            for got, want in zip(value, getattr(msg, name), strict=True):
                assert type(got) is type(want)


def test_header_layout() -> None:
    header = header_of(P.Submit(tasks=(P.TaskSpec(b"t", "s", 2.0, 4, ("a",), ()),)))
    assert header == {
        "v": P.PROTOCOL_VERSION, "c": "SUBMIT", "tasks": [[b"t", "s", 2.0, 4, ["a"], []]], "resubmit": False,
    }  # fmt: skip


def test_payload_counts() -> None:
    assert MINIMAL["SUBMIT"].payload_count() == 2
    assert MINIMAL["DISPATCH"].payload_count() == 1
    assert MINIMAL["RESULT"].payload_count() == 2
    for command in (
        "HELLO", "WELCOME", "CANCEL", "HEARTBEAT", "BEACON", "STATUS", "STATUS_REPLY", "ERROR", "BYE", "ACK", "DRAIN",
        "CREDIT",
    ):  # fmt: skip
        assert MINIMAL[command].payload_count() == 0


@pytest.mark.parametrize("command", sorted(c for c, req in REQUIRED.items() if req != set(MINIMAL[c].SCHEMA)))
def test_optional_fields_default_when_absent(command: str) -> None:
    msg = MINIMAL[command]
    header = {k: v for k, v in header_of(msg).items() if k in ("v", "c") or k in REQUIRED[command]}
    assert P.decode(pack(header), msg.payload_count()) == msg


def test_unknown_extra_keys_are_ignored() -> None:
    header = header_of(P.Bye(reason="done"))
    header["future-field"] = [1, 2, 3]
    assert P.decode(pack(header)) == P.Bye(reason="done")


def test_int_is_accepted_for_float_fields_and_becomes_float() -> None:
    header = header_of(MINIMAL["WELCOME"])
    header["heartbeat_interval"] = 2
    msg = P.decode(pack(header))
    assert isinstance(msg, P.Welcome)
    assert type(msg.heartbeat_interval) is float
    assert msg.heartbeat_interval == 2.0


def test_decode_accepts_memoryview() -> None:
    data = P.encode(MINIMAL["CANCEL"])
    assert P.decode(memoryview(data)) == MINIMAL["CANCEL"]


# --------------------------------------------------------------------------- limits


def _welcome(**kw: Any) -> P.Welcome:
    args: dict[str, Any] = {
        "epoch": b"e", "name": "n", "role": "r", "heartbeat_interval": 1.0, "liveness": 1, "max_message_size": 1,
    }  # fmt: skip
    return P.Welcome(**{**args, **kw})


@pytest.mark.parametrize(
    ("msg", "ok"),
    [
        (P.Hello(session=b"s" * P.MAX_ID), True),
        (P.Hello(session=b"s" * (P.MAX_ID + 1)), False),
        (P.Hello(session=b"s", name="n" * P.MAX_NAME), True),
        (P.Hello(session=b"s", name="n" * (P.MAX_NAME + 1)), False),
        (P.Hello(session=b"s", role="r" * 16), True),
        (P.Hello(session=b"s", role="r" * 17), False),
        (P.Hello(session=b"s", slots=100_000), True),
        (P.Hello(session=b"s", slots=100_001), False),
        (P.Hello(session=b"s", slots=-1), False),
        (P.Hello(session=b"s", running=((b"t", P.MAX_ATTEMPT),)), True),
        (P.Hello(session=b"s", running=((b"t", P.MAX_ATTEMPT + 1),)), False),
        (P.Hello(session=b"s", running=((b"t", 1, 2),)), False),
        (P.Hello(session=b"s", skills={str(i): i for i in range(4096)}), True),
        (P.Hello(session=b"s", skills={str(i): i for i in range(4097)}), False),
        (P.Hello(session=b"s", epoch=b"e" * 65), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", max_attempts=0),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", max_attempts=100),)), True),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", max_attempts=101),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", timeout=1e7),)), True),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", timeout=1e7 + 1),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", timeout=-0.5),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", timeout=float("inf")),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", timeout=float("nan")),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", reads=tuple("k" * 256 for _ in range(P.MAX_KEYS))),)), True),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", reads=tuple("k" for _ in range(P.MAX_KEYS + 1))),)), False),
        (P.Submit(tasks=(P.TaskSpec(b"t", "s", writes=("k" * 257,)),)), False),
        (P.Dispatch(tasks=(P.DispatchItem(b"t", "s", 0),)), False),
        (P.Dispatch(tasks=(P.DispatchItem(b"t", "s", P.MAX_ATTEMPT + 1),)), False),
        (P.Result(results=(P.ResultItem(b"t", 0, max(Outcome.ALL) + 1),)), False),
        (P.Result(results=(P.ResultItem(b"t", 0, -1),)), False),
        (P.Result(results=(P.ResultItem(b"t", P.MAX_ATTEMPT + 1, Outcome.OK),)), False),
        (_welcome(heartbeat_interval=0.0), False),
        (_welcome(heartbeat_interval=0.001), True),
        (_welcome(heartbeat_interval=3600.5), False),
        (_welcome(liveness=0), False),
        (_welcome(max_message_size=2**40), True),
        (_welcome(max_message_size=2**40 + 1), False),
        (_welcome(beacon_port=65535, heartbeat_port=65535), True),
        (_welcome(beacon_port=65536), False),
        (_welcome(time=-1.0), False),
        (P.Error(code="c" * 64, message="m" * 4096), True),
        (P.Error(code="c" * 65), False),
        (P.Error(code="c", message="m" * 4097), False),
        (P.Cancel(tids=(b"t" * 65,)), False),
        (P.Heartbeat(session=b"s", free=100_001), False),
        (P.Bye(reason="r" * 4097), False),
        (P.StatusReply(status={"a": {"nested": [1, 2]}}), True),
    ],
)
def test_validator_limits(msg: P.Message, ok: bool) -> None:
    got = decode_code(P.encode(msg), msg.payload_count())
    if ok:
        assert got == msg
    else:
        assert got == "bad-field"


def test_batch_limit() -> None:
    msg = P.Cancel(tids=tuple(b"" for _ in range(P.MAX_BATCH)))
    assert P.decode(P.encode(msg)) == msg
    too_many = P.Cancel(tids=tuple(b"" for _ in range(P.MAX_BATCH + 1)))
    assert decode_code(P.encode(too_many)) == "bad-field"


# --------------------------------------------------------------------------- specific error codes


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x82\xa1v\x01", b"\x81\xa1v\x01\x00", b"\xd9", b"\x91" * 5000 + b"\xc0"],
    ids=["empty", "reserved-byte", "truncated-map", "trailing-byte", "truncated-str", "too-deep"],
)
def test_not_msgpack_is_malformed(data: bytes) -> None:
    assert decode_code(data) == "malformed"


@pytest.mark.parametrize("value", [None, 1, "HELLO", b"x", [1, "c"], [{"v": 1, "c": "STATUS"}], 1.5, True])
def test_not_a_map_is_malformed(value: Any) -> None:
    assert decode_code(pack(value)) == "malformed"


def test_map_with_non_string_keys_is_malformed() -> None:
    assert decode_code(pack({"v": 1, "c": "STATUS", 7: 1})) == "malformed"
    assert decode_code(pack({"v": 1, "c": "STATUS", "x": {1: 2}})) == "malformed"


@pytest.mark.parametrize("version", [None, 0, 2, -1, "1", b"\x01", [1], {"v": 1}, 1.5])
def test_wrong_version(version: Any) -> None:
    assert decode_code(pack({"v": version, "c": "STATUS"})) == "bad-version"


def test_missing_version() -> None:
    assert decode_code(pack({"c": "STATUS"})) == "bad-version"
    assert decode_code(pack({})) == "bad-version"


@pytest.mark.parametrize("version", [True, 1.0, 1.0 + 2**-52])
def test_version_must_be_the_integer(version: Any) -> None:
    # True == 1 and 1.0 == 1 in Python; the wire version is the integer 1
    assert decode_code(pack({"v": version, "c": "STATUS"})) == "bad-version"


@pytest.mark.parametrize("command", [None, "", "NOPE", "hello", "Status", 1, b"STATUS", ["STATUS"], "x" * 1000])
def test_unknown_command(command: Any) -> None:
    assert decode_code(pack({"v": P.PROTOCOL_VERSION, "c": command})) == "unknown-command"


def test_missing_command() -> None:
    assert decode_code(pack({"v": P.PROTOCOL_VERSION})) == "unknown-command"


@pytest.mark.parametrize("command", sorted(c for c in P.COMMANDS if MINIMAL[c].SCHEMA))
@pytest.mark.parametrize("wrong", WRONG_FOR_EVERY_FIELD, ids=repr)
def test_wrong_type_in_each_field_is_bad_field(command: str, wrong: Any) -> None:
    msg = MINIMAL[command]
    for name, _ in msg.SCHEMA:
        if type(wrong) is bool and type(getattr(msg, name)) is bool:
            continue  # a boolean is right for a boolean field
        header = header_of(msg)
        header[name] = wrong
        assert decode_code(pack(header), msg.payload_count()) == "bad-field", name


@pytest.mark.parametrize("command", sorted(c for c in P.COMMANDS if REQUIRED[c]))
def test_missing_required_field_is_bad_field(command: str) -> None:
    msg = MINIMAL[command]
    for name in REQUIRED[command]:
        header = header_of(msg)
        del header[name]
        assert decode_code(pack(header), msg.payload_count()) == "bad-field", name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tasks", [[b"t", "s", None, 3, [], []], [b"t"]]),  # short record
        ("tasks", [[b"t", "s", None, 3, [], [], "extra"]]),  # long record
        ("tasks", [["t", "s", None, 3, [], []]]),  # str tid
        ("tasks", [[b"t", b"s", None, 3, [], []]]),  # bytes skill
        ("tasks", [[b"t", "s", "1", 3, [], []]]),  # str timeout
        ("tasks", [[b"t", "s", None, 3.0, [], []]]),  # float attempts
        ("tasks", [[b"t", "s", None, 3, ["a", 1], []]]),  # non-str key
        ("tasks", {"0": [b"t", "s", None, 3, [], []]}),  # map instead of list
    ],
)
def test_bad_nested_records(field: str, value: Any) -> None:
    header = {"v": 1, "c": "SUBMIT", field: value}
    assert decode_code(pack(header), 1) == "bad-field"


@pytest.mark.parametrize("command", sorted(P.COMMANDS))
def test_wrong_frame_count(command: str) -> None:
    msg = MINIMAL[command]
    data = P.encode(msg)
    n = msg.payload_count()
    assert P.decode(data, n) == msg
    assert decode_code(data, n + 1) == "frame-count"
    if n:
        assert decode_code(data, n - 1) == "frame-count"
        assert decode_code(data, 0) == "frame-count"


def test_empty_batch_needs_no_frames() -> None:
    msg = P.Submit(tasks=())
    assert P.decode(P.encode(msg), 0) == msg
    assert decode_code(P.encode(msg), 1) == "frame-count"


def test_oversize_header() -> None:
    base = {"v": 1, "c": "STATUS", "pad": b""}
    overhead = len(pack(base))
    # an empty bin is 0xc4 + 1 length byte; a bin of n > 65535 bytes is 0xc6 + 4 length bytes
    n = P.MAX_HEADER_SIZE - overhead - 3
    exact = pack({**base, "pad": b"x" * n})
    assert len(exact) == P.MAX_HEADER_SIZE
    assert P.decode(exact) == P.Status()
    too_big = pack({**base, "pad": b"x" * (n + 1)})
    assert decode_code(too_big) == "too-large"
    assert decode_code(memoryview(too_big)) == "too-large"
    # the size check happens before any parsing
    assert decode_code(b"\xc1" * (P.MAX_HEADER_SIZE + 1)) == "too-large"


# --------------------------------------------------------------------------- fuzzing decode


@SETTINGS
@given(data=st.binary(max_size=300), frames=st.integers(0, 3))
@example(data=b"\x80", frames=0)
@example(data=b"\x82\xa1v\x01\xa1c\xa6STATUS", frames=0)
def test_random_bytes_raise_only_remote_protocol_error(data: bytes, frames: int) -> None:
    got = decode_code(data, frames)
    if not isinstance(got, str):
        assert isinstance(got, P.Message)


@SETTINGS
@given(value=any_msgpack, frames=st.integers(0, 2))
def test_random_msgpack_values(value: Any, frames: int) -> None:
    got = decode_code(pack(value), frames)
    if not isinstance(value, dict) or any(not isinstance(k, str | bytes) for k in _all_map_keys(value)):
        assert got == "malformed"
    elif value.get("v") != P.PROTOCOL_VERSION:
        assert got == "bad-version"


def _all_map_keys(value: Any) -> list[Any]:
    out: list[Any] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append(k)
            out.extend(_all_map_keys(v))
    elif isinstance(value, list):
        for v in value:
            out.extend(_all_map_keys(v))
    return out


@SETTINGS
@given(
    fields=st.dictionaries(st.text(max_size=12), any_msgpack, max_size=6),
    command=st.sampled_from(sorted(P.COMMANDS)),
)
def test_random_fields_for_valid_commands(fields: dict[str, Any], command: str) -> None:
    header = {**fields, "v": P.PROTOCOL_VERSION, "c": command}
    got = decode_code(pack(header), MINIMAL[command].payload_count())
    assert got in DECODE_CODES or isinstance(got, P.COMMANDS[command])


@SETTINGS
@given(msg=any_message, data=st.data())
def test_truncated_headers_are_malformed(msg: P.Message, data: st.DataObject) -> None:
    encoded = P.encode(msg)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    assert decode_code(encoded[:cut], msg.payload_count()) == "malformed"


@SETTINGS
@given(msg=any_message, extra=st.binary(min_size=1, max_size=4))
def test_trailing_bytes_are_malformed(msg: P.Message, extra: bytes) -> None:
    assert decode_code(P.encode(msg) + extra, msg.payload_count()) == "malformed"


@SETTINGS
@given(msg=any_message, data=st.data())
def test_bit_flips_raise_only_remote_protocol_error(msg: P.Message, data: st.DataObject) -> None:
    encoded = bytearray(P.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] ^= 1 << data.draw(st.integers(0, 7))
    got = decode_code(bytes(encoded), msg.payload_count())
    assert isinstance(got, str | P.Message)


@SETTINGS
@given(msg=any_message, data=st.data())
def test_wrong_type_per_field_generated(msg: P.Message, data: st.DataObject) -> None:
    if not msg.SCHEMA:
        return
    name = data.draw(st.sampled_from([n for n, _ in msg.SCHEMA]))
    header = header_of(msg)
    wrong = data.draw(st.sampled_from(WRONG_FOR_EVERY_FIELD))
    if type(wrong) is bool and type(getattr(msg, name)) is bool:
        return  # a boolean is right for a boolean field
    header[name] = wrong
    assert decode_code(pack(header), msg.payload_count()) == "bad-field"


@SETTINGS
@given(msg=any_message, data=st.data())
def test_any_value_in_a_field_raises_only_remote_protocol_error(msg: P.Message, data: st.DataObject) -> None:
    if not msg.SCHEMA:
        return
    name = data.draw(st.sampled_from([n for n, _ in msg.SCHEMA]))
    header = header_of(msg)
    header[name] = data.draw(any_msgpack)
    got = decode_code(pack(header), msg.payload_count())
    assert got in ("malformed", "bad-field", "frame-count") or isinstance(got, type(msg))


# --------------------------------------------------------------------------- user values


@SETTINGS
@given(value=msgpack_values)
def test_pack_value_roundtrip(value: Any) -> None:
    data = P.pack_value(value)
    assert isinstance(data, bytes)
    assert P.unpack_value(data) == value
    assert P.unpack_value(memoryview(data)) == value


def test_pack_value_tuples_become_lists_and_int_keys_survive() -> None:
    assert P.unpack_value(P.pack_value((1, (2, 3)))) == [1, [2, 3]]
    assert P.unpack_value(P.pack_value({1: "a", "b": [None]})) == {1: "a", "b": [None]}


class _Thing:
    pass


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset(),
        object(),
        _Thing(),
        datetime.datetime(2024, 1, 1),
        datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
        datetime.date(2024, 1, 1),
        decimal.Decimal("1.5"),
        complex(1, 2),
        [1, {2, 3}],
        {"k": object()},
        2**64,
        -(2**63) - 1,
    ],
    ids=lambda v: type(v).__name__,
)
def test_pack_value_rejects_non_msgpack_with_type_error(value: Any) -> None:
    with pytest.raises(TypeError) as info:
        P.pack_value(value)
    assert type(info.value) is TypeError


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\x01\x02", b"\xd9\x05ab", b"\x81\x91\x01\x02", b"\x91" * 5000 + b"\xc0"],
)
def test_unpack_value_garbage(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        P.unpack_value(data)
    assert info.value.code == "bad-payload"


@SETTINGS
@given(value=msgpack_values, data=st.data())
def test_unpack_value_truncated_or_extended(value: Any, data: st.DataObject) -> None:
    packed = P.pack_value(value)
    cut = data.draw(st.integers(0, len(packed) - 1))
    with pytest.raises(RemoteProtocolError):
        P.unpack_value(packed[:cut])
    with pytest.raises(RemoteProtocolError):
        P.unpack_value(packed + P.pack_value(value))


@SETTINGS
@given(data=st.binary(max_size=200))
def test_unpack_value_random_bytes(data: bytes) -> None:
    try:
        P.unpack_value(data)
    except RemoteProtocolError as exc:
        assert exc.code == "bad-payload"


# --------------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    "msg",
    [
        P.Hello(session=b"s", skills={"x": {1, 2}}),
        P.Hello(session=b"s", skills={"x": object()}),
        P.StatusReply(status={"when": datetime.datetime(2024, 1, 1)}),
        P.Hello(session=b"s", slots=2**70),
        P.Error(code="\ud800"),
        P.Cancel(tids=(object(),)),  # type: ignore[arg-type]
    ],
    ids=["set", "object", "datetime", "huge-int", "surrogate", "object-tid"],
)
def test_encode_unencodable_raises_local_protocol_error(msg: P.Message) -> None:
    with pytest.raises(LocalProtocolError) as info:
        P.encode(msg)
    assert not isinstance(info.value, RemoteProtocolError)
    assert isinstance(info.value, ProtocolError)
    assert info.value.code == "encode"
    assert msg.COMMAND in str(info.value)

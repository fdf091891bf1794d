"""The zlink wire format: pure code, no sockets, no zmq import.

Every message is multipart ``[header, *payload]``. The header is a small
msgpack map ``{"v": PROTOCOL_VERSION, "c": COMMAND, ...fields}``; the payload
frames are opaque bytes that the broker forwards untouched. Commands that carry
tasks or results carry them in batches: item ``i`` of the header's list owns
payload frame ``i``. See ``docs/protocol.md`` for the full table.

:func:`encode` turns a command object into header bytes, :func:`decode` turns
header bytes (plus the number of payload frames that came with them) back into
a command object or raises :class:`~zlink.errors.RemoteProtocolError`. Nothing
else ever comes out of :func:`decode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Final, NamedTuple, TypeVar

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "COMMANDS",
    "PROTOCOL_VERSION",
    "Ack",
    "Beacon",
    "Bye",
    "Cancel",
    "Credit",
    "Dispatch",
    "DispatchItem",
    "Drain",
    "Error",
    "Heartbeat",
    "Hello",
    "Message",
    "Outcome",
    "Result",
    "ResultItem",
    "Status",
    "StatusReply",
    "Submit",
    "TaskSpec",
    "Welcome",
    "decode",
    "encode",
    "pack_value",
    "unpack_value",
]

PROTOCOL_VERSION: Final = 1

#: Largest header we accept; headers carry metadata only, payloads ride in frames.
MAX_HEADER_SIZE: Final = 4 * 1024 * 1024
#: Largest number of tasks or results one message may carry.
MAX_BATCH: Final = 65_536
MAX_NAME: Final = 128
MAX_KEYS: Final = 64
MAX_ID: Final = 64
MAX_ATTEMPT: Final = 2**31


class Outcome:
    """Outcome codes carried in result items (plain ints on the wire)."""

    OK: Final = 0  #: payload is the msgpack-encoded return value
    ERROR: Final = 1  #: payload is msgpack ``[type, message, traceback]``
    TIMEOUT: Final = 2  #: the broker's deadline for the task passed
    LOST: Final = 3  #: every attempt died with its node (poison task)
    CANCELLED: Final = 4  #: the task was cancelled
    REJECTED: Final = 5  #: the task was refused (bad skill name, quota, ...)
    PARTIAL: Final = 6  #: a partial result from a generator skill; more follow
    RETURNED: Final = 7  #: a draining node hands back a task it did not start
    QUESTION: Final = 8  #: the running skill asks its client something (``ask``); an ANSWER resumes it

    ALL: Final = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 8})
    FINAL: Final = frozenset({0, 1, 2, 3, 4, 5})
    NAMES: Final = {
        0: "ok",
        1: "error",
        2: "timeout",
        3: "lost",
        4: "cancelled",
        5: "rejected",
        6: "partial",
        7: "returned",
        8: "question",
    }


# --------------------------------------------------------------------------- values


def pack_value(value: Any) -> bytes:
    """Encode a user value (args, results) as msgpack.

    Raises ``TypeError`` naming the offending type when ``value`` holds anything
    but None, bool, int, float, str, bytes, list/tuple and dict.
    """
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True, strict_types=False, datetime=False)
        return packed
    except TypeError as exc:
        raise TypeError(
            f"zlink arguments and results must be msgpack values (None, bool, int, "
            f"float, str, bytes, list, dict): {exc}"
        ) from None
    except (OverflowError, ValueError) as exc:
        raise TypeError(f"value cannot be encoded as msgpack: {exc}") from None


def unpack_value(data: bytes | memoryview) -> Any:
    """Decode a msgpack user value; raises RemoteProtocolError on bad bytes."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise RemoteProtocolError(f"payload is not valid msgpack: {exc}", code="bad-payload") from None


# --------------------------------------------------------------------------- validators

_T = TypeVar("_T")
Validator = Callable[[Any], Any]


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(what, code="bad-field")


def _v_str(limit: int = MAX_NAME) -> Validator:
    def check(v: Any) -> str:
        if type(v) is not str or len(v) > limit:
            raise _bad(f"expected a string of at most {limit} characters")
        return v

    return check


def _v_bytes(limit: int = MAX_ID) -> Validator:
    def check(v: Any) -> bytes:
        if type(v) is not bytes or len(v) > limit:
            raise _bad(f"expected bytes of at most {limit}")
        return v

    return check


def _v_int(lo: int = 0, hi: int = 2**31) -> Validator:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _bad(f"expected an integer in [{lo}, {hi}]")
        return v

    return check


def _v_float(lo: float = 0.0, hi: float = 1e9) -> Validator:
    def check(v: Any) -> float:
        if type(v) not in (int, float) or not lo <= v <= hi or math.isnan(v):
            raise _bad(f"expected a number in [{lo}, {hi}]")
        return float(v)

    return check


def _v_optional(inner: Validator) -> Validator:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)

    return check


def _v_list(inner: Validator, limit: int = MAX_BATCH) -> Validator:
    def check(v: Any) -> tuple[Any, ...]:
        if type(v) is not list or len(v) > limit:
            raise _bad(f"expected a list of at most {limit} items")
        return tuple([inner(x) for x in v])

    return check


def _v_map(limit: int = 4096) -> Validator:
    def check(v: Any) -> dict[str, Any]:
        if type(v) is not dict or len(v) > limit or any(type(k) is not str for k in v):
            raise _bad("expected a map with string keys")
        return v

    return check


def _v_record(make: Callable[..., _T], *validators: Validator) -> Validator:
    """A fixed-length msgpack array turned into ``make(*values)``."""
    n = len(validators)

    def check(v: Any) -> _T:
        if type(v) is not list or len(v) != n:
            raise _bad(f"expected a record of {n} items")
        return make(*[f(x) for f, x in zip(validators, v, strict=True)])

    return check


def _v_bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _bad("expected a boolean")
    return v


_v_name = _v_str(MAX_NAME)
_v_id = _v_bytes(MAX_ID)
_v_keys = _v_list(_v_str(256), MAX_KEYS)
_v_status = _v_int(0, max(Outcome.ALL))


# --------------------------------------------------------------------------- records


class TaskSpec(NamedTuple):
    """One task in a SUBMIT: its id, skill and scheduling options."""

    tid: bytes
    skill: str
    timeout: float | None = None
    max_attempts: int = 3
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def wire(self) -> list[Any]:
        return list(self)


class DispatchItem(NamedTuple):
    """One task sent to a node: ``timeout`` is the time left, in seconds."""

    tid: bytes
    skill: str
    attempt: int
    timeout: float | None = None

    def wire(self) -> list[Any]:
        return list(self)


class ResultItem(NamedTuple):
    """One outcome of one attempt at one task (see :class:`Outcome`)."""

    tid: bytes
    attempt: int
    status: int

    def wire(self) -> list[Any]:
        return list(self)


# Hand-written validators for the records that travel in bulk: these run once
# per task at every hop, so they avoid closures and generic loops.
_MAX_STATUS: Final = max(Outcome.ALL)


def _v_opt_timeout(t: Any) -> float | None:
    if t is None:
        return None
    if (type(t) is float or type(t) is int) and 0.0 <= t <= 1e7:
        return float(t)
    raise _bad("timeout must be nil or a number of seconds in [0, 1e7]")


def _v_taskspec(v: Any) -> TaskSpec:
    if type(v) is not list or len(v) != 6:
        raise _bad("expected a task record of 6 items")
    tid, skill, timeout, attempts, reads, writes = v
    if type(tid) is not bytes or len(tid) > MAX_ID or type(skill) is not str or len(skill) > MAX_NAME:
        raise _bad("bad task id or skill name")
    if type(attempts) is not int or not 1 <= attempts <= 100:
        raise _bad("max_attempts must be in [1, 100]")
    return TaskSpec(tid, skill, _v_opt_timeout(timeout), attempts, _v_keys(reads), _v_keys(writes))


def _v_dispatch_item(v: Any) -> DispatchItem:
    if type(v) is not list or len(v) != 4:
        raise _bad("expected a dispatch record of 4 items")
    tid, skill, attempt, timeout = v
    if type(tid) is not bytes or len(tid) > MAX_ID or type(skill) is not str or len(skill) > MAX_NAME:
        raise _bad("bad task id or skill name")
    if type(attempt) is not int or not 1 <= attempt <= MAX_ATTEMPT:
        raise _bad(f"attempt must be in [1, {MAX_ATTEMPT}]")
    return DispatchItem(tid, skill, attempt, _v_opt_timeout(timeout))


def _v_result_item(v: Any) -> ResultItem:
    if type(v) is not list or len(v) != 3:
        raise _bad("expected a result record of 3 items")
    tid, attempt, status = v
    if type(tid) is not bytes or len(tid) > MAX_ID:
        raise _bad("bad task id")
    if (
        type(attempt) is not int
        or not 0 <= attempt <= MAX_ATTEMPT
        or type(status) is not int
        or not 0 <= status <= _MAX_STATUS
    ):
        raise _bad("bad attempt or status")
    return ResultItem(tid, attempt, status)


_v_running = _v_list(_v_record(lambda *a: a, _v_id, _v_int(0, MAX_ATTEMPT)))


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of all commands. ``frames`` says how many payload frames follow."""

    COMMAND: ClassVar[str] = ""
    #: (attribute, validator) for every field, in wire order.
    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = ()
    #: how many payload frames must follow: None = none, "items" = one per item.
    FRAMES: ClassVar[str | None] = None

    def payload_count(self) -> int:
        return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """First message from any peer on a connection; answered by WELCOME.

    ``role`` is the hat the peer wears on this connection: ``"node"`` or
    ``"client"``. ``running`` lists (task id, attempt) pairs a node is still
    executing or holding results for, so a restarted broker can rebuild them.
    ``seal`` is the public id of the peer's seal key ("" when it seals nothing):
    status shows it, so an operator sees a swarm whose peers disagree.
    """

    COMMAND: ClassVar[str] = "HELLO"
    name: str = ""
    role: str = "client"
    session: bytes
    skills: dict[str, Any] = field(default_factory=dict)
    slots: int = 0
    prefetch: int = 0
    running: tuple[tuple[bytes, int], ...] = ()
    epoch: bytes | None = None
    agent: str = ""
    seal: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("name", _v_str(MAX_NAME)),
        ("role", _v_str(16)),
        ("session", _v_id),
        ("skills", _v_map(4096)),
        ("slots", _v_int(0, 100_000)),
        ("prefetch", _v_int(0, 100_000)),
        ("running", _v_running),
        ("epoch", _v_optional(_v_id)),
        ("agent", _v_str(128)),
        ("seal", _v_str(32)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Message):
    """The broker accepted a HELLO. Ports of the heartbeat channels ride along."""

    COMMAND: ClassVar[str] = "WELCOME"
    epoch: bytes
    name: str
    role: str
    heartbeat_interval: float
    liveness: int
    max_message_size: int
    beacon_port: int = 0
    heartbeat_port: int = 0
    time: float = 0.0
    #: most unresolved tasks the broker keeps for one client (0: no bound)
    max_tasks: int = 0
    #: most new tasks per second the broker accepts from one client key (0: no limit)
    max_rate: float = 0.0
    #: the name of the key this peer authenticated with: its address for agent messages
    key_name: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("epoch", _v_id),
        ("name", _v_str(MAX_NAME)),
        ("role", _v_str(16)),
        ("heartbeat_interval", _v_float(0.001, 3600)),
        ("liveness", _v_int(1, 1000)),
        ("max_message_size", _v_int(1, 2**40)),
        ("beacon_port", _v_int(0, 65535)),
        ("heartbeat_port", _v_int(0, 65535)),
        ("time", _v_float(0.0, 1e12)),
        ("max_tasks", _v_int(0, 2**40)),
        ("max_rate", _v_float(0.0, 1e9)),
        ("key_name", _v_str(MAX_NAME)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Submit(Message):
    """Client to broker: a batch of tasks, one payload frame per task."""

    COMMAND: ClassVar[str] = "SUBMIT"
    FRAMES: ClassVar[str | None] = "items"
    tasks: tuple[TaskSpec, ...]
    #: these tasks were submitted before (to this broker or a previous one)
    resubmit: bool = False

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("tasks", _v_list(_v_taskspec)),
        ("resubmit", _v_bool),
    )

    def payload_count(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch(Message):
    """Broker to node: a batch of tasks to run, one payload frame per task."""

    COMMAND: ClassVar[str] = "DISPATCH"
    FRAMES: ClassVar[str | None] = "items"
    tasks: tuple[DispatchItem, ...]
    #: results of this node the broker now holds (an ACK riding along)
    acks: tuple[bytes, ...] = ()

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("tasks", _v_list(_v_dispatch_item)),
        ("acks", _v_list(_v_id)),
    )

    def payload_count(self) -> int:
        return len(self.tasks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Result(Message):
    """Node to broker, and broker to client: a batch of outcomes, one frame each."""

    COMMAND: ClassVar[str] = "RESULT"
    FRAMES: ClassVar[str | None] = "items"
    results: tuple[ResultItem, ...]

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("results", _v_list(_v_result_item)),)

    def payload_count(self) -> int:
        return len(self.results)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    """Client to broker (stop these tasks), or broker to node (stop running them)."""

    COMMAND: ClassVar[str] = "CANCEL"
    tids: tuple[bytes, ...]

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("tids", _v_list(_v_id)),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Node to broker on the heartbeat PUB/SUB channel; also a client's liveness
    ping on the main socket (``session`` and ``epoch`` only), every few seconds."""

    COMMAND: ClassVar[str] = "HEARTBEAT"
    session: bytes
    epoch: bytes | None = None
    free: int = 0
    running: tuple[tuple[bytes, int], ...] = ()
    #: ``running`` lists every task this session holds and has not answered: the broker
    #: re-queues a task it thinks the node holds that stays missing from such lists
    complete: bool = False

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("session", _v_id),
        ("epoch", _v_optional(_v_id)),
        ("free", _v_int(0, 100_000)),
        ("running", _v_running),
        ("complete", _v_bool),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Beacon(Message):
    """Broker to everyone on the beacon PUB channel: I am alive, this is my epoch."""

    COMMAND: ClassVar[str] = "BEACON"
    epoch: bytes
    time: float = 0.0

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("epoch", _v_id),
        ("time", _v_float(0.0, 1e12)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Status(Message):
    """Client to broker: the broker's view (answered by STATUS_REPLY).

    With ``op`` (admin keys only), an operation instead: ``"drain"`` the node
    named ``arg``, or ``"cancel"`` the task whose hex id is ``arg``; the reply's
    status is ``{"op", "ok", "message"}``.
    """

    COMMAND: ClassVar[str] = "STATUS"
    op: str = ""
    arg: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("op", _v_str(32)), ("arg", _v_str(MAX_NAME)))


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply(Message):
    """The broker's snapshot (see ``docs/protocol.md`` for its keys)."""

    COMMAND: ClassVar[str] = "STATUS_REPLY"
    status: dict[str, Any]

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("status", _v_map(1_000_000)),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Message):
    """Something a peer sent was refused. ``tids`` names the tasks it concerns."""

    COMMAND: ClassVar[str] = "ERROR"
    code: str
    message: str = ""
    tids: tuple[bytes, ...] = ()

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("code", _v_str(64)),
        ("message", _v_str(4096)),
        ("tids", _v_list(_v_id)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(Message):
    """A peer leaves on purpose (its tasks, if any, are re-queued at once)."""

    COMMAND: ClassVar[str] = "BYE"
    reason: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("reason", _v_str(4096)),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    """Broker to node: the broker holds these results now; the node may forget them."""

    COMMAND: ClassVar[str] = "ACK"
    tids: tuple[bytes, ...]

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("tids", _v_list(_v_id)),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Drain(Message):
    """Node to broker: send me nothing new; I finish or return what I hold, then leave."""

    COMMAND: ClassVar[str] = "DRAIN"
    reason: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("reason", _v_str(4096)),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit(Message):
    """Node to broker: the slots this broker may fill now (a node joined to several brokers).

    The node's slots are shared by every broker it is joined to: each link
    offers its broker the slots the other brokers' tasks leave free, so the
    node never holds more running tasks than its slots. With one broker the
    node never sends it (its HELLO's slots stand).
    """

    COMMAND: ClassVar[str] = "CREDIT"
    slots: int

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("slots", _v_int(0, 100_000)),)


# --------------------------------------------------------------------------- agent messaging


@dataclass(frozen=True, slots=True, kw_only=True)
class SendMessage(Message):
    """Peer to broker: a message for the peer named ``to`` (one payload frame).

    The broker holds it up to ``ttl`` seconds if that peer is not connected and
    answers with SENT once it is delivered or cannot be.
    """

    COMMAND: ClassVar[str] = "SEND"
    to: str
    mid: bytes
    ttl: float = 60.0

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("to", _v_str(MAX_NAME)),
        ("mid", _v_id),
        ("ttl", _v_float(0.0, 86_400.0)),
    )

    def payload_count(self) -> int:
        return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish(Message):
    """Peer to broker: a message for every subscriber of ``topic`` (one payload frame)."""

    COMMAND: ClassVar[str] = "PUBLISH"
    topic: str
    mid: bytes

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (("topic", _v_str(MAX_NAME)), ("mid", _v_id))

    def payload_count(self) -> int:
        return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Message):
    """Peer to broker: start (or with ``stop``, end) receiving these topics."""

    COMMAND: ClassVar[str] = "SUBSCRIBE"
    topics: tuple[str, ...]
    stop: bool = False

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("topics", _v_list(_v_str(MAX_NAME), 1024)),
        ("stop", _v_bool),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Deliver(Message):
    """Broker to peer: a message. ``sender`` is the name of the key the broker
    authenticated the sender with; ``topic`` is "" for a direct message."""

    COMMAND: ClassVar[str] = "DELIVER"
    sender: str
    mid: bytes
    topic: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("sender", _v_str(MAX_NAME)),
        ("mid", _v_id),
        ("topic", _v_str(MAX_NAME)),
    )

    def payload_count(self) -> int:
        return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Sent(Message):
    """Broker to sender: message ``mid`` was delivered (``ok``), or why it was not."""

    COMMAND: ClassVar[str] = "SENT"
    mid: bytes
    ok: bool = True
    reason: str = ""

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("mid", _v_id),
        ("ok", _v_bool),
        ("reason", _v_str(4096)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer(Message):
    """Client to broker to node: the reply to question ``seq`` of task ``tid`` (one payload frame)."""

    COMMAND: ClassVar[str] = "ANSWER"
    tid: bytes
    seq: int
    attempt: int = 0  # filled in by the broker towards the node

    SCHEMA: ClassVar[tuple[tuple[str, Validator], ...]] = (
        ("tid", _v_id),
        ("seq", _v_int(1, 2**31)),
        ("attempt", _v_int(0, MAX_ATTEMPT)),
    )

    def payload_count(self) -> int:
        return 1


COMMANDS: Final[dict[str, type[Message]]] = {
    cls.COMMAND: cls
    for cls in (
        Hello, Welcome, Submit, Dispatch, Result, Cancel, Heartbeat, Beacon, Status, StatusReply, Error, Bye, Ack,
        Drain, Credit, SendMessage, Publish, Subscribe, Deliver, Sent, Answer,
    )
}  # fmt: skip

_DEFAULTS: dict[type[Message], frozenset[str]] = {
    cls: frozenset(f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING)
    for cls in COMMANDS.values()
}


def encode(msg: Message) -> bytes:
    """Encode a command's header. Payload frames are sent as they are."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "c": msg.COMMAND}
    for name, _ in msg.SCHEMA:
        header[name] = getattr(msg, name)  # tuples and NamedTuples pack as arrays
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {msg.COMMAND}: {exc}", code="encode") from None


def decode(data: bytes | memoryview, frames: int = 0) -> Message:
    """Decode and validate a header; ``frames`` is the number of payload frames.

    Raises :class:`RemoteProtocolError` (and nothing else) for anything that is
    not a well-formed command of this protocol version.
    """
    if len(data) > MAX_HEADER_SIZE:
        raise RemoteProtocolError("header too large", code="too-large")
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception:  # ExtraData, FormatError, StackError, ValueError, ...
        raise RemoteProtocolError("header is not valid msgpack", code="malformed") from None
    if type(header) is not dict:
        raise RemoteProtocolError("header is not a msgpack map", code="malformed")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        # only a scalar is quoted back: repr() of a deeply nested value recurses without end
        shown = repr(version)[:40] if type(version) in (int, float, str, bool, type(None)) else type(version).__name__
        raise RemoteProtocolError(
            f"protocol version {shown} is not supported (this side speaks {PROTOCOL_VERSION})",
            code="bad-version",
        )
    command = header.get("c")
    cls = COMMANDS.get(command) if type(command) is str else None
    if cls is None:
        shown = repr(command[:40]) if type(command) is str else type(command).__name__
        raise RemoteProtocolError(f"unknown command {shown}", code="unknown-command")
    kwargs: dict[str, Any] = {}
    for name, check in cls.SCHEMA:
        if name in header:
            try:
                kwargs[name] = check(header[name])
            except RemoteProtocolError as exc:
                raise RemoteProtocolError(f"{command}.{name}: {exc}", code="bad-field") from None
            except RecursionError:
                raise RemoteProtocolError(f"{command}.{name}: nested too deeply", code="bad-field") from None
        elif name not in _DEFAULTS[cls]:
            raise RemoteProtocolError(f"{command} lacks field {name!r}", code="bad-field")
    msg = cls(**kwargs)
    expected = msg.payload_count()
    if frames != expected:
        raise RemoteProtocolError(f"{command} needs {expected} payload frame(s), got {frames}", code="frame-count")
    return msg

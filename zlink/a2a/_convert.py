"""Values between zlink (msgpack) and A2A (message parts), and the logging scrubber.

The convention, used by the gateway and the adapter alike (docs/a2a.md):

- a ``str`` travels as a text part, ``bytes`` as a raw part, anything else as a
  data part (JSON);
- JSON has no bytes and A2A data parts hold numbers as doubles, so inside data
  a ``bytes`` value becomes ``{"$bytes": "<base64>"}`` (as ``zlink submit``
  prints it) and comes back as bytes, a whole number that came back as a
  double (``7.0``) becomes an ``int`` again, an int beyond 2**53 travels as its
  decimal string, a NaN or infinite float as ``"nan"``/``"inf"``/``"-inf"``,
  and a map key that is not a string as its ``str()``;
- a message calls ``skill(*args, **kwargs)``: the skill is named in the
  message metadata ``"skill"``, each part is one positional argument (in
  order) unless the metadata holds ``"args"`` (a list), and ``"kwargs"`` (a
  map) holds the keyword arguments.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from a2a.helpers import get_data_parts, new_data_part
from a2a.types import Message, Part

__all__ = [
    "MAX_SAFE_INT",
    "from_json",
    "message_call",
    "part_value",
    "parts_value",
    "scrub_logs",
    "struct_dict",
    "to_json",
    "value_parts",
]

#: the largest integer a JSON number (an IEEE double) holds exactly
MAX_SAFE_INT: Final = 2**53
#: keyword arguments zlink's submit takes for itself: a skill cannot receive them through a message
RESERVED_KWARGS: Final = frozenset({"timeout", "max_attempts", "reads", "writes", "on_question"})


def to_json(value: Any) -> Any:
    """A msgpack value as a JSON value (see the module docstring for what changes)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INT <= value <= MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return str(value)  # not a msgpack value (an extension type): its text


def from_json(value: Any) -> Any:
    """A JSON value read from an A2A data part, as the msgpack value it stands for."""
    if isinstance(value, float):
        if value.is_integer() and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            return int(value)
        return value
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("$bytes"), str):
            try:
                return base64.b64decode(value["$bytes"], validate=True)
            except (binascii.Error, ValueError):
                pass
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def value_parts(value: Any) -> list[Part]:
    """One A2A part holding a zlink value."""
    if isinstance(value, str):
        return [Part(text=value, media_type="text/plain")]
    if isinstance(value, bytes | bytearray | memoryview):
        return [Part(raw=bytes(value), media_type="application/octet-stream")]
    return [new_data_part(to_json(value), media_type="application/json")]


def part_value(part: Part) -> Any:
    """The zlink value of one A2A part (a URL part gives its URL)."""
    kind = part.WhichOneof("content")
    if kind == "text":
        return part.text
    if kind == "raw":
        return bytes(part.raw)
    if kind == "url":
        return part.url
    if kind == "data":
        return from_json(get_data_parts([part])[0])
    return None


def parts_value(parts: Iterable[Part]) -> Any:
    """The value of a list of parts: the one part's value, or the list of all their values."""
    values = [part_value(p) for p in parts]
    return values[0] if len(values) == 1 else values


def struct_dict(struct: Any) -> dict[str, Any]:
    """A protobuf Struct (message or request metadata) as a plain dict of JSON values."""
    from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped,unused-ignore]

    out = MessageToDict(struct)
    return out if isinstance(out, dict) else {}


def _metadata(message: Message, request_metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The message's metadata over the request's (the message wins), as plain JSON."""
    out: dict[str, Any] = dict(request_metadata or {})
    if message.HasField("metadata"):
        out.update(struct_dict(message.metadata))
    return out


def message_call(
    message: Message, request_metadata: Mapping[str, Any] | None = None, *, default_skill: str | None = None
) -> tuple[str | None, list[Any], dict[str, Any], Any]:
    """``(skill, args, kwargs, timeout)`` of a message; ValueError says what is wrong with it.

    ``skill`` is None when the message names none and there is no default.
    ``timeout`` is the raw metadata value (None when absent).
    """
    meta = _metadata(message, request_metadata)
    skill = meta.get("skill", default_skill)
    if skill is not None and (not isinstance(skill, str) or not skill):
        raise ValueError("metadata 'skill' must be a non-empty string naming a zlink skill")
    if "args" in meta:
        args = meta["args"]
        if not isinstance(args, list):
            raise ValueError("metadata 'args' must be a list of positional arguments")
        args = from_json(args)
    else:
        args = [part_value(p) for p in message.parts]
    kwargs = meta.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ValueError("metadata 'kwargs' must be a map of keyword arguments")
    clash = sorted(RESERVED_KWARGS.intersection(kwargs))
    if clash:
        raise ValueError(f"keyword arguments named {', '.join(clash)} cannot be passed through zlink")
    return skill, args, from_json(kwargs), meta.get("timeout")


def call_message_fields(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[Part], dict[str, Any]]:
    """The parts and metadata of a message that calls a skill with ``args`` and ``kwargs``.

    Each positional argument is one part. A call without positional arguments
    still needs a part (A2A requires one): it carries the keyword arguments as
    data, and metadata ``"args": []`` says that the parts are not arguments.
    """
    meta: dict[str, Any] = {}
    if kwargs:
        meta["kwargs"] = to_json(dict(kwargs))
    if args:
        parts = [p for a in args for p in value_parts(a)]
    else:
        parts = [new_data_part(to_json(dict(kwargs)), media_type="application/json")]
        meta["args"] = []
    return parts, meta


# --------------------------------------------------------------------------- zero-log


#: loggers of the libraries the gateway and the adapter run on; some log request bodies,
#: events or exception texts, which may hold payloads
_THIRD_PARTY: Final = ("a2a", "uvicorn", "sse_starlette", "starlette", "httpx", "httpcore")


def _third_party(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _THIRD_PARTY)


def _safe_arg(value: Any) -> Any:
    """A log argument as it may be printed: numbers, booleans, None and the empty string as they are
    (nothing a request can hide data in), anything else as its type name."""
    if value is None or isinstance(value, bool | int | float) or (type(value) is str and not value):
        return value
    return f"<{type(value).__name__}>"


class _ScrubFilter(logging.Filter):
    """Keeps the libraries' log lines and drops what they were formatted with (zero-log).

    A line from a2a-sdk, uvicorn, starlette or httpx keeps its text; its
    arguments (request bodies, events, messages) become their type names, and an
    attached exception becomes its type name, without its message or traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _third_party(record.name):
            return True
        if record.args:
            if isinstance(record.args, Mapping):
                record.args = {k: _safe_arg(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_safe_arg(a) for a in record.args)
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.msg} [{type(exc).__name__}]"
            record.exc_info = None
            record.exc_text = None
        record.stack_info = None
        return True


class _Throttle(logging.Filter):
    """The same line at most once per ``period`` seconds (a2a-sdk warns on every card request
    while the swarm offers no skill, since a card must list one)."""

    def __init__(self, period: float = 300.0) -> None:
        super().__init__()
        self.period = period
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        last = self._last.get(key)
        if last is not None and record.created - last < self.period:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = record.created
        return True


def scrub_logs(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Scrub third-party log lines on ``handlers`` (default: the root logger's), and quiet them.

    Filters on a logger do not see its children's records, so the filter goes
    on the handlers. httpx logs every request at INFO and uvicorn its start-up
    chatter: both are raised to WARNING; a2a-sdk's debug lines (every event of
    every task) are left out even at ``--log-level debug``.
    """
    targets = list(handlers) if handlers is not None else list(logging.getLogger().handlers)
    for handler in targets:
        if not any(isinstance(f, _ScrubFilter) for f in handler.filters):
            handler.addFilter(_ScrubFilter())
    for name, level in (("httpx", logging.WARNING), ("httpcore", logging.WARNING), ("uvicorn", logging.WARNING),
                        ("sse_starlette", logging.INFO), ("a2a", logging.WARNING)):  # fmt: skip
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    checks = logging.getLogger("a2a.utils.proto_utils")
    if not any(isinstance(f, _Throttle) for f in checks.filters):
        checks.addFilter(_Throttle())

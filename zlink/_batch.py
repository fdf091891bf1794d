"""Batched ``map``: many items of one skill in one task, sized to the skill's speed.

Moving a task through the broker costs tens of microseconds of Python and
pyzmq in each of three processes; a no-op skill runs in one. So ``map`` packs
consecutive items of the same skill into one task (a *batch*). The node runs a
batch's items one after another in one slot and returns each item's outcome;
the client yields them one at a time, exactly as if each had been its own
task. The batch size adapts: ``map`` starts with one item per task, reads how
long the node spent per item (the node reports it), and grows batches until
one takes about :data:`TARGET_S` on a node, so slow skills (a model call) keep
one item per task and their full parallelism, and fast ones amortise the
per-task cost over up to :data:`MAX_ITEMS` items.

The batch payload is a convention between client and node; the broker routes a
batch like any task and never looks inside (see docs/protocol.md):

- task payload: msgpack map ``{"batch": [args, args, ...], "t": timeout}``
  where each ``args`` is the positional argument list of one item and ``t`` the
  per-item timeout in seconds (or nil);
- result payload (status OK): ``[seconds, [[status, value], ...]]``, one pair
  per item in order: status 0 with the item's result, 1 with an error
  ``[type, message, traceback, node]``, 2 (timeout) with a message. When the
  outcomes do not fit in one message, the node sends the leading ones as
  partial results ``[seconds, outs, start]`` (``start``: the index of
  ``outs[0]``) and the last ones as the result, also with ``start``.
- an item that runs past its timeout ends the batch at once: the node answers
  with the outcomes so far, that item as timed out, and the items after it as
  timed out without running (a ``map`` stops at the first failed item anyway).

What changes with a batch, and only then: a node loss or a cancel re-runs or
stops the whole batch (each item still resolves exactly once at the client),
and ``zlink.current_task()`` inside the skill is the batch's task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Final

from . import protocol as P
from .errors import RejectedError, RemoteError, RemoteProtocolError, TaskCancelled, TaskLost, TaskTimeout, ZlinkError
from .protocol import Outcome

#: aim for one batch to take about this long on a node
TARGET_S: Final = 0.002
#: most items in one batch
MAX_ITEMS: Final = 1024
#: items sent one per task before the first batch's timing comes back
PROBE: Final = 256
#: aim for batch payloads and results of at most this many bytes
BATCH_BYTES: Final = 1 << 20
#: how fast the per-item estimates follow new measurements
_EWMA: Final = 0.25

ITEM_OK: Final = 0
ITEM_ERROR: Final = 1
ITEM_TIMEOUT: Final = 2


def outcome_error(status: int, value: Any, tid: bytes) -> ZlinkError:
    """The exception for a failed task (or batch item) from its decoded outcome value."""
    task_id = tid.hex()
    if status == Outcome.ERROR:
        try:
            rtype, rmsg, rtb = str(value[0]), str(value[1]), str(value[2])
            node = str(value[3]) if len(value) > 3 else None
        except (TypeError, IndexError, KeyError):
            return RemoteError("UnknownError", "the node sent an unreadable error", task_id=task_id)
        return RemoteError(rtype, rmsg, rtb, task_id=task_id, node=node)
    text = value if isinstance(value, str) else ""
    if status == Outcome.TIMEOUT:
        return TaskTimeout(text or "task timed out", task_id=task_id)
    if status == Outcome.LOST:
        return TaskLost(text or "task lost", task_id=task_id)
    if status == Outcome.CANCELLED:
        return TaskCancelled(text or "task cancelled", task_id=task_id)
    return RejectedError(f"task {task_id} rejected: {text}", code="rejected")


# --------------------------------------------------------------------------- node side


def parse_batch(call: dict[Any, Any]) -> tuple[list[list[Any]], float | None]:
    """Validate a batch payload; returns (per-item argument lists, per-item timeout)."""
    items = call.get("batch")
    t = call.get("t")
    if type(items) is not list or not items or any(type(a) is not list for a in items):
        raise RemoteProtocolError(
            "batch payload: 'batch' is not a non-empty list of argument lists", code="bad-payload"
        )
    if t is not None and not ((type(t) is float or type(t) is int) and t > 0):
        raise RemoteProtocolError("batch payload: 't' is not nil or a positive number", code="bad-payload")
    return items, None if t is None else float(t)


def pack_batch_result(seconds: float, outs: list[list[Any]], error_value: Any) -> bytes:
    """Encode a batch's outcomes; an item whose result is not a msgpack value becomes its error."""
    try:
        return P.pack_value([seconds, outs])
    except TypeError:
        for out in outs:
            if out[0] == ITEM_OK:
                try:
                    P.pack_value(out[1])
                except TypeError as exc:
                    out[0], out[1] = ITEM_ERROR, error_value(exc)
        return P.pack_value([seconds, outs])


# --------------------------------------------------------------------------- client side


class Sizer:
    """Items per batch, from the node-reported time and the result bytes per item."""

    __slots__ = ("cap", "fixed", "per_item_bytes", "per_item_s")

    def __init__(self, window: int, fixed: int | None) -> None:
        self.fixed = fixed
        self.cap = max(1, min(MAX_ITEMS, window // 4))
        self.per_item_s: float | None = None
        self.per_item_bytes = 0.0

    @property
    def measured(self) -> bool:
        return self.fixed is not None or self.per_item_s is not None

    def size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        t = self.per_item_s
        if t is None:
            return 1
        k = self.cap if t <= TARGET_S / self.cap else int(TARGET_S / t)
        if self.per_item_bytes > 0:
            k = min(k, int(BATCH_BYTES / self.per_item_bytes))
        return max(1, min(k, self.cap))

    def observe(self, seconds: float, items: int, nbytes: int) -> None:
        t = max(0.0, seconds) / items
        b = nbytes / items
        if self.per_item_s is None:
            self.per_item_s, self.per_item_bytes = t, b
        else:
            self.per_item_s += _EWMA * (t - self.per_item_s)
            self.per_item_bytes += _EWMA * (b - self.per_item_bytes)


class Batch:
    """Items of one skill sent as one task; ``future`` is set once it is submitted."""

    __slots__ = ("calls", "cells", "future", "outcomes", "parts", "payload", "skill")

    def __init__(self, skill: str) -> None:
        self.skill = skill
        self.calls: list[tuple[Any, ...]] = []
        self.cells: list[list[Any]] = []  # [batch, index] per item, for ordered maps
        self.future: Any = None
        self.payload = b""
        #: (ok, value or exception) per item, once decoded
        self.outcomes: list[tuple[bool, Any]] | None = None
        #: start index -> outcomes, from partial results (a result too big for one message)
        self.parts: dict[int, list[Any]] = {}

    def add_part(self, value: Any) -> None:
        """A partial result of this batch (called on the client's I/O thread)."""
        if type(value) is list and len(value) == 3 and type(value[1]) is list and type(value[2]) is int:
            self.parts[value[2]] = value[1]

    def assemble(self, final: list[Any], n: int) -> list[Any]:
        """All ``n`` outcomes from the partial results and the final one (ValueError if any is missing)."""
        slots: list[Any] = [None] * n
        parts = dict(self.parts)
        parts[final[2] if len(final) == 3 else 0] = final[1]
        for start, outs in parts.items():
            if type(outs) is not list or start < 0 or start + len(outs) > n:
                raise ValueError
            slots[start : start + len(outs)] = outs
        if any(o is None for o in slots):
            raise ValueError
        return slots


class MapPlan:
    """The I/O-free part of ``map``: pulls items, forms batches, decodes outcomes.

    A driver (the sync or the async ``map``) submits the batches :meth:`take`
    returns, waits for their futures, and calls :meth:`decode` and
    :meth:`consumed`; in order it reads items through :meth:`next_cell`.
    """

    def __init__(
        self,
        calls: Iterator[tuple[str, tuple[Any, ...]]],
        *,
        window: int,
        ordered: bool,
        batch: int | None,
        timeout: float | None,
        limit: int,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if batch is not None and not 1 <= batch <= MAX_ITEMS:
            raise ValueError(f"batch must be None (adaptive) or between 1 and {MAX_ITEMS}")
        self.calls = calls
        self.window = window
        self.ordered = ordered
        self.timeout = timeout
        self.limit = limit
        self.batch = batch
        #: per skill: skills differ in speed (map_reduce can mix them)
        self.sizers: dict[str, Sizer] = {}
        self.outstanding = 0  # items pulled and not yet consumed
        self.exhausted = False
        self.order: deque[list[Any]] = deque()  # ordered: one [batch, index] cell per item
        self.live: set[Batch] = set()  # submitted, not yet decoded

    @property
    def sizer(self) -> Sizer:
        """The first skill's sizer (a fresh one before any item): the one a one-skill map uses."""
        return next(iter(self.sizers.values()), None) or Sizer(self.window, self.batch)

    def _sizer(self, skill: str) -> Sizer:
        sz = self.sizers.get(skill)
        if sz is None:
            sz = self.sizers[skill] = Sizer(self.window, self.batch)
        return sz

    @property
    def measured(self) -> bool:
        """Whether a batch size is known (fixed, or any skill timed): the probe phase is over."""
        return self.batch is not None or any(sz.per_item_s is not None for sz in self.sizers.values())

    @property
    def finished(self) -> bool:
        return self.exhausted and self.outstanding == 0

    def batch_timeout(self, b: Batch) -> float | None:
        """A batch's task timeout: each of its items may take the per-item timeout."""
        if self.timeout is None:
            return None
        return self.timeout if len(b.calls) == 1 else min(1e7, self.timeout * len(b.calls))

    def take(self) -> list[Batch]:
        """Pull items while the window has room; returns the batches to submit now."""
        if self.exhausted:
            return []
        measured = self.measured
        room = self.window - self.outstanding
        k_min = min((sz.size() for sz in self.sizers.values()), default=1) if self.batch is None else self.batch
        if self.outstanding and (room < k_min or not measured):
            return []  # wait for room for a whole batch (or for the first timing)
        if not measured:
            room = min(room, PROBE)
        ks: dict[str, int] = {}
        out: list[Batch] = []
        open_: dict[str, Batch] = {}
        pulled = 0
        calls, ordered = self.calls, self.ordered
        while pulled < room:
            try:
                skill, args = next(calls)
            except StopIteration:
                self.exhausted = True
                break
            b = open_.get(skill)
            if b is None:
                b = open_[skill] = Batch(skill)
                if skill not in ks:
                    ks[skill] = self._sizer(skill).size()
            if ordered:
                cell = [b, len(b.calls)]
                b.cells.append(cell)
                self.order.append(cell)
            b.calls.append(args)
            pulled += 1
            if len(b.calls) >= ks[skill]:
                del open_[skill]
                self._encode(b, out)
        for b in open_.values():
            self._encode(b, out)
        self.outstanding += pulled
        self.live.update(out)
        return out

    def _encode(self, b: Batch, out: list[Batch]) -> None:
        n = len(b.calls)
        # batch=1: a plain task, exactly what submit() sends
        single = self.batch == 1
        payload = P.pack_value([b.calls[0]] if single else {"batch": b.calls, "t": self.timeout})
        if n > 1 and len(payload) > min(self.limit, BATCH_BYTES):
            half = Batch(b.skill)
            half.calls, b.calls = b.calls[n // 2 :], b.calls[: n // 2]
            if self.ordered:
                half.cells, b.cells = b.cells[n // 2 :], b.cells[: n // 2]
                for i, cell in enumerate(half.cells):
                    cell[0], cell[1] = half, i
            self._encode(b, out)
            self._encode(half, out)
            return
        if len(payload) > self.limit:
            raise RejectedError(
                f"task arguments are {len(payload)} bytes; the broker accepts at most {self.limit} per message",
                code="too-large",
            )
        b.payload = payload
        b.cells = []  # only needed to split; dropping them avoids a reference cycle per item
        out.append(b)

    def next_cell(self) -> tuple[Batch, int] | None:
        """Ordered: the batch and index of the next item to yield (None when done)."""
        if not self.order:
            return None
        b, i = self.order.popleft()
        return b, i

    def decode(self, b: Batch) -> list[tuple[bool, Any]]:
        """Each item's (ok, value or exception), from the batch's finished future."""
        if b.outcomes is not None:
            return b.outcomes
        self.live.discard(b)
        fut = b.future
        n = len(b.calls)
        exc = fut.exception() if not fut.cancelled() else TaskCancelled("map cancelled")
        if exc is not None:
            b.outcomes = [(False, exc)] * n
            return b.outcomes
        value = fut.result()
        if self.batch == 1:
            b.outcomes = [(True, value)]
            return b.outcomes
        tid: bytes = fut.tid
        try:
            seconds, outs = value[0], value[1]
            if not isinstance(seconds, int | float):
                raise ValueError
            if len(value) == 3 or b.parts:  # the outcomes came in several messages
                outs = b.assemble(value, n)
            if type(outs) is not list or len(outs) != n:
                raise ValueError
            result: list[tuple[bool, Any]] = []
            for status, v in outs:
                if status == ITEM_OK:
                    result.append((True, v))
                elif status == ITEM_TIMEOUT:
                    result.append((False, TaskTimeout(str(v), task_id=tid.hex())))
                else:
                    result.append((False, outcome_error(Outcome.ERROR, v, tid)))
        except (TypeError, ValueError, KeyError, IndexError):
            err = RemoteProtocolError(
                f"the node sent an unreadable batch result for task {tid.hex()}", code="bad-payload"
            )
            b.outcomes = [(False, err)] * n
            return b.outcomes
        self._sizer(b.skill).observe(float(seconds), n, getattr(fut, "_nbytes", 0))
        b.outcomes = result
        b.calls = []  # the arguments are no longer needed
        return result

    def consumed(self, n: int = 1) -> None:
        self.outstanding -= n

    def cancel_all(self) -> None:
        for b in self.live:
            if b.future is not None:
                b.future.cancel()
        self.live.clear()

"""The node runtime: register skills, run the tasks the broker sends.

A skill is an ordinary function (or ``async def``) marked with
:func:`skill`. A :class:`Node` runs sync skills in ``slots`` worker threads and
coroutine skills on one event loop thread, at most ``slots`` tasks at a time,
and heartbeats from its own thread so that busy task code cannot make it look
dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import logging
import queue
import signal
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import zmq

from . import protocol as P
from ._batch import ITEM_ERROR, ITEM_OK, ITEM_TIMEOUT, pack_batch_result, parse_batch
from ._peer import PeerLink, curve_client, tune_reconnect, with_port
from .errors import (
    ConfigError,
    ConnectError,
    LoopGuarded,
    RemoteProtocolError,
    SealError,
    TaskCancelled,
    ZlinkError,
)
from .protocol import Outcome
from .seal import SEAL_OVERHEAD, NodeSealer, SealKey, answer_aead, is_sealed, open_answer
from .security import Join

__all__ = ["Node", "SkillSpec", "TaskContext", "current_task", "skill"]

log = logging.getLogger("zlink.node")

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__zlink_skill__"


# --------------------------------------------------------------------------- skills


@dataclass(frozen=True, slots=True)
class SkillSpec:
    """What :func:`skill` records about a function."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    #: True for generator (and async generator) functions: each yielded value is
    #: streamed to the client as a partial result, the return value is the result
    is_generator: bool = False
    description: str = ""
    tags: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    #: media types the skill accepts and returns (e.g. "text/plain", "application/json"); the
    #: A2A gateway lists them on its agent card, () means the gateway's defaults
    input_modes: tuple[str, ...] = ()
    output_modes: tuple[str, ...] = ()

    def wire(self) -> dict[str, Any]:
        """The metadata a node announces for this skill (no code, no secrets)."""
        out: dict[str, Any] = {"description": self.description[:1000]}
        if self.tags:
            out["tags"] = list(self.tags)
        if self.examples:
            out["examples"] = list(self.examples)
        if self.input_modes:
            out["input_modes"] = list(self.input_modes)
        if self.output_modes:
            out["output_modes"] = list(self.output_modes)
        out.update(self.meta)
        return out


def _make_spec(fn: Callable[..., Any], name: str | None, **meta: Any) -> SkillSpec:
    if not callable(fn):
        raise TypeError(f"@zlink.skill needs a function, got {type(fn).__name__}")
    skill_name = name or getattr(fn, "__name__", "")
    if not skill_name or len(skill_name) > P.MAX_NAME:
        raise ValueError(f"invalid skill name {skill_name!r}")
    doc = inspect.getdoc(fn) or ""
    description = meta.pop("description", None) or (doc.split("\n\n", 1)[0] if doc else "")
    return SkillSpec(
        name=skill_name,
        fn=fn,
        is_async=inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn),
        is_generator=inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
        description=description,
        tags=tuple(meta.pop("tags", ()) or ()),
        examples=tuple(meta.pop("examples", ()) or ()),
        input_modes=_modes(meta.pop("input_modes", ()), "input_modes"),
        output_modes=_modes(meta.pop("output_modes", ()), "output_modes"),
        meta=meta,
    )


def _modes(modes: Iterable[str] | None, what: str) -> tuple[str, ...]:
    """Media types such as "text/plain": at most 32, each a non-empty string of at most 100 characters."""
    out = (modes,) if isinstance(modes, str) else tuple(modes or ())
    if len(out) > 32 or not all(isinstance(m, str) and 0 < len(m) <= 100 for m in out):
        raise ValueError(f"{what} must be at most 32 media types such as 'text/plain', got {out!r}")
    return out


@overload
def skill(name: F, /) -> F: ...
@overload
def skill(
    name: str | None = None,
    /,
    *,
    description: str | None = None,
    tags: Iterable[str] = (),
    examples: Iterable[str] = (),
    input_modes: Iterable[str] = (),
    output_modes: Iterable[str] = (),
) -> Callable[[F], F]: ...
def skill(
    name: str | Callable[..., Any] | None = None,
    /,
    *,
    description: str | None = None,
    tags: Iterable[str] = (),
    examples: Iterable[str] = (),
    input_modes: Iterable[str] = (),
    output_modes: Iterable[str] = (),
) -> Any:
    """Mark a function as a zlink skill; the function itself is returned unchanged.

    ::

        @zlink.skill()
        def square(x: int) -> int:
            return x * x

        @zlink.skill("summarize", tags=["text"])
        async def summarize_doc(text: str) -> str: ...

    The skill name defaults to the function's name, the description to the
    first paragraph of its docstring. Arguments and results must be msgpack
    values. ``input_modes`` and ``output_modes`` name the media types the
    skill takes and returns (``"text/plain"``, ``"application/json"``...), for
    the agent card of the A2A gateway (docs/a2a.md).
    """
    if callable(name):  # bare @zlink.skill
        fn = name
        setattr(fn, _ATTR, _make_spec(fn, None))
        return fn

    def mark(fn: F) -> F:
        spec = _make_spec(
            fn, name, description=description, tags=tuple(tags), examples=tuple(examples),
            input_modes=input_modes, output_modes=output_modes,
        )  # fmt: skip
        setattr(fn, _ATTR, spec)
        return fn

    return mark


def skill_spec(obj: Any) -> SkillSpec | None:
    spec = getattr(obj, _ATTR, None)
    return spec if isinstance(spec, SkillSpec) else None


def load_skills_module(target: str) -> types.ModuleType:
    """Import a module by dotted name, or load a ``.py`` file by path."""
    path = Path(target)
    if target.endswith(".py") or path.exists():
        if not path.is_file():
            raise ConfigError(f"skills file {target} does not exist")
        mod_name = f"zlink_skills_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load {target} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        parent = str(path.resolve().parent)
        if parent not in sys.path:
            sys.path.insert(0, parent)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ConfigError(f"cannot import skills module {target!r}: {exc}") from None


# --------------------------------------------------------------------------- the running task


class TaskContext:
    """What a running skill can learn about its task: ``zlink.current_task()``."""

    __slots__ = (
        "_also", "_asks", "_cancelled", "_future", "_node", "_pseq", "_qseq", "_seal", "_tid", "attempt", "deadline",
        "id", "skill",
    )  # fmt: skip

    def __init__(self, tid: bytes, skill_name: str, attempt: int, timeout: float | None) -> None:
        self._tid = tid
        self.id = tid.hex()
        self.skill = skill_name
        self.attempt = attempt
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._cancelled = False
        self._future: Any = None
        self._seal: _Seal = None
        self._pseq = 0  # sealed partial results sent so far
        self._qseq = 0  # questions asked so far
        self._asks: dict[int, cf.Future[Any]] = {}  # question number -> its answer, while waiting
        self._node: _BrokerLink | None = None
        #: other brokers that sent this task too (link -> their attempt): they get the outcome as well
        self._also: dict[_BrokerLink, int] | None = None

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled the task or its timeout passed; poll it in long loops."""
        return self._cancelled

    def ask(self, question: Any, *, timeout: float | None = None) -> Any:
        """Ask the client that submitted this task; returns its answer (multi-turn tasks).

        The task pauses until the client answers (``future.questions()``, an
        ``on_question`` callback, or a question in ``client.stream``). In an
        async skill, ``await`` it. Raises ``TimeoutError`` after ``timeout``,
        :class:`~zlink.TaskCancelled` if the task is cancelled meanwhile, and
        :class:`~zlink.LoopGuarded` past the broker's question limit per task.
        """
        node = self._node
        if node is None:
            raise RuntimeError("ask() is only available while the task runs on a node")
        if self._cancelled:
            raise TaskCancelled("the task was cancelled", task_id=self.id)
        self._qseq += 1
        seq = self._qseq
        fut: cf.Future[Any] = cf.Future()
        self._asks[seq] = fut
        node._emit(self, Outcome.QUESTION, P.pack_value([seq, question]))
        node._waker.wake()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            try:
                return fut.result(timeout)
            except cf.TimeoutError:
                raise TimeoutError(f"no answer to question {seq} within {timeout:g} s") from None
            finally:
                self._asks.pop(seq, None)
        return self._await_answer(seq, fut, timeout)

    async def _await_answer(self, seq: int, fut: cf.Future[Any], timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        finally:
            self._asks.pop(seq, None)

    def _fail_asks(self, exc: BaseException) -> None:
        for fut in list(self._asks.values()):
            if not fut.done():
                fut.set_exception(exc)

    def _cancel(self) -> None:
        self._cancelled = True
        fut = self._future
        if fut is not None:
            fut.cancel()
        if self._asks:
            self._fail_asks(TaskCancelled("the task was cancelled while it waited for an answer", task_id=self.id))


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("zlink_task", default=None)


def current_task() -> TaskContext:
    """The task the calling skill code is running (raises outside a skill)."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("zlink.current_task() called outside a running skill")
    return ctx


#: whom a task's results are sealed to: (skill, client session key), or None (unsealed)
_Seal = tuple[str, bytes] | None
#: the outcomes whose payload is the node's (sealed); the others carry a reason string
#: messages about a task that is still running
_ONGOING: Final = frozenset({Outcome.PARTIAL, Outcome.QUESTION})
_SEALED: Final = frozenset({Outcome.OK, Outcome.ERROR, Outcome.PARTIAL, Outcome.QUESTION})


class _BatchRun:
    """A batch being run: shared by its worker thread and the I/O thread's hang check."""

    __slots__ = ("began", "ended", "item_start", "lock", "n", "outs", "timeout")

    def __init__(self, n: int, timeout: float | None) -> None:
        self.n = n
        self.timeout = timeout
        self.outs: list[list[Any]] = []
        self.began = self.item_start = time.monotonic()
        self.ended = False  # answered: by the worker at the end, or by the I/O thread on a hang
        self.lock = threading.Lock()


class _Job:
    __slots__ = ("ctx", "item", "payload")

    def __init__(self, item: P.DispatchItem, payload: zmq.Frame, ctx: TaskContext) -> None:
        self.item = item
        self.payload = payload
        self.ctx = ctx


def _error_value(exc: BaseException, node: str) -> list[str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    t = type(exc)
    type_name = t.__qualname__ if t.__module__ in ("builtins", "__main__") else f"{t.__module__}.{t.__qualname__}"
    return [type_name, str(exc)[:10_000], tb[-20_000:], node]


def _quiet_loop_errors(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Asyncio's unhandled errors (e.g. a cancelled skill raising), logged by type only (zero-log)."""
    exc = context.get("exception")
    log.warning("async skill error not retrieved: %s", type(exc).__name__ if exc is not None else "unknown")


def _as_task_error(exc: BaseException) -> BaseException:
    """A skill that raises KeyboardInterrupt or SystemExit fails its task; it does not stop the node."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return RuntimeError(f"skill raised {type(exc).__name__}")
    return exc


def _error_payload(exc: BaseException, node: str) -> bytes:
    return P.pack_value(_error_value(exc, node))


# --------------------------------------------------------------------------- the node


class _BrokerLink(PeerLink):
    """A node's connection to one broker: registration, dispatches in, results out, heartbeats.

    A node joined to one broker is its own link; joined to several (a join
    string naming several brokers), it keeps one link per broker and one set of
    slots for all: each link offers its broker the slots the other brokers'
    tasks leave free (``CREDIT``), so the node never runs more than its slots.
    """

    hat = "node"

    def __init__(self, node: Node | None, join: str | Join | None, **kw: Any) -> None:
        super().__init__(join, **kw)
        #: the node whose slots run this link's tasks (itself for the first link)
        self.node: Node = node if node is not None else self  # type: ignore[assignment]
        #: (tid, attempt, status, plain payload, (skill, client key) when sealed)
        self._done: deque[tuple[bytes, int, int, bytes, _Seal]] = deque()
        #: tasks this link's broker sent and this node has not answered yet
        self._running: dict[bytes, TaskContext] = {}
        #: tid -> (attempt, status, payload, seal): results sent but not yet acknowledged
        self._unacked: dict[bytes, tuple[int, int, bytes, _Seal]] = {}
        #: batches with a per-item timeout, watched for hung items by the I/O thread
        self._batch_runs: dict[bytes, tuple[TaskContext, _BatchRun]] = {}
        self._hb_thread: threading.Thread | None = None
        self._hb_endpoint = ""
        self._hb_generation = 0  # bumped on every WELCOME after the first: reconnect now, not after the backoff
        self._hb_wake = threading.Event()  # the heartbeat thread's sleep: set to stop it or make it reconnect
        self._credit_sent = 0
        self._credit_t = 0.0
        #: this link's broker is gone and its tasks are being moved to another link: its HELLOs
        #: (still sent, for when it returns) must not claim them meanwhile
        self._handing_over = False

    # ------------------------------------------------------------------ link hooks (I/O thread)

    def hello(self) -> P.Hello:
        node = self.node
        # a HELLO offers at least one slot (the broker's rule); if the other brokers' tasks hold
        # every slot, a CREDIT of 0 follows on the next tick
        self._credit_sent = max(1, self._credit())
        return P.Hello(
            name=self.name, role="node", session=self.session,
            skills={n: s.wire() for n, s in node.skills.items()},
            slots=self._credit_sent, prefetch=node.prefetch,
            running=() if self._handing_over else tuple(
                [(tid, c.attempt) for tid, c in self._running.items()]
                + [(tid, r[0]) for tid, r in self._unacked.items() if tid not in self._running]
            ),
            epoch=self.epoch, agent="zlink-node", seal=self.seal_key.key_id if self.seal_key is not None else "",
        )  # fmt: skip

    def setup(self, ctx: zmq.Context[Any]) -> None:
        self._hb_stop = threading.Event()

    def _start_heartbeats(self, welcome: P.Welcome) -> None:
        if not welcome.heartbeat_port:
            return
        self._hb_endpoint = with_port(self.endpoint, welcome.heartbeat_port)
        if self._hb_thread is not None:  # back after the broker was lost: see _heartbeat_loop
            self._hb_generation += 1
            self._hb_wake.set()
        else:
            self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="zlink-heartbeat", daemon=True)
            self._hb_thread.start()

    def teardown(self) -> None:
        self._hb_stop.set()
        self._hb_wake.set()
        if self._hb_thread is not None:
            self._hb_thread.join(2.0)

    def on_message(self, msg: P.Message, frames: list[zmq.Frame]) -> None:
        t = type(msg)
        if t is P.Dispatch:
            for tid in msg.acks:  # type: ignore[attr-defined]
                self._unacked.pop(tid, None)
            node = self.node
            for item, payload in zip(msg.tasks, frames, strict=True):  # type: ignore[attr-defined]
                tid = item.tid
                held = self._running.get(tid)
                if held is not None:
                    held.attempt = item.attempt  # the broker's current attempt: answer as that
                    continue
                if node._claim(tid, self, item.attempt):
                    continue
                done = self._unacked.get(tid) or node._claim_done(tid, self)
                if done is not None:  # finished while the broker was away: answer, do not re-run
                    self._done.append((tid, item.attempt, done[1], done[2], done[3]))
                    continue
                ctx = TaskContext(tid, item.skill, item.attempt, item.timeout)
                ctx._node = self
                if node._draining:
                    self._done.append((tid, item.attempt, Outcome.RETURNED, P.pack_value("node is draining"), None))
                    continue
                self._running[tid] = ctx
                node._jobs.put(_Job(item, payload, ctx))
        elif t is P.Ack:
            for tid in msg.tids:  # type: ignore[attr-defined]
                self._unacked.pop(tid, None)
        elif t is P.Cancel:
            for tid in msg.tids:  # type: ignore[attr-defined]
                running = self._running.get(tid)
                if running is not None:
                    running._cancel()
        elif t is P.Answer:
            self._on_answer(msg, frames)  # type: ignore[arg-type]
        elif t is P.Drain:  # an operator drained this node (zlink drain NODE)
            log.info("drained by an operator: finishing running tasks, then stopping")
            self.node._drain_requested = True
            if not self.node._draining:
                self.node._begin_drain()
        elif t is P.Error:
            err: P.Error = msg  # type: ignore[assignment]
            if err.code == "loop-guard" and err.tids:
                for tid in err.tids:
                    held = self._running.get(tid)
                    if held is not None:
                        held._fail_asks(LoopGuarded(err.message))
                return
            log.warning("broker error %s: %s", err.code, err.message)

    def on_poll(self) -> None:
        self._flush_results()

    def on_tick(self, now: float) -> None:
        if self._batch_runs:
            self._abandon_hung_batches(now)
        if self.welcome is not None and len(self.node._links) > 1:
            credit = self._credit()
            if credit != self._credit_sent and (credit == 0 or self._credit_sent == 0 or now - self._credit_t > 0.1):
                self._credit_sent, self._credit_t = credit, now
                self._post(P.Credit(slots=credit))

    def on_disconnected(self) -> None:
        if len(self.node._links) > 1:  # the broker closed the connection: hand its tasks over now
            self.welcome = None
            self.on_broker_lost()

    def on_broker_lost(self) -> None:
        if len(self.node._links) > 1:
            self.node._hand_over(self)

    def _post_drain(self) -> None:
        if self.welcome is not None:
            self._post(P.Drain(reason="draining"))

    def _credit(self) -> int:
        """Slots this broker may fill: all of them with one broker; with several, those the others' tasks leave."""
        node = self.node
        if len(node._links) == 1:
            return node.slots
        others = sum(len(link._running) for link in node._links if link is not self)
        return max(0, node.slots - others)

    def on_welcome(self, welcome: P.Welcome, new_epoch: bool) -> None:
        self._start_heartbeats(welcome)
        # results the broker never acknowledged (it may have restarted): send again
        for tid, (attempt, status, payload, seal) in list(self._unacked.items()):
            self._done.append((tid, attempt, status, payload, seal))
        if self.node._draining:
            self._post(P.Drain(reason="draining"))

    def on_close(self) -> None:
        self._flush_results()

    def on_fatal(self, exc: ZlinkError) -> None:
        log.error("%s", exc)
        self.node._stop.set()

    def _flush_results(self) -> None:
        done = self._done
        if not done:
            return
        items: list[P.ResultItem] = []
        frames: list[bytes] = []
        limit = self.max_message_size - 4096  # room for the header
        size = 0
        sealer = self.node._sealer
        while done:
            tid, attempt, status, payload, seal = done.popleft()
            held = self._running.get(tid)
            if held is not None and held.attempt == attempt and status not in _ONGOING:
                del self._running[tid]
            if len(payload) > limit - SEAL_OVERHEAD:
                status = Outcome.ERROR
                payload = _error_payload(
                    ValueError(
                        f"the result is {len(payload)} bytes; the broker accepts at most "
                        f"{self.max_message_size} bytes per message"
                    ),
                    self.name,
                )
            if status not in _ONGOING and status != Outcome.RETURNED:
                self._unacked[tid] = (attempt, status, payload, seal)  # until the broker ACKs it
            if seal is not None and sealer is not None and status in _SEALED:
                try:
                    payload = sealer.seal_result(seal[1], tid, seal[0], attempt, status, payload)
                except SealError as exc:  # checked when the task opened; cannot happen, never fatal
                    status, payload = Outcome.ERROR, _error_payload(exc, self.name)
            if items and (len(items) >= 1000 or size + len(payload) + 40 > limit):
                self._post(P.Result(results=tuple(items)), frames)
                items, frames, size = [], [], 0
            items.append(P.ResultItem(tid, attempt, status))
            frames.append(payload)
            size += len(payload) + 40  # the item's share of the header
        if items:
            self._post(P.Result(results=tuple(items)), frames)

    def _abandon_hung_batches(self, now: float) -> None:
        """An item ran past its timeout and has not returned: answer for its batch now.

        The items before it keep their outcomes; it and the ones after it are
        reported as timed out (the after ones never ran). The worker thread stays
        with the hung call until it returns, as for any timed-out task.
        """
        for tid, (ctx, run) in list(self._batch_runs.items()):
            with run.lock:
                t = run.timeout
                if run.ended or t is None or now - run.item_start <= t:
                    continue
                run.ended = True
                i = len(run.outs)
                outs = [
                    *run.outs,
                    [ITEM_TIMEOUT, f"batch item {i} ran over its timeout of {t:g} s (still running)"],
                    *[[ITEM_TIMEOUT, f"not run: batch item {i} before it hung past the timeout"]] * (run.n - i - 1),
                ]
            self._batch_runs.pop(tid, None)
            log.warning("task %s (%s): batch item %d of %d hung past %g s; answered", tid.hex(), ctx.skill, i, run.n, t)
            answer = self.node._batch_answer(ctx, now - run.began, outs)
            self.node._complete(ctx, answer[0], answer[1])

    def _emit(self, ctx: TaskContext, status: int, payload: bytes) -> None:
        """A message about a running task (partial result, question) to its client, in order, through the
        broker that holds the task now; wakes that link's I/O thread."""
        with self.node._route_lock:
            link = ctx._node or self
            link._done.append((ctx._tid, ctx.attempt, status, payload, ctx._seal))
        link._waker.wake()

    def _on_answer(self, msg: P.Answer, frames: list[zmq.Frame]) -> None:
        """The client's answer to a question a running skill asked (I/O thread)."""
        ctx = self._running.get(msg.tid)
        fut = ctx._asks.get(msg.seq) if ctx is not None and ctx.attempt == msg.attempt else None
        if ctx is None or fut is None or fut.done():
            return  # answered already, or the task moved on
        data: bytes | memoryview = frames[0].buffer
        try:
            if ctx._seal is not None and self.seal_key is not None:
                data = open_answer(answer_aead(self.seal_key, ctx._seal[1]), msg.tid, msg.seq, data)
            fut.set_result(P.unpack_value(data))
        except (SealError, RemoteProtocolError) as exc:
            self.seal_failures += 1
            log.warning("task %s: dropped an answer: %s", msg.tid.hex(), exc)

    # ------------------------------------------------------------------ heartbeats

    def _heartbeat_loop(self) -> None:
        """Own thread, own socket: keeps beating while task code holds the CPU.

        The socket is an XPUB, so the node sees the broker's subscription arrive
        (after the CurveZMQ handshake) and beats at that moment: a PUB would
        drop every beat sent before it, and the broker would first hear from
        the node up to an interval later. Until the subscription comes the
        thread looks for it with a backoff from 10 ms up to the interval.
        """
        pub = self._ctx.socket(zmq.XPUB)
        connected = ""
        try:
            curve_client(pub, self.join)
            tune_reconnect(pub)
            pub.setsockopt(zmq.SNDHWM, 10)
            pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # a broker that comes back subscribes again: see that too
            wait, subscribed, backoff, generation = 0.0, False, 0.01, self._hb_generation
            while True:
                self._hb_wake.wait(wait)
                self._hb_wake.clear()
                if self._hb_stop.is_set():
                    break
                endpoint = self._hb_endpoint
                # first beat, or back after the broker was lost (restarted, on new ports or the
                # same ones, or cut off a while): a connection made afresh tries at once, where the
                # old one waits out its reconnect backoff (seconds after a long outage: long enough
                # for the broker to declare us dead)
                if endpoint != connected or generation != self._hb_generation:
                    if connected:
                        try:
                            pub.disconnect(connected)
                        except zmq.ZMQError:
                            pass
                    pub.connect(endpoint)
                    connected, subscribed, backoff, generation = endpoint, False, 0.01, self._hb_generation
                fresh = False
                while pub.poll(0):  # subscription messages: the broker's SUB is (again) connected
                    fresh = pub.recv()[:1] == b"\x01" or fresh
                if not subscribed and not fresh:
                    wait, backoff = backoff, min(backoff * 2, self.heartbeat_interval)
                    continue
                subscribed, wait = True, self.heartbeat_interval
                running = tuple((tid, c.attempt) for tid, c in list(self._running.items()))
                hb = P.Heartbeat(
                    session=self.session, epoch=self.epoch,
                    free=max(0, self._credit() - len(running)), running=running[:10_000],
                    complete=len(running) <= 10_000 and not self._handing_over,
                )  # fmt: skip
                try:
                    pub.send(P.encode(hb), zmq.NOBLOCK)
                except zmq.Again:
                    pass
        except zmq.ZMQError as exc:  # context closed under us at shutdown
            log.debug("heartbeat thread: %s", exc)
        finally:
            pub.close(linger=0)


class Node(_BrokerLink):
    """A worker that runs skills for the swarm.

    ::

        node = zlink.Node(join=None, slots=4)   # join=None reads $ZLINK_JOIN
        node.add_skills(my_module)              # every @zlink.skill function in it
        node.run()                              # until SIGINT/SIGTERM or node.stop()

    ``prefetch`` caps how many tasks may wait at the node beyond its slots (the
    broker adapts the actual depth to the task rate). ``heartbeat_interval``
    makes the node beat faster than the broker requires (never slower);
    ``liveness`` is how many broker beacons it may miss before it presumes the
    broker gone and re-registers, keeping its running tasks and results.
    """

    def __init__(
        self,
        join: str | Join | None = None,
        *,
        slots: int = 4,
        name: str | None = None,
        prefetch: int | None = None,
        connect_timeout: float = 10.0,
        heartbeat_interval: float | None = None,
        liveness: int | None = None,
        seal_key: SealKey | str | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        link_kw: dict[str, Any] = dict(
            name=name, connect_timeout=connect_timeout, heartbeat_interval=heartbeat_interval, liveness=liveness,
        )  # fmt: skip
        super().__init__(None, join, seal_key=seal_key, **link_kw)
        self.slots = slots
        # the most tasks this node holds beyond its slots; the broker adapts the
        # actual depth to how fast tasks finish (about 10 ms of work)
        self.prefetch = 1024 if prefetch is None else max(0, prefetch)
        self.skills: dict[str, SkillSpec] = {}
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = False
        #: sealed payloads: opens tasks, seals results to their clients (None: unsealed swarm)
        self._sealer = NodeSealer(self.seal_key) if self.seal_key is not None else None
        self._draining = False
        self._drain_requested = False  # by an operator (zlink drain): run() stops once drained
        self.completed = 0
        #: one link per broker of the join string: this node itself for the first, then one each
        self._links: list[_BrokerLink] = [self]
        #: moving a task between links (its broker died and another re-sent it) against a result being routed
        self._route_lock = threading.Lock()
        for endpoint in self.join.endpoints[1:]:
            self._links.append(
                _BrokerLink(
                    self, self.join, seal_key=self.seal_key, endpoint=endpoint, **{**link_kw, "name": self.name}
                )
            )

    # ------------------------------------------------------------------ skills

    def skill(self, name: str | None = None, **meta: Any) -> Callable[[F], F]:
        """Decorator: register a function with this node (and mark it a skill)."""

        def mark(fn: F) -> F:
            spec = _make_spec(fn, name, **meta)
            setattr(fn, _ATTR, spec)
            self._register(spec)
            return fn

        return mark

    def add_skills(self, *sources: Any) -> list[str]:
        """Register skills from modules, module names, ``.py`` paths or functions.

        Only functions marked with ``@zlink.skill`` are taken from a module.
        Returns the names registered.
        """
        names: list[str] = []
        for src in sources:
            if isinstance(src, str | Path):
                src = load_skills_module(str(src))
            if isinstance(src, types.ModuleType):
                found = [s for s in (skill_spec(v) for v in vars(src).values()) if s is not None]
                if not found:
                    raise ConfigError(f"module {src.__name__} has no function decorated with @zlink.skill")
                for spec in found:
                    names.append(self._register(spec))
            elif callable(src):
                spec = skill_spec(src) or _make_spec(src, None)
                names.append(self._register(spec))
            elif isinstance(src, Iterable):
                names.extend(self.add_skills(*src))
            else:
                raise TypeError(f"cannot take skills from {type(src).__name__}")
        return names

    def _register(self, spec: SkillSpec) -> str:
        if self._started:
            raise ConfigError("add skills before the node starts")
        self.skills[spec.name] = spec
        return spec.name

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Node:
        """Connect and start serving in background threads; returns self."""
        if not self.skills:
            raise ConfigError("this node has no skills: use add_skills() or @node.skill first")
        if self._started:
            return self
        self._started = True
        for i in range(self.slots):
            t = threading.Thread(target=self._worker, name=f"zlink-slot-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if any(s.is_async for s in self.skills.values()):
            self._loop = asyncio.new_event_loop()
            # asyncio's default handler prints the exception's message, which may hold task data
            self._loop.set_exception_handler(_quiet_loop_errors)
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="zlink-async", daemon=True)
            self._loop_thread.start()
        try:
            self._connect_links()
        except BaseException:
            self._shutdown_workers()
            raise
        log.info("node %s serving %s with %d slots", self.name, ", ".join(sorted(self.skills)), self.slots)
        return self

    def run(self, *, handle_signals: bool = True, grace: float = 30.0) -> None:
        """Start, then block until SIGINT/SIGTERM or :meth:`stop`.

        The first signal drains the node (see :meth:`drain`) within ``grace``
        seconds; a second one stops it at once (running tasks are re-queued).
        """
        self.start()
        signals: list[int] = []
        if handle_signals and threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, _frame: object) -> None:
                signals.append(signum)
                if len(signals) > 1:
                    self._stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, on_signal)
        try:
            while not self._stop.wait(0.1):
                if self.closed:
                    break
                if signals or self._drain_requested:
                    log.info("draining: no new tasks; finishing running ones within %g s", grace)
                    self.drain(grace)
                    break
        finally:
            self.stop()
        if self._fatal is not None:
            raise self._fatal

    def drain(self, grace: float = 30.0) -> bool:
        """Take no new tasks, hand back queued ones, finish running ones, then return.

        Returns True when everything finished and the broker acknowledged every
        result within ``grace`` seconds; tasks still running after that are
        re-queued elsewhere when the node stops.
        """
        try:
            self.call_soon(self._begin_drain)
        except ZlinkError:
            return False
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._stop.is_set() and not self.closed:
            if all(not link._running and not link._unacked and not link._done for link in self._links):
                return True
            time.sleep(0.02)
        return False

    def _begin_drain(self) -> None:
        """Tell every broker, hand back what has not started (on the I/O thread of the first link)."""
        self._draining = True
        for link in self._links:
            if link is self:
                if self.welcome is not None:
                    self._post(P.Drain(reason="draining"))
            else:
                with contextlib.suppress(ZlinkError):
                    link.call_soon(link._post_drain)
        while True:  # hand back every task that has not started yet
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._jobs.put(None)
                break
            self._complete(job.ctx, Outcome.RETURNED, P.pack_value("returned by a draining node"))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking tasks, leave the swarm and stop the threads."""
        self._stop.set()
        for link in self._links[1:]:
            link.close(timeout)
        self.close(timeout)
        self._shutdown_workers()

    def _shutdown_workers(self) -> None:
        for link in self._links:
            for ctx in list(link._running.values()):
                ctx._cancel()
        for _ in self._workers:
            self._jobs.put(None)
        for t in self._workers:
            t.join(1.0)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(1.0)

    def _connect_links(self) -> None:
        """Connect to every broker; ready as soon as one answers (the others join when they come up)."""
        links = self._links
        if len(links) == 1:
            self._connect()
            return
        for link in links:
            link._thread.start()
        deadline = time.monotonic() + self.connect_timeout
        fatal: ZlinkError | None = None
        while time.monotonic() < deadline:
            fatal = next((link._fatal for link in links if link._fatal is not None), None)
            if fatal is not None:
                break
            if any(link._ready.is_set() for link in links):
                return
            time.sleep(0.02)
        for link in links:
            link._closing = True
            link._waker.wake()
        for link in links:
            link._thread.join(2.0)
            link._term()
        raise fatal or ConnectError(
            f"could not reach any broker at {', '.join(self.join.endpoints)} within {self.connect_timeout:g} s "
            "(are they running, and are the ports reachable?)"
        )

    def _hand_over(self, lost: _BrokerLink) -> None:
        """``lost``'s broker is gone: the tasks it sent, and their results, go to the next live broker.

        That broker adopts them from the HELLO sent here, so the resubmissions of
        their clients (who move to the same broker: both take the brokers in
        endpoint order) attach to the running attempt instead of starting another.
        """
        order = sorted(self._links, key=lambda link: link.endpoint)
        i = order.index(lost)
        live = [link for link in order[i + 1 :] + order[:i] if link.welcome is not None and not link.closed]
        if not live:
            return  # no broker at all: everything stays for when this one comes back
        target = live[0]
        lost._handing_over = True
        try:  # on the target's I/O thread: its HELLO must precede the results
            target.call_soon(functools.partial(self._take_over, lost, target))
        except ZlinkError:
            lost._handing_over = False

    def _take_over(self, lost: _BrokerLink, target: _BrokerLink) -> None:
        """Move ``lost``'s tasks and results to ``target`` and say HELLO there (``target``'s I/O thread).

        The HELLO goes out before any of the moved results (this thread sends
        results only after its calls): a result of a task the broker has not
        adopted yet would be dropped as stale.
        """
        try:
            self._move_tasks(lost, target)
        finally:
            lost._handing_over = False

    def _move_tasks(self, lost: _BrokerLink, target: _BrokerLink) -> None:
        if lost.welcome is not None:
            return  # it came back meanwhile
        with self._route_lock:
            if not (lost._running or lost._unacked or lost._done):
                return
            for tid, ctx in lost._running.items():
                ctx._node = target
                target._running[tid] = ctx
            for tid, rec in lost._unacked.items():
                target._unacked[tid] = rec  # listed in the HELLO, and sent again below
                target._done.append((tid, *rec))
            target._done.extend(lost._done)
            target._batch_runs.update(lost._batch_runs)
            moved = len(lost._running) + len(lost._unacked)
            lost._running.clear()
            lost._unacked.clear()
            lost._done.clear()
            lost._batch_runs.clear()
        log.warning("broker %s lost: its %d task(s) handed to %s", lost.endpoint, moved, target.endpoint)
        target._send_hello()

    def _claim(self, tid: bytes, link: _BrokerLink, attempt: int) -> bool:
        """``link``'s broker sent a task another link's broker sent first (True: taken care of).

        If that other broker is gone (its clients moved), the task now answers
        through ``link`` only; if it is still there (e.g. ``link``'s broker was
        cut off, gave the task up and came back), both get the outcome: the task
        does not run twice, and neither broker waits for ever.
        """
        if len(self._links) == 1:
            return False
        with self._route_lock:
            for other in self._links:
                ctx = other._running.get(tid) if other is not link else None
                if ctx is None:
                    continue
                if other.welcome is None:
                    del other._running[tid]
                    ctx._node = link
                    ctx.attempt = attempt
                    link._running[tid] = ctx
                else:
                    if ctx._also is None:
                        ctx._also = {}
                    ctx._also[link] = attempt
                return True
        return False

    def _claim_done(self, tid: bytes, link: _BrokerLink) -> tuple[int, int, bytes, _Seal] | None:
        """A result another link holds unacknowledged for a task ``link``'s broker re-sent (taken from a link
        whose broker is gone, copied from a live one)."""
        if len(self._links) == 1:
            return None
        for other in self._links:
            if other is link:
                continue
            done = other._unacked.pop(tid, None) if other.welcome is None else other._unacked.get(tid)
            if done is not None:
                return done
        return None

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ workers

    def _complete(self, ctx: TaskContext, status: int, payload: bytes) -> None:
        """A task's outcome, to the broker that holds the task now (any thread)."""
        with self._route_lock:
            link = ctx._node or self
            link._done.append((ctx._tid, ctx.attempt, status, payload, ctx._seal))
            also = list(ctx._also.items()) if ctx._also else []
            for other, attempt in also:
                other._done.append((ctx._tid, attempt, status, payload, ctx._seal))
        self.completed += 1
        link._waker.wake()  # the I/O thread sends results on every wake-up
        for other, _ in also:
            other._waker.wake()

    def _worker(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            ctx = job.ctx
            if ctx._cancelled:
                self._complete(ctx, Outcome.CANCELLED, P.pack_value("cancelled before it started"))
                continue
            answer = self._execute(job)
            if answer is not None:  # None: answered already (a batch with a hung item)
                self._complete(ctx, answer[0], answer[1])

    def _execute(self, job: _Job) -> tuple[int, bytes] | None:
        item, ctx = job.item, job.ctx
        spec = self.skills.get(item.skill)
        if spec is None:
            return Outcome.ERROR, _error_payload(LookupError(f"no skill {item.skill!r} on this node"), self.name)
        data: bytes | memoryview = job.payload.buffer
        sealer = self._sealer
        if sealer is not None or is_sealed(data):
            try:
                data = self._open(job, sealer, data)
            except SealError as exc:
                self.seal_failures += 1
                log.warning("task %s (%s) refused: %s", item.tid.hex(), item.skill, exc)
                return Outcome.ERROR, _error_payload(exc, self.name)
        try:
            call = P.unpack_value(data)
            if type(call) is dict:
                items, item_timeout = parse_batch(call)
                return self._execute_batch(spec, ctx, items, item_timeout)
            if type(call) is not list or not 1 <= len(call) <= 2 or type(call[0]) is not list:
                raise RemoteProtocolError("task payload is not [args, kwargs]", code="bad-payload")
            args = call[0]
            kwargs = call[1] if len(call) == 2 and call[1] else {}
            if type(kwargs) is not dict:
                raise RemoteProtocolError("task kwargs are not a map", code="bad-payload")
        except RemoteProtocolError as exc:
            return Outcome.ERROR, _error_payload(exc, self.name)
        try:
            result = self._call(spec, ctx, args, kwargs, partials=True)
            if ctx._cancelled:
                return Outcome.CANCELLED, P.pack_value("cancelled")
            return Outcome.OK, P.pack_value(result)
        except BaseException as exc:  # the skill's failure is the client's to see
            if ctx._cancelled:
                return Outcome.CANCELLED, P.pack_value("cancelled")
            return Outcome.ERROR, _error_payload(_as_task_error(exc), self.name)

    def _open(self, job: _Job, sealer: NodeSealer | None, data: bytes | memoryview) -> bytes:
        """A sealed task's plaintext; remembers whom its results are sealed to."""
        item = job.item
        if sealer is None:
            raise SealError(f"task {item.tid.hex()} is sealed but this node has no seal key (see 'zlink seal-key')")
        try:
            plain, client_pub = sealer.open_task(item.tid, item.skill, data)
        except SealError as exc:
            # answered unsealed: the error holds no user data, and the client may not share our key
            raise SealError(f"{exc} (this node's seal key id is {sealer.key.key_id})") from None
        job.ctx._seal = (item.skill, client_pub)
        return plain

    def _call(
        self, spec: SkillSpec, ctx: TaskContext, args: list[Any], kwargs: dict[str, Any], *, partials: bool
    ) -> Any:
        """Run the skill once in this worker thread; its exception propagates."""
        if spec.is_async:
            return self._run_async(spec, ctx, args, kwargs, partials)
        token = _current.set(ctx)
        try:
            result = spec.fn(*args, **kwargs)
            return self._drive(result, ctx, partials) if spec.is_generator else result
        finally:
            _current.reset(token)

    def _execute_batch(
        self, spec: SkillSpec, ctx: TaskContext, items: list[list[Any]], item_timeout: float | None
    ) -> tuple[int, bytes] | None:
        """Run a batched map's items one after another (see zlink/_batch.py): one outcome each.

        None: the I/O thread already answered for this batch (an item hung past its timeout).
        """
        run = _BatchRun(len(items), item_timeout)
        outs = run.outs
        clock = time.monotonic
        fn = spec.fn
        plain = not (spec.is_async or spec.is_generator)
        tid = ctx._tid
        watcher = ctx._node or self  # the I/O thread that answers for the batch if an item hangs
        if item_timeout is not None:
            watcher._batch_runs[tid] = (ctx, run)
        token = _current.set(ctx)
        try:
            for args in items:
                if ctx._cancelled:
                    return Outcome.CANCELLED, P.pack_value("cancelled")
                t0 = run.item_start = clock()
                try:
                    result = fn(*args) if plain else self._call(spec, ctx, args, {}, partials=False)
                except BaseException as exc:
                    if ctx._cancelled:
                        return Outcome.CANCELLED, P.pack_value("cancelled")
                    out = [ITEM_ERROR, _error_value(_as_task_error(exc), self.name)]
                else:
                    if item_timeout is not None and clock() - t0 > item_timeout:
                        out = [ITEM_TIMEOUT, f"batch item {len(outs)} ran over its timeout of {item_timeout:g} s"]
                    else:
                        out = [ITEM_OK, result]
                with run.lock:
                    if run.ended:
                        return None
                    outs.append(out)
            with run.lock:
                if run.ended:
                    return None
                run.ended = True
        finally:
            _current.reset(token)
            if item_timeout is not None:
                watcher._batch_runs.pop(tid, None)
        return self._batch_answer(ctx, clock() - run.began, outs)

    def _batch_answer(self, ctx: TaskContext, seconds: float, outs: list[list[Any]]) -> tuple[int, bytes]:
        """The batch's result; outcomes too big for one message go ahead as partial results."""
        payload = pack_batch_result(seconds, outs, lambda e: _error_value(e, self.name))
        limit = self.max_message_size - 4096 - SEAL_OVERHEAD - 64
        if len(payload) <= limit:
            return Outcome.OK, payload
        groups: list[tuple[int, list[list[Any]]]] = []
        group: list[list[Any]] = []
        size, start = 0, 0
        for i, out in enumerate(outs):
            n = len(P.pack_value(out))
            if n > limit:
                err = ValueError(
                    f"the result is {n} bytes; the broker accepts at most {self.max_message_size} per message"
                )
                out = [ITEM_ERROR, _error_value(err, self.name)]
                n = len(P.pack_value(out))
            if group and size + n > limit:
                groups.append((start, group))
                group, size, start = [], 0, i
            group.append(out)
            size += n
        groups.append((start, group))
        for first, part in groups[:-1]:
            self._emit_partial(ctx, P.pack_value([seconds, part, first]))
        first, part = groups[-1]
        return Outcome.OK, P.pack_value([seconds, part, first])

    def _drive(self, gen: Any, ctx: TaskContext, partials: bool = True) -> Any:
        """Run a generator skill: stream every yielded value; its return value is the result."""
        try:
            while True:
                if ctx._cancelled:
                    gen.close()
                    return None
                value = next(gen)
                if partials:
                    self._partial(ctx, value)
        except StopIteration as stop:
            return stop.value

    def _partial(self, ctx: TaskContext, value: Any) -> None:
        self._emit_partial(ctx, P.pack_value(value))  # TypeError here fails the task, as for a result

    def _emit_partial(self, ctx: TaskContext, payload: bytes) -> None:
        if ctx._seal is not None:
            # numbered inside the seal: the client drops a partial that is repeated or out of order
            ctx._pseq += 1
            payload = ctx._pseq.to_bytes(4, "big") + payload
        self._emit(ctx, Outcome.PARTIAL, payload)

    def _run_async(
        self, spec: SkillSpec, ctx: TaskContext, args: list[Any], kwargs: dict[str, Any], partials: bool = True
    ) -> Any:
        assert self._loop is not None

        async def runner() -> Any:
            _current.set(ctx)
            if spec.is_generator:
                async for value in spec.fn(*args, **kwargs):
                    if partials:
                        self._partial(ctx, value)
                return None
            return await spec.fn(*args, **kwargs)

        fut = asyncio.run_coroutine_threadsafe(runner(), self._loop)
        ctx._future = fut
        if ctx._cancelled:
            fut.cancel()
        return fut.result()

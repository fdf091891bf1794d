"""Clients: submit tasks to the swarm and get their results back.

:class:`Client` returns :class:`concurrent.futures.Future` objects and is safe
to use from many threads; :class:`AsyncClient` is the same client for asyncio.
A client keeps every unresolved task until its result arrives, so it can
resubmit after a reconnect or a broker restart; it resolves each future once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import zmq

from . import protocol as P
from ._batch import MAX_ITEMS, Batch, MapPlan, outcome_error
from ._peer import PeerLink
from ._progress import Progress
from .errors import (
    ClosedError,
    RejectedError,
    RemoteProtocolError,
    SealError,
    TaskTimeout,
    ZlinkError,
)
from .protocol import Outcome
from .seal import SEAL_OVERHEAD, ClientSealer, SealKey, is_sealed, seal_answer
from .security import Join

__all__ = ["AsyncClient", "Client", "Executor", "Question", "TaskFuture", "TaskStream"]

log = logging.getLogger("zlink.client")

_BATCH_ITEMS: Final = 1000
#: seconds between a client's liveness pings to the broker
CLIENT_PING: Final = 5.0


class TaskFuture(cf.Future[Any]):
    """A :class:`concurrent.futures.Future` for one task; ``cancel()`` reaches the broker."""

    def __init__(self, client: Client, tid: bytes, skill: str) -> None:
        super().__init__()
        self._client = client
        self.tid = tid
        self.skill = skill
        #: called on the client's I/O thread with each partial result (streams)
        self._on_partial: Callable[[Any], None] | None = None
        #: bytes of the result payload (batched maps size their batches by it)
        self._nbytes = 0
        #: counted against the client's backpressure bound until resolved
        self._counted = False
        #: (attempt, number) of the last sealed partial result taken
        self._pseq = (-1, 0)
        #: questions the running skill asked (multi-turn tasks), and who handles them
        self._questions: queue.SimpleQueue[Question | None] = queue.SimpleQueue()
        self._on_question: Callable[[Question], None] | None = None
        self._asked: set[tuple[int, int]] = set()  # (attempt, seq) seen: no question twice

    @property
    def task_id(self) -> str:
        return self.tid.hex()

    def questions(self, timeout: float | None = None) -> Iterator[Question]:
        """The questions the skill asks while it runs (``current_task().ask``), as they come.

        Answer each with :meth:`Question.answer`; the iteration ends when the
        task does (or raises ``TimeoutError`` when none comes for ``timeout``).
        """
        while True:
            if self.done() and self._questions.empty():
                return
            try:
                q = self._questions.get(timeout=0.05 if timeout is None else min(0.05, timeout))
            except queue.Empty:
                if timeout is not None:
                    timeout -= 0.05
                    if timeout <= 0:
                        raise TimeoutError("no question within the timeout") from None
                continue
            if q is not None:
                yield q

    def cancel(self) -> bool:
        """Cancel the task: dropped at the broker if queued, told to stop if running."""
        if not super().cancel():
            return False
        self._client._cancel_soon(self.tid, counted=self._counted)
        return True

    def __repr__(self) -> str:
        return f"<TaskFuture {self.skill} {self.task_id} {self._state.lower()}>"


_END: Final = object()


class Question:
    """A question a running skill asked its client; :meth:`answer` resumes the skill."""

    __slots__ = ("_client", "attempt", "future", "seq", "value")

    def __init__(self, client: Client, future: TaskFuture, seq: int, attempt: int, value: Any) -> None:
        self._client = client
        self.future = future
        self.seq = seq
        self.attempt = attempt
        #: what the skill asked (a msgpack value)
        self.value = value

    def answer(self, reply: Any) -> None:
        """Send ``reply`` (a msgpack value) to the skill waiting in ``ask()``."""
        self._client._answer(self.future, self.seq, P.pack_value(reply))

    def __repr__(self) -> str:
        return f"<Question {self.seq} of task {self.future.task_id}: {type(self.value).__name__}>"


class TaskStream:
    """The partial results of a generator skill, in order, as they arrive.

    Iterate over it (blocking); :meth:`result` is the skill's return value.
    """

    future: TaskFuture

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def _put(self, value: Any) -> None:
        self._q.put((value,))

    def _end(self, _fut: cf.Future[Any]) -> None:
        self._q.put(_END)

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _END:
            self._q.put(_END)  # iterating again ends at once
            if not self.future.cancelled() and self.future.exception() is not None:
                raise self.future.exception()  # type: ignore[misc]
            raise StopIteration
        return item[0]

    def result(self, timeout: float | None = None) -> Any:
        """The skill's return value (waits for the end of the task)."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        return self.future.cancel()

    def __enter__(self) -> TaskStream:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving a ``with client.stream(...) as s:`` block cancels the task if still running."""
        if not self.future.done():
            self.future.cancel()


class _Pending:
    __slots__ = ("deadline", "future", "payload", "spec")

    def __init__(self, spec: P.TaskSpec, payload: bytes, future: TaskFuture, deadline: float) -> None:
        self.spec = spec
        self.payload = payload
        self.future = future
        self.deadline = deadline


def _resolve(fut: cf.Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
    except cf.InvalidStateError:
        pass  # cancelled by the user meanwhile


def _outcome_error(status: int, payload: Any, tid: bytes) -> ZlinkError:
    try:
        value = P.unpack_value(payload)
    except RemoteProtocolError:
        value = None
    return outcome_error(status, value, tid)


class Client(PeerLink):
    """Submit tasks to skills on the swarm. Thread-safe.

    ::

        with zlink.Client() as client:              # join=None reads $ZLINK_JOIN
            fut = client.submit("square", 7, timeout=30.0)
            assert fut.result() == 49
            assert list(client.map("square", range(1000))) == [x * x for x in range(1000)]

    The constructor connects and raises :class:`~zlink.ConnectError` or
    :class:`~zlink.AuthenticationError` when it cannot. ``liveness`` is how many
    broker beacons may be missed before the client presumes the broker gone and
    re-registers (its unresolved tasks are kept and resubmitted, never failed
    before their own timeout).
    """

    hat = "client"

    def __init__(
        self,
        join: str | Join | None = None,
        *,
        name: str | None = None,
        connect_timeout: float = 10.0,
        heartbeat_interval: float | None = None,
        liveness: int | None = None,
        seal_key: SealKey | str | None = None,
    ) -> None:
        super().__init__(
            join, name=name, connect_timeout=connect_timeout,
            heartbeat_interval=heartbeat_interval, liveness=liveness, seal_key=seal_key,
        )  # fmt: skip
        self._counter = itertools.count(1)
        self._outgoing: deque[_Pending] = deque()
        self._pending: dict[bytes, _Pending] = {}
        self._deadlines: list[tuple[float, bytes]] = []
        self._status_waiters: deque[cf.Future[dict[str, Any]]] = deque()
        #: backpressure: unresolved tasks, bounded by the broker's per-client limit
        self.max_tasks = 0
        #: new tasks per second the broker accepts from this key (0: no limit); submit paces itself
        self.max_rate = 0.0
        self._tokens = 0.0
        self._tokens_t = 0.0
        self._unresolved = 0
        self._room = threading.Condition()
        self._cancel_backlog: set[bytes] = set()
        self._pinged = time.monotonic()
        #: sealed payloads: tasks sealed for the nodes, results opened (None: unsealed swarm)
        self._sealer = ClientSealer(self.seal_key) if self.seal_key is not None else None
        self._connect()

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        skill: str,
        /,
        *args: Any,
        timeout: float | None = None,
        max_attempts: int = 3,
        reads: Iterable[str] = (),
        writes: Iterable[str] = (),
        on_question: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> TaskFuture:
        """Run ``skill(*args, **kwargs)`` on a node; returns a future for its result.

        Raises ``TypeError`` at once when an argument is not a msgpack value.
        ``timeout`` (seconds) bounds the whole task, queueing included. Tasks
        whose ``writes`` keys overlap another's ``reads`` or ``writes`` never run
        at the same time, and start in submission order.

        A skill may ask its caller questions while it runs (``ask``): answer
        them through ``future.questions()``, or pass ``on_question``, a function
        of the question's value returning the answer (run on its own thread).
        """
        handler = _answering_thread(on_question) if on_question is not None else None
        return self._submit(skill, args, kwargs, timeout, max_attempts, reads, writes, None, handler)

    def stream(
        self,
        skill: str,
        /,
        *args: Any,
        timeout: float | None = None,
        max_attempts: int = 3,
        reads: Iterable[str] = (),
        writes: Iterable[str] = (),
        **kwargs: Any,
    ) -> TaskStream:
        """Run a generator skill and iterate over the values it yields as they arrive.

        ::

            s = client.stream("summarize_chapters", book)
            for partial in s:          # each value the skill yields, while it runs
                print(partial)
            final = s.result()         # the skill's return value

        Iteration ends when the task does; it raises the task's error if it failed.
        """
        stream = TaskStream()
        # questions come in the stream, among the partials
        stream.future = self._submit(
            skill, args, kwargs, timeout, max_attempts, reads, writes, stream._put, stream._put
        )
        stream.future.add_done_callback(stream._end)
        return stream

    def _submit(
        self,
        skill: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        max_attempts: int,
        reads: Iterable[str],
        writes: Iterable[str],
        on_partial: Callable[[Any], None] | None,
        on_question: Callable[[Question], None] | None = None,
    ) -> TaskFuture:
        payload = P.pack_value([args, kwargs] if kwargs else [args])
        return self._enqueue(
            skill, payload, timeout, max_attempts, tuple(reads), tuple(writes), on_partial, on_question=on_question
        )

    def _enqueue(
        self,
        skill: str,
        payload: bytes,
        timeout: float | None,
        max_attempts: int,
        reads: tuple[str, ...] = (),
        writes: tuple[str, ...] = (),
        on_partial: Callable[[Any], None] | None = None,
        *,
        on_question: Callable[[Question], None] | None = None,
        wait: bool = True,
    ) -> TaskFuture:
        """Queue one task with an encoded payload (``wait=False``: the caller waited for room)."""
        if self.closed:
            raise ClosedError("this client is closed")
        if not isinstance(skill, str) or not skill or len(skill) > P.MAX_NAME:
            raise ValueError(f"invalid skill name {skill!r}")
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError("timeout must be a positive number of seconds or None")
        if not 1 <= max_attempts <= 100:
            raise ValueError("max_attempts must be between 1 and 100")
        if len(payload) > self.max_message_size - 4096 - SEAL_OVERHEAD:
            raise RejectedError(
                f"task arguments are {len(payload)} bytes; the broker accepts at most "
                f"{self.max_message_size} per message",
                code="too-large",
            )
        tid = self.session + next(self._counter).to_bytes(8, "big")
        if self._sealer is not None:
            payload = self._sealer.seal_task(tid, skill, payload)
        spec = P.TaskSpec(tid, skill, timeout, max_attempts, reads, writes)
        fut = TaskFuture(self, tid, skill)
        fut._on_partial = on_partial
        fut._on_question = on_question  # set before the task can reach a node: no question is missed
        if self.max_tasks or self.max_rate:
            if wait:
                self.wait_room()
            with self._room:
                self._unresolved += 1
                if self.max_rate:
                    self._refill()
                    self._tokens -= 1.0  # may go below zero after a non-waiting submit
            fut._counted = True
            fut.add_done_callback(self._free_room)
        deadline = time.monotonic() + timeout if timeout is not None else math.inf
        self._outgoing.append(_Pending(spec, payload, fut, deadline))
        self._waker.wake()
        return fut

    def has_room(self) -> bool:
        """False while this client holds as many unresolved tasks as the broker allows,
        or has submitted as many as its rate limit allows just now."""
        if self.max_tasks and self._unresolved >= self.max_tasks:
            return False
        return not self.max_rate or self._refill() >= 1.0

    def _refill(self) -> float:
        """Tokens of the submission rate limit (one per task, ``max_rate`` per second)."""
        now = time.monotonic()
        self._tokens = min(max(1.0, self.max_rate), self._tokens + (now - self._tokens_t) * self.max_rate)
        self._tokens_t = now
        return self._tokens

    def wait_room(self, timeout: float | None = None) -> bool:
        """Block until another task may be submitted (backpressure); False on timeout.

        ``submit`` calls this itself: a client at the broker's bound
        (``max_tasks``, from the broker's ``--max-tasks-per-client``) waits for
        results instead of growing without limit; nothing is dropped.
        """
        end = None if timeout is None else time.monotonic() + timeout
        if threading.current_thread() is self._thread and not self.has_room():
            # e.g. submit() from a done-callback: waiting here would stop the very
            # thread that frees room, forever
            raise RejectedError(
                f"this client holds {self._unresolved} unresolved tasks (the broker's bound); "
                "submit from a future's callback cannot wait for room",
                code="quota",
            )
        with self._room:
            while not self.has_room() and not self.closed:
                left = 0.5 if end is None else min(0.5, end - time.monotonic())
                if left <= 0:
                    return False
                if self.max_rate and self._tokens < 1.0:
                    left = min(left, (1.0 - self._tokens) / self.max_rate)
                self._room.wait(left)
        if self.closed:
            raise ClosedError("this client is closed")
        return True

    def _free_room(self, fut: cf.Future[Any]) -> None:
        if fut.cancelled() and not self.closed:
            return  # freed by the cancel itself, once its CANCEL has left (see _cancel_soon)
        self._release_room()

    def _release_room(self) -> None:
        with self._room:
            self._unresolved -= 1
            self._room.notify()

    def map(
        self,
        skill: str,
        iterable: Iterable[Any],
        *,
        ordered: bool = True,
        window: int = 1000,
        timeout: float | None = None,
        max_attempts: int = 3,
        progress: bool = False,
        unpack: bool = False,
        batch: int | None = None,
    ) -> Iterator[Any]:
        """Run ``skill(item)`` for every item; yield results as they arrive.

        In input order by default (a slow item holds back only the items after
        it), or in completion order with ``ordered=False``. At most ``window``
        items are in flight and the iterable is consumed lazily, so a generator
        of a million items runs in flat memory. The first failed item raises its
        error; leaving the loop early cancels the tasks still in flight.
        ``progress=True`` draws a progress bar on stderr; ``unpack=True`` calls
        ``skill(*item)`` (like :func:`itertools.starmap`).

        Fast items travel in batches: ``batch=None`` (the default) starts with
        one item per task and grows batches of consecutive items until one
        takes about 2 ms on a node; ``batch=1`` sends every item as its own
        task; ``batch=N`` fixes the size. ``timeout`` bounds each item.
        """
        total = len(iterable) if progress and hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        bar = Progress(total, label=f"{skill} tasks") if progress else None
        calls = ((skill, tuple(item) if unpack else (item,)) for item in iterable)
        return self._map(calls, timeout, max_attempts, window, ordered, bar, batch)

    def map_reduce(
        self,
        skill: str | Sequence[str],
        items: Iterable[Any],
        reduce_skill: str,
        *,
        ordered: bool = True,
        window: int = 1000,
        timeout: float | None = None,
        max_attempts: int = 3,
        progress: bool = False,
        unpack: bool = False,
        batch: int | None = None,
    ) -> Any:
        """Fan out over ``items``, then run ``reduce_skill(results)`` once and return its result.

        ``skill`` may name several skills: each item then goes to every one of
        them (the demo runs ``["inspect", "scan", "docs"]`` on every file). The
        reduce task receives the list of all results (in input order, skills in
        the given order per item, unless ``ordered=False``), e.g. a verifier
        that checks and merges them. ``timeout`` applies to each task.
        """
        skills = [skill] if isinstance(skill, str) else list(skill)
        if not skills:
            raise ValueError("map_reduce needs at least one skill")
        total = None
        if progress and hasattr(items, "__len__"):
            total = len(items) * len(skills)  # type: ignore[arg-type]
        bar = Progress(total, label="tasks") if progress else None
        calls = ((s, tuple(item) if unpack else (item,)) for item in items for s in skills)
        results = list(self._map(calls, timeout, max_attempts, window, ordered, bar, batch))
        return self.submit(reduce_skill, results, timeout=timeout, max_attempts=max_attempts).result()

    def _plan(
        self,
        calls: Iterator[tuple[str, tuple[Any, ...]]],
        timeout: float | None,
        window: int,
        ordered: bool,
        batch: int | None,
    ) -> MapPlan:
        return MapPlan(
            calls, window=window, ordered=ordered, batch=batch, timeout=timeout,
            limit=self.max_message_size - 4096 - SEAL_OVERHEAD,
        )  # fmt: skip

    def _submit_batch(self, plan: MapPlan, b: Batch, max_attempts: int, *, wait: bool = True) -> TaskFuture:
        on_part = None if plan.batch == 1 else b.add_part  # results too big for one message come in parts
        fut = self._enqueue(b.skill, b.payload, plan.batch_timeout(b), max_attempts, on_partial=on_part, wait=wait)
        b.future, b.payload = fut, b""
        return fut

    def _map(
        self,
        calls: Iterator[tuple[str, tuple[Any, ...]]],
        timeout: float | None,
        max_attempts: int,
        window: int,
        ordered: bool,
        bar: Progress | None,
        batch: int | None = None,
        end: float | None = None,
    ) -> Iterator[Any]:
        """The sync map driver; ``end`` (monotonic) is an overall deadline (``TimeoutError``)."""
        plan = self._plan(calls, timeout, window, ordered, batch)
        done_q: deque[Batch] = deque()  # unordered: finished batches
        ready = threading.Condition()

        def refill() -> None:
            for b in plan.take():
                fut = self._submit_batch(plan, b, max_attempts)
                if not ordered:
                    fut.add_done_callback(functools.partial(on_done, b))

        def on_done(b: Batch, _fut: object) -> None:
            with ready:
                done_q.append(b)
                ready.notify()

        try:
            refill()
            if ordered:
                while (cell := plan.next_cell()) is not None:
                    b, i = cell
                    if b.outcomes is None:
                        _result_by(b.future, end, wait_only=True)
                    ok, value = plan.decode(b)[i]
                    plan.consumed()
                    if bar is not None:
                        bar.advance()
                    refill()
                    if not ok:
                        raise value
                    yield value
            else:
                while not plan.finished:
                    with ready:
                        while not done_q:
                            ready.wait()
                        b = done_q.popleft()
                    for ok, value in plan.decode(b):
                        plan.consumed()
                        if bar is not None:
                            bar.advance()
                        refill()
                        if not ok:
                            raise value
                        yield value
        finally:
            plan.cancel_all()
            if bar is not None:
                bar.close()

    def as_completed(self, futures: Iterable[cf.Future[Any]], timeout: float | None = None) -> Iterator[cf.Future[Any]]:
        """:func:`concurrent.futures.as_completed` over task futures."""
        return cf.as_completed(list(futures), timeout=timeout)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """The broker's view: nodes, queued tasks per skill, counters; ``"endpoint"`` is the
        broker that answered (a swarm may have several)."""
        return self._ask_broker(P.Status(), timeout)

    def admin(self, op: str, arg: str, timeout: float = 10.0) -> dict[str, Any]:
        """An operator's request (needs an admin key): ``admin("drain", NODE)``, ``admin("cancel", TASK_ID)``.

        Returns ``{"op", "ok", "message", "endpoint"}``; raises RejectedError for a key that is not admin.
        """
        return self._ask_broker(P.Status(op=op, arg=arg), timeout)

    def _ask_broker(self, request: P.Status, timeout: float) -> dict[str, Any]:
        fut: cf.Future[dict[str, Any]] = cf.Future()

        def ask() -> None:
            self._status_waiters.append(fut)
            self._post(request)

        self.call_soon(ask)
        try:
            return fut.result(timeout)
        except cf.TimeoutError:

            def forget() -> None:
                try:
                    self._status_waiters.remove(fut)
                except ValueError:
                    pass

            self.call_soon(forget)
            raise TaskTimeout(f"the broker did not answer STATUS within {timeout:g} s") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        """Leave the swarm; tasks still unresolved are cancelled and fail with ClosedError."""
        super().close(timeout)
        self._fail_all(ClosedError("the client was closed before the task finished"))

    # ------------------------------------------------------------------ I/O thread

    def _cancel_soon(self, tid: bytes, *, counted: bool) -> None:
        if self.closed:
            return

        def cancel() -> None:
            pend = self._pending.pop(tid, None)
            if pend is not None:
                if self.welcome is not None:
                    self._post(P.Cancel(tids=(tid,)))
                else:  # re-registering: the broker may still hold it, cancel after WELCOME
                    self._cancel_backlog.add(tid)
            # (a task still in the outgoing queue is skipped when drained)
            if counted:
                # only now, after the CANCEL, may a new task take its place: the
                # broker must not see the new SUBMIT first and refuse it as over quota
                self._release_room()

        try:
            self.call_soon(cancel)
        except ClosedError:
            if counted:
                self._release_room()

    def hello(self) -> P.Hello:
        return P.Hello(
            name=self.name, role="client", session=self.session, epoch=self.epoch, agent="zlink-client",
            seal=self.seal_key.key_id if self.seal_key is not None else "",
        )  # fmt: skip

    def on_welcome(self, welcome: P.Welcome, new_epoch: bool) -> None:
        self.max_tasks = welcome.max_tasks
        if welcome.max_rate != self.max_rate:
            with self._room:
                self.max_rate = welcome.max_rate
                self._tokens, self._tokens_t = max(1.0, self.max_rate), time.monotonic()
        for _ in self._status_waiters:  # asked of a broker that went away: ask again
            self._post(P.Status())
        if self._cancel_backlog:
            backlog, self._cancel_backlog = self._cancel_backlog, set()
            if not new_epoch:  # a new broker never heard of them
                self._post(P.Cancel(tids=tuple(backlog)))
        if self._pending:
            # after a reconnect or a broker restart: the broker drops duplicates
            self._send_tasks(list(self._pending.values()), resubmit=True)

    def on_poll(self) -> None:
        out = self._outgoing
        if not out:
            return
        batch: list[_Pending] = []
        heap = self._deadlines
        while out:
            pend = out.popleft()
            if pend.future.cancelled():
                continue
            self._pending[pend.spec.tid] = pend
            if pend.deadline != math.inf:
                heapq.heappush(heap, (pend.deadline, pend.spec.tid))
            batch.append(pend)
        if self.welcome is not None:
            self._send_tasks(batch)

    def _send_tasks(self, pends: list[_Pending], *, resubmit: bool = False) -> None:
        limit = max(1024, self.max_message_size // 2)
        i = 0
        while i < len(pends):
            specs: list[P.TaskSpec] = []
            frames: list[bytes] = []
            size = 0
            while i < len(pends) and len(specs) < _BATCH_ITEMS and (size < limit or not specs):
                p = pends[i]
                i += 1
                if p.future.done():
                    continue
                spec = p.spec
                if spec.timeout is not None:  # send the time left, not the original
                    spec = P.TaskSpec(
                        spec.tid, spec.skill, max(0.001, p.deadline - time.monotonic()),
                        spec.max_attempts, spec.reads, spec.writes,
                    )  # fmt: skip
                specs.append(spec)
                frames.append(p.payload)
                size += len(p.payload) + 64
            if specs:
                self._post(P.Submit(tasks=tuple(specs), resubmit=resubmit), frames)

    def on_message(self, msg: P.Message, frames: list[zmq.Frame]) -> None:
        t = type(msg)
        if t is P.Result:
            pending = self._pending
            sealer = self._sealer
            for item, frame in zip(msg.results, frames, strict=True):  # type: ignore[attr-defined]
                status = item.status
                data: bytes | memoryview = frame.buffer
                if status == Outcome.QUESTION:
                    self._on_question_item(pending.get(item.tid), item.attempt, data)
                    continue
                if status == Outcome.PARTIAL:
                    pend = pending.get(item.tid)
                    if pend is None or pend.future._on_partial is None:
                        continue
                    try:
                        if sealer is not None:
                            data = self._open_partial(sealer, pend, item.attempt, data)
                        pend.future._nbytes += len(data)
                        pend.future._on_partial(P.unpack_value(data))
                    except (RemoteProtocolError, SealError) as exc:
                        log.warning("dropped a partial of task %s: %s", item.tid.hex(), exc)
                    continue
                pend = pending.pop(item.tid, None)
                if pend is None:
                    continue  # a duplicate (resubmission raced a result): first one won
                try:
                    if sealer is not None and (status == Outcome.OK or status == Outcome.ERROR):
                        data = self._open(sealer, pend, item.attempt, status, data)
                    if status == Outcome.OK:
                        pend.future._nbytes += len(data)
                        _resolve(pend.future, P.unpack_value(data))
                    else:
                        _resolve(pend.future, exc=_outcome_error(status, data, item.tid))
                except (RemoteProtocolError, SealError) as exc:
                    _resolve(pend.future, exc=exc)
        elif t is P.StatusReply:
            if self._status_waiters:
                # named on the I/O thread: the broker that answered, even if the client moves on now
                reply = {**msg.status, "endpoint": self.endpoint}  # type: ignore[attr-defined]
                _resolve(self._status_waiters.popleft(), reply)
        elif t is P.Error:
            err: P.Error = msg  # type: ignore[assignment]
            if err.tids:
                for tid in err.tids:
                    pend = self._pending.pop(tid, None)
                    if pend is not None:
                        _resolve(pend.future, exc=RejectedError(f"{err.code}: {err.message}", code=err.code))
            elif err.code == "forbidden" and self._status_waiters:
                _resolve(self._status_waiters.popleft(), exc=RejectedError(err.message, code=err.code))
            else:
                log.warning("broker error %s: %s", err.code, err.message)

    def _on_question_item(self, pend: _Pending | None, attempt: int, data: bytes | memoryview) -> None:
        """A running skill asked something (I/O thread): hand it to the future's handler."""
        if pend is None or pend.future.done():
            return
        fut = pend.future
        try:
            if self._sealer is not None:
                data = self._open(self._sealer, pend, attempt, Outcome.QUESTION, data)
            seq, value = P.unpack_value(data)
            if type(seq) is not int:
                raise TypeError
        except (SealError, RemoteProtocolError, TypeError, ValueError) as exc:
            log.warning("dropped a question of task %s: %s", pend.spec.tid.hex(), exc)
            return
        if (attempt, seq) in fut._asked:
            return  # a repeat
        fut._asked.add((attempt, seq))
        q = Question(self, fut, seq, attempt, value)
        handler = fut._on_question
        if handler is not None:
            handler(q)
        else:
            fut._questions.put(q)

    def _answer(self, fut: TaskFuture, seq: int, plain: bytes) -> None:
        tid = fut.tid

        def go() -> None:
            payload = plain
            if self._sealer is not None:
                payload = seal_answer(self._sealer.answer_aead, tid, seq, plain)
            self._post(P.Answer(tid=tid, seq=seq), [payload])

        self.call_soon(go)

    def _open_partial(self, sealer: ClientSealer, pend: _Pending, attempt: int, data: bytes | memoryview) -> bytes:
        """A sealed partial result: opened, and its sequence number checked (no repeats, no reordering)."""
        plain = self._open(sealer, pend, attempt, Outcome.PARTIAL, data)
        seq = int.from_bytes(plain[:4], "big")
        fut = pend.future
        last_attempt, last = fut._pseq
        if attempt == last_attempt and seq <= last:
            self.seal_failures += 1
            raise SealError(f"a partial result of task {pend.spec.tid.hex()} was repeated or reordered; dropped")
        fut._pseq = (attempt, seq)
        return plain[4:]

    def _open(self, sealer: ClientSealer, pend: _Pending, attempt: int, status: int, data: bytes | memoryview) -> bytes:
        """A sealed result's plaintext; counts and raises :class:`SealError` when it does not open."""
        tid = pend.spec.tid
        try:
            return sealer.open_result(tid, pend.spec.skill, attempt, status, data)
        except SealError as exc:
            self.seal_failures += 1
            err = exc
            if status == Outcome.ERROR and not is_sealed(data):
                # e.g. a node without the seal key; its words are shown, marked as unverified
                reason = str(_outcome_error(status, data, tid))
                err = SealError(
                    f"task {tid.hex()} failed with an unsealed error (unverified: the broker could have "
                    f"written it; this client's seal key id is {sealer.key.key_id}): {reason[:500]}",
                    task_id=tid.hex(),
                )
            err.task_id = tid.hex()
            log.warning("task %s: %s", tid.hex(), err)
            raise err from None

    def on_tick(self, now: float) -> None:
        if self.welcome is not None and now - self._pinged >= CLIENT_PING:
            self._pinged = now  # liveness: a broker forgets a client silent for 30 s
            self._post(P.Heartbeat(session=self.session, epoch=self.epoch))
        heap = self._deadlines
        expired: list[bytes] = []
        while heap and heap[0][0] <= now:
            _, tid = heapq.heappop(heap)
            pend = self._pending.pop(tid, None)
            if pend is None:
                continue
            expired.append(tid)
            _resolve(pend.future, exc=TaskTimeout(
                f"task {pend.spec.skill!r} ({tid.hex()}) did not finish within its timeout of {pend.spec.timeout:g} s",
                task_id=tid.hex(),
            ))  # fmt: skip
        if expired:
            if self.welcome is not None:
                self._post(P.Cancel(tids=tuple(expired)))
            else:
                self._cancel_backlog.update(expired)

    def on_fatal(self, exc: ZlinkError) -> None:
        self._fail_all(exc)

    def _fail_all(self, exc: ZlinkError) -> None:
        for pend in list(self._pending.values()):
            _resolve(pend.future, exc=exc)
        self._pending.clear()
        while self._outgoing:
            _resolve(self._outgoing.popleft().future, exc=exc)
        while self._status_waiters:
            _resolve(self._status_waiters.popleft(), exc=exc)


class AsyncClient:
    """The asyncio face of :class:`Client`: ``await client.submit(...)`` gives the result.

    ::

        async with zlink.AsyncClient() as client:
            assert await client.submit("square", 7) == 49
            async for r in client.map("square", range(10)):
                ...
    """

    def __init__(
        self,
        join: str | Join | None = None,
        *,
        name: str | None = None,
        connect_timeout: float = 10.0,
        heartbeat_interval: float | None = None,
        liveness: int | None = None,
        seal_key: SealKey | str | None = None,
    ) -> None:
        self._args: dict[str, Any] = dict(
            join=join, name=name, connect_timeout=connect_timeout,
            heartbeat_interval=heartbeat_interval, liveness=liveness, seal_key=seal_key,
        )  # fmt: skip
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The underlying thread-based client (connect first)."""
        if self._client is None:
            raise ClosedError("AsyncClient is not connected: use 'async with' or await connect()")
        return self._client

    async def connect(self) -> AsyncClient:
        if self._client is None:
            loop = asyncio.get_running_loop()
            self._client = await loop.run_in_executor(None, lambda: Client(**self._args))
        return self

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.get_running_loop().run_in_executor(None, client.close)

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self,
        skill: str,
        /,
        *args: Any,
        timeout: float | None = None,
        max_attempts: int = 3,
        reads: Iterable[str] = (),
        writes: Iterable[str] = (),
        **kwargs: Any,
    ) -> Any:
        """Run a task and return its result (cancelling the await cancels the task).

        At the broker's per-client bound it waits (without blocking the loop).
        """
        client = self.client
        while not client.has_room():  # several coroutines may wake for one free slot
            await asyncio.get_running_loop().run_in_executor(None, client.wait_room)
        fut = client.submit(
            skill, *args, timeout=timeout, max_attempts=max_attempts, reads=reads, writes=writes, **kwargs
        )
        return await asyncio.wrap_future(fut)

    async def map(
        self,
        skill: str,
        iterable: Iterable[Any],
        *,
        ordered: bool = True,
        window: int = 1000,
        timeout: float | None = None,
        max_attempts: int = 3,
        progress: bool = False,
        unpack: bool = False,
        batch: int | None = None,
    ) -> AsyncIterator[Any]:
        """Async generator with the same semantics as :meth:`Client.map`."""
        client = self.client
        total = len(iterable) if progress and hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
        bar = Progress(total, label=f"{skill} tasks") if progress else None
        calls = ((skill, tuple(item) if unpack else (item,)) for item in iterable)
        plan = client._plan(calls, timeout, window, ordered, batch)
        done_q: asyncio.Queue[Batch] = asyncio.Queue()  # unordered
        loop = asyncio.get_running_loop()

        async def refill() -> None:
            for b in plan.take():
                while not client.has_room():  # wait for room without blocking the loop
                    await loop.run_in_executor(None, client.wait_room)
                fut = client._submit_batch(plan, b, max_attempts, wait=False)
                if not ordered:
                    fut.add_done_callback(functools.partial(on_done, b))

        def on_done(b: Batch, _fut: object) -> None:
            loop.call_soon_threadsafe(done_q.put_nowait, b)

        async def outcomes(b: Batch) -> list[tuple[bool, Any]]:
            if b.outcomes is None:
                await asyncio.wait((asyncio.wrap_future(b.future),))
            return plan.decode(b)

        try:
            await refill()
            while not plan.finished:
                if ordered:
                    cell = plan.next_cell()
                    if cell is None:
                        break
                    batch_outs = [(await outcomes(cell[0]))[cell[1]]]
                else:
                    batch_outs = await outcomes(await done_q.get())
                for ok, value in batch_outs:
                    plan.consumed()
                    if bar is not None:
                        bar.advance()
                    await refill()
                    if not ok:
                        raise value
                    yield value
        finally:
            plan.cancel_all()
            if bar is not None:
                bar.close()

    async def stream(
        self,
        skill: str,
        /,
        *args: Any,
        timeout: float | None = None,
        max_attempts: int = 3,
        reads: Iterable[str] = (),
        writes: Iterable[str] = (),
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """Async generator over a generator skill's partial results (see :meth:`Client.stream`).

        It ends when the task does and raises the task's error if it failed.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()

        def put(value: Any) -> None:
            loop.call_soon_threadsafe(q.put_nowait, (value,))

        fut = self.client._submit(skill, args, kwargs, timeout, max_attempts, reads, writes, put)
        fut.add_done_callback(lambda _f: loop.call_soon_threadsafe(q.put_nowait, _END))
        try:
            while True:
                item = await q.get()
                if item is _END:
                    break
                yield item[0]
            if not fut.cancelled() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]
        finally:
            if not fut.done():
                fut.cancel()

    async def map_reduce(
        self, skill: str | Sequence[str], items: Iterable[Any], reduce_skill: str, **options: Any
    ) -> Any:
        """Async :meth:`Client.map_reduce`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.client.map_reduce(skill, items, reduce_skill, **options))

    async def status(self, timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.client.status(timeout))


def _answering_thread(fn: Callable[[Any], Any]) -> Callable[[Question], None]:
    """An on_question handler: ``fn(question)`` runs on its own thread, its return value is the answer."""

    def handle(q: Question) -> None:
        def run() -> None:
            try:
                reply = fn(q.value)
            except Exception as exc:  # the user's handler failed: the skill hears why
                log.warning("on_question handler of task %s raised %s", q.future.task_id, type(exc).__name__)
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            q.answer(reply)

        threading.Thread(target=run, name="zlink-answer", daemon=True).start()

    return handle


def _skill_name(fn: Callable[..., Any] | str) -> str:
    if isinstance(fn, str):
        return fn
    spec = getattr(fn, "__zlink_skill__", None)
    name = getattr(spec, "name", None)
    if not isinstance(name, str):
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} is not a zlink skill: decorate it with @zlink.skill() "
            "(it runs on a node under its skill name) or pass the skill's name"
        )
    return name


def _result_by(fut: cf.Future[Any], end: float | None, *, wait_only: bool = False) -> Any:
    """``fut``'s result by the monotonic deadline ``end`` (``TimeoutError`` past it)."""
    left = None if end is None else max(0.0, end - time.monotonic())
    if wait_only:
        if not cf.wait((fut,), left).done:
            raise TimeoutError("Executor.map: the timeout passed")
        return None
    return fut.result(left)


class Executor(cf.Executor):
    """A :class:`concurrent.futures.Executor` whose workers are the swarm's nodes.

    ::

        # with ProcessPoolExecutor() as pool:      # before
        with zlink.Executor() as pool:              # after: the same code, on the swarm
            futures = [pool.submit(square, x) for x in range(100)]
            print(list(pool.map(square, range(100))))

    ``fn`` is a function decorated with ``@zlink.skill`` (it runs on a node under
    its skill name; the nodes must serve it) or a skill name.
    """

    def __init__(self, join: str | Join | None = None, *, window: int = 1000, **client_options: Any) -> None:
        self._client = Client(join, **client_options)
        self._window = window
        self._futures: set[cf.Future[Any]] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    @property
    def client(self) -> Client:
        return self._client

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            # every keyword goes to the function, as with any Executor (no task options)
            fut = self._client._submit(_skill_name(fn), args, kwargs, None, 3, (), (), None)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: cf.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(fut)

    def map(
        self,
        fn: Callable[..., Any] | str,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`: results in order, lazily windowed.

        ``timeout`` counts from this call, as in the standard library: the
        iterator raises ``TimeoutError`` once it passes. Items travel in
        adaptive batches (see :meth:`Client.map`); ``chunksize`` > 1 fixes the
        batch size instead.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        skill = _skill_name(fn)
        end = None if timeout is None else time.monotonic() + timeout
        calls = ((skill, args) for args in zip(*iterables, strict=False))
        batch = None if chunksize <= 1 else min(chunksize, MAX_ITEMS)
        return self._client._map(calls, None, 3, self._window, True, None, batch, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            cf.wait(pending)
        self._client.close()

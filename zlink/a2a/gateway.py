"""``zlink gateway``: the swarm as one A2A v1.0 agent.

Built on a2a-sdk's server pieces: its JSON-RPC and HTTP+JSON route factories,
its request handler and its in-memory task store; zlink supplies the agent
executor (a message runs one zlink task), a task store with a TTL, the agent
card (rebuilt from the broker's status, so it follows nodes as they join and
leave) and a bearer-token check in front of everything but the card.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hmac
import logging
import math
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import Event, EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    CancelTaskRequest,
    HTTPAuthSecurityScheme,
    InvalidParamsError,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    SecurityRequirement,
    SecurityScheme,
    SendMessageRequest,
    StringList,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH, TransportProtocol
from a2a.utils.errors import A2AError
from a2a.utils.proto_utils import validate_proto_required_fields
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from .. import __version__
from ..client import Client, Question, TaskFuture, TaskStream
from ..errors import ConfigError, RemoteError, TaskCancelled, ZlinkError
from ..seal import SealKey
from ..security import Join, default_host
from . import BINDING_URI
from ._convert import message_call, parts_value, struct_dict, value_parts

__all__ = ["CALL_EXTENSION", "Gateway", "build_card", "swarm_skills"]

log = logging.getLogger("zlink.a2a")

#: the extension that names the message metadata a gateway reads (skill, args, kwargs, timeout)
CALL_EXTENSION: Final = "urn:zlink:extension:call:v1"
#: media types every skill takes and returns unless it declares its own
DEFAULT_MODES: Final = ("text/plain", "application/json", "application/octet-stream")
TERMINAL: Final = frozenset(
    {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED,
     TaskState.TASK_STATE_REJECTED}
)  # fmt: skip
#: request bodies larger than this are refused (413) before they are read into memory
MAX_BODY: Final = 32 * 1024 * 1024
_CALL: Final = "zlink.call"  # the parsed call, in the request's ServerCallContext.state


# --------------------------------------------------------------------------- the agent card


def swarm_skills(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Skill name -> the metadata its node announced, for the live nodes in a broker status.

    Draining nodes are left out: their skills are on the way out. The broker's
    status lists each node's skill names (``"skills"``); the metadata nodes
    send (description, tags, examples, modes) is taken from ``"skill_info"``
    (name -> metadata) or from ``"skills"`` when it is a map, when the broker
    reports it.
    """
    out: dict[str, dict[str, Any]] = {}
    nodes = status.get("nodes")
    for node in nodes if isinstance(nodes, list) else ():
        if not isinstance(node, Mapping) or node.get("draining"):
            continue
        skills = node.get("skills")
        info = node.get("skill_info")
        meta_of: dict[str, Any] = dict(info) if isinstance(info, Mapping) else {}
        if isinstance(skills, Mapping):
            meta_of = {**{k: v for k, v in skills.items() if isinstance(v, Mapping)}, **meta_of}
        for name in skills if isinstance(skills, list | tuple | Mapping) else ():
            if not isinstance(name, str) or not name:
                continue
            meta = meta_of.get(name)
            meta = dict(meta) if isinstance(meta, Mapping) else {}
            if name not in out or (meta and not out[name]):
                out[name] = meta
    return dict(sorted(out.items()))


def _strings(value: Any, limit: int = 32, size: int = 200) -> list[str]:
    """A node's list of strings, bounded (nodes are trusted to join, not to be tidy)."""
    if not isinstance(value, list | tuple):
        return []
    return [v[:size] for v in value if isinstance(v, str) and v][:limit]


def _skill(name: str, meta: Mapping[str, Any]) -> AgentSkill:
    description = meta.get("description")
    if not isinstance(description, str) or not description.strip():
        description = f"zlink skill {name!r}, run by a node of the swarm"
    return AgentSkill(
        id=name,
        name=name,
        description=description[:1000],
        tags=_strings(meta.get("tags")) or ["zlink"],  # the card requires at least one tag
        examples=_strings(meta.get("examples"), size=1000),
        input_modes=_strings(meta.get("input_modes")),
        output_modes=_strings(meta.get("output_modes")),
    )


def build_card(
    *,
    url: str,
    skills: Mapping[str, Mapping[str, Any]],
    name: str = "zlink swarm",
    description: str | None = None,
    auth: bool = True,
    rest: bool = True,
    zmq_urls: Sequence[str] = (),
) -> AgentCard:
    """The agent card of a gateway at ``url`` (its base URL) serving ``skills``.

    ``zmq_urls`` are the swarm's brokers, listed as zlink's own binding.
    """
    base = url.rstrip("/")
    interfaces = [
        AgentInterface(url=f"{base}/", protocol_binding=TransportProtocol.JSONRPC, protocol_version="1.0"),
    ]
    if rest:
        interfaces.append(
            AgentInterface(url=f"{base}/rest", protocol_binding=TransportProtocol.HTTP_JSON, protocol_version="1.0")
        )
    for zmq_url in zmq_urls:  # zlink's own transport, for peers that hold a join string (A2A spec 5.8)
        interfaces.append(AgentInterface(url=zmq_url, protocol_binding=BINDING_URI, protocol_version="1.0"))
    card = AgentCard(
        name=name,
        description=description
        or (
            f"A zlink swarm seen as one agent: each message runs one task on a node that has its skill "
            f"({len(skills)} skill{'s' if len(skills) != 1 else ''} live). Name the skill in the message "
            "metadata 'skill'; each part is one argument."
        ),
        supported_interfaces=interfaces,
        version=__version__,
        capabilities=AgentCapabilities(
            streaming=True,
            push_notifications=False,
            extensions=[
                AgentExtension(
                    uri=CALL_EXTENSION,
                    description=(
                        "Message metadata: 'skill' names the zlink skill, 'args' (a list) replaces the parts as "
                        "positional arguments, 'kwargs' (a map) holds keyword arguments, 'timeout' (seconds) "
                        "bounds the task."
                    ),
                    required=False,
                )
            ],
        ),
        default_input_modes=list(DEFAULT_MODES),
        default_output_modes=list(DEFAULT_MODES),
        skills=[_skill(n, m) for n, m in skills.items()],
    )
    if auth:
        card.security_schemes["bearer"].CopyFrom(
            SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="Bearer", description="The gateway's token (zlink gateway --token or its start-up output)"
                )
            )
        )
        card.security_requirements.append(SecurityRequirement(schemes={"bearer": StringList()}))
    return card


# --------------------------------------------------------------------------- tasks in memory, with a TTL


def _one_owner(_context: ServerCallContext) -> str:
    return ""  # one token, one tenant


class TTLTaskStore(TaskStore):
    """a2a-sdk's in-memory task store, forgetting finished tasks ``ttl`` seconds after their last change.

    Nothing is written anywhere (zero-log). At most ``max_tasks`` tasks are
    kept: past that the oldest finished ones go first. A task that has not
    changed for ``stale`` seconds is forgotten even if it never finished.
    """

    def __init__(self, ttl: float = 600.0, max_tasks: int = 10_000, stale: float = 86_400.0) -> None:
        self._inner = InMemoryTaskStore(owner_resolver=_one_owner)
        self.ttl = ttl
        self.max_tasks = max_tasks
        self.stale = stale
        #: task id -> (monotonic time of its last save, finished), oldest change first
        self._seen: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._swept = 0.0
        self._context = ServerCallContext()

    def __len__(self) -> int:
        return len(self._seen)

    async def save(self, task: Task, context: ServerCallContext) -> None:
        await self._inner.save(task, context)
        self._seen[task.id] = (time.monotonic(), task.status.state in TERMINAL)
        self._seen.move_to_end(task.id)
        await self.sweep()

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        await self.sweep()
        return await self._inner.get(task_id, context)

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        await self.sweep()
        return await self._inner.list(params, context)

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        self._seen.pop(task_id, None)
        await self._inner.delete(task_id, context)

    async def sweep(self, *, force: bool = False) -> int:
        """Forget expired tasks (at most once a second unless ``force`` or over the bound); returns how many."""
        now = time.monotonic()
        if not force and now - self._swept < 1.0 and len(self._seen) <= self.max_tasks:
            return 0
        self._swept = now
        drop = [tid for tid, (t, done) in self._seen.items() if (done and now - t > self.ttl) or now - t > self.stale]
        over = len(self._seen) - len(drop) - self.max_tasks
        if over > 0:
            gone = set(drop)
            drop += [tid for tid, (_t, done) in self._seen.items() if done and tid not in gone][:over]
        for tid in drop:
            self._seen.pop(tid, None)
            await self._inner.delete(tid, self._context)
        return len(drop)


# --------------------------------------------------------------------------- running a message as a zlink task


@dataclass(slots=True)
class _Call:
    skill: str
    args: list[Any]
    kwargs: dict[str, Any]
    timeout: float | None
    stream: bool


#: what a running task hands the executor: a partial result, a question (value, how to answer it), or the end
_Item = tuple[str, Any] | tuple[str, Any, Callable[[Any], None]] | None


class _Run:
    """A gateway task's zlink side: its future, what it produced so far, and a question waiting for an answer.

    It outlives one ``execute`` call when the skill asks a question: the A2A
    task is then ``input-required`` and the client's next message (naming the
    task) is the answer.
    """

    __slots__ = ("ended", "future", "items", "parked", "pending", "sent", "streamed", "waiting")

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed  # a TaskStream, read by a thread that also puts the end item
        self.future: TaskFuture | None = None  # set once submitted
        self.items: asyncio.Queue[_Item] = asyncio.Queue()
        self.sent = 0  # partial results relayed so far
        self.ended = False  # the A2A task's final state is written (or being written)
        self.parked = False  # input-required: no execute() is reading items
        self.pending: Callable[[Any], None] | None = None  # answers the question the client was asked
        self.waiting: set[cf.Future[Any]] = set()  # answers waited for on submit's question threads


def _agent_message(updater: TaskUpdater, text: str) -> Message:
    return updater.new_agent_message([Part(text=text, media_type="text/plain")])


class _Executor(AgentExecutor):
    """Runs each A2A task as one zlink task.

    Partial results of generator skills stream as chunks of the artifact
    "partials" (streaming requests), the result is the artifact "result". A
    skill's question (``current_task().ask``) makes the task input-required:
    the client's next message to the task answers it.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._runs: dict[str, _Run] = {}

    def waiting_for_input(self, task_id: str) -> bool:
        run = self._runs.get(task_id)
        return run is not None and run.pending is not None and not run.ended

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = context.task_id or "", context.context_id or ""
        updater = TaskUpdater(event_queue, task_id, context_id)
        run = self._runs.get(task_id)
        if run is not None and run.pending is not None and context.current_task is not None:
            answer, run.pending, run.parked = run.pending, None, False
            message = context.message
            try:
                answer(parts_value(message.parts) if message is not None else None)
            except (ZlinkError, cf.InvalidStateError) as exc:  # the task ended meanwhile: its end item follows
                log.info("task %s: answer not delivered: %s", task_id, type(exc).__name__)
            await updater.start_work()
            await self._follow(task_id, run, updater)
            return
        if context.current_task is not None:  # a second answer raced the first: nothing waits for it
            log.info("task %s: a message for a question already answered", task_id)
            return
        call = context.call_context.state.get(_CALL)
        if not isinstance(call, _Call) or not task_id:
            raise InvalidParamsError(message="the gateway could not read this message's call")
        loop = asyncio.get_running_loop()
        handle: TaskFuture | TaskStream | None = None
        error: Exception | None = None
        # registered before the submit: the skill's first question may come before submit() returns here
        run = self._runs[task_id] = _Run(call.stream)
        on_question = None if call.stream else self._question_thread(run, loop)
        try:
            handle = await self._gw._start(call, on_question)
        except (ZlinkError, ValueError, TypeError) as exc:
            error = exc
        future = None if handle is None else handle.future if isinstance(handle, TaskStream) else handle
        run.future = future
        if future is not None:
            future.add_done_callback(lambda _f: _ended(loop, run))
        else:
            self._runs.pop(task_id, None)
        meta: dict[str, Any] = {"skill": call.skill}
        if future is not None:
            meta["zlink_task_id"] = future.task_id
        status = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
        status.timestamp.GetCurrentTime()
        history = [context.message] if context.message is not None else []
        await event_queue.enqueue_event(
            Task(id=task_id, context_id=context_id, status=status, history=history, metadata=meta)
        )
        if handle is None or future is None:
            log.info("task %s (%s): not submitted: %s", task_id, call.skill, type(error).__name__)
            await updater.failed(_agent_message(updater, f"not submitted: {error}"))
            return
        if isinstance(handle, TaskStream):
            self._pump(handle, run, loop)  # its thread puts the end item after the last partial
        log.info("task %s: %s as zlink task %s", task_id, call.skill, future.task_id)
        await updater.start_work()
        await self._follow(task_id, run, updater)

    async def _follow(self, task_id: str, run: _Run, updater: TaskUpdater) -> None:
        """Relay what the zlink task produces until it ends, or until it asks a question (then park)."""
        future = run.future
        assert future is not None
        try:
            while (item := await run.items.get()) is not None:
                if len(item) == 3:  # a question
                    run.pending, run.parked = item[2], True
                    log.info("task %s: input required", task_id)
                    await updater.requires_input(updater.new_agent_message(value_parts(item[1])))
                    return  # the client's next message answers it (a new execute call)
                await updater.add_artifact(
                    value_parts(item[1]), artifact_id="partials", name="partials", append=run.sent > 0
                )
                run.sent += 1
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            run.parked = False
            future.cancel()
            raise
        except TaskCancelled as exc:
            if not run.ended:
                run.ended = True
                await updater.cancel(_agent_message(updater, f"cancelled: {exc}"))
        except ZlinkError as exc:  # RemoteError, TaskTimeout, TaskLost, SealError, ClosedError...
            if not run.ended:
                run.ended = True
                text = f"{exc.remote_type}: {exc.remote_message}" if isinstance(exc, RemoteError) else str(exc)
                log.info("task %s: failed: %s", task_id, type(exc).__name__)
                await updater.failed(_agent_message(updater, text))
        else:
            if not run.ended:
                run.ended = True
                await updater.add_artifact(value_parts(result), artifact_id="result", name="result", last_chunk=True)
                await updater.complete()
        finally:
            if not run.parked:
                self._runs.pop(task_id, None)
                if not future.done():
                    future.cancel()

    def _question_thread(self, run: _Run, loop: asyncio.AbstractEventLoop) -> Callable[[Any], Any]:
        """submit's on_question: runs on a thread of its own and waits there until the client answers."""

        def ask(value: Any) -> Any:
            answer: cf.Future[Any] = cf.Future()
            run.waiting.add(answer)
            if run.future is not None and run.future.done():
                answer.cancel()  # ended before we could wait (the done callback may have run already)
            _put(loop, run, ("question", value, answer.set_result))
            try:
                return answer.result()
            except cf.CancelledError:
                return {"error": "the task ended before the A2A client answered"}
            finally:
                run.waiting.discard(answer)

        return ask

    def _pump(self, stream: TaskStream, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        """A TaskStream blocks: a thread per streaming task reads it and hands each item to the event loop."""

        def pump() -> None:
            try:
                for value in stream:
                    if isinstance(value, Question):
                        _put(loop, run, ("question", value.value, value.answer))
                    else:
                        _put(loop, run, ("partial", value))
            except BaseException:  # the task's error: read from its future
                pass
            finally:
                _put(loop, run, None)

        threading.Thread(target=pump, name="zlink-a2a-stream", daemon=True).start()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id = context.task_id or ""
        run = self._runs.get(task_id)
        if run is None or run.ended:
            return  # finished meanwhile: the SDK closes it out
        run.ended = True
        updater = TaskUpdater(event_queue, task_id, context.context_id or "")
        if run.parked:  # nobody reads its items now: this is its last word
            self._runs.pop(task_id, None)
            run.parked = False
            outcome = None if run.future is None else _outcome(run.future)
            if outcome is not None:  # it ended while waiting for input (its timeout passed...)
                await updater.failed(_agent_message(updater, outcome))
                return
        if run.future is not None:
            run.future.cancel()
        log.info("task %s: cancelled by the A2A client", task_id)
        await updater.cancel(_agent_message(updater, "cancelled by the client"))

    def parked_and_over(self) -> list[str]:
        """Tasks waiting for input whose zlink task ended meanwhile (e.g. its timeout): the sweeper closes them."""
        return [
            tid for tid, run in self._runs.items()
            if run.parked and not run.ended and run.future is not None and run.future.done()
        ]  # fmt: skip


def _outcome(future: TaskFuture) -> str | None:
    """Why a finished zlink task ended, as the A2A task's failure message (None while it runs)."""
    if not future.done():
        return None
    if future.cancelled():
        return "cancelled"
    exc = future.exception()
    if exc is None:
        return "it finished while waiting for input"
    return f"{exc.remote_type}: {exc.remote_message}" if isinstance(exc, RemoteError) else str(exc)


def _ended(loop: asyncio.AbstractEventLoop, run: _Run) -> None:
    """The zlink task ended (any thread): stop waiting for answers; a submitted task's items end here."""
    for answer in list(run.waiting):
        answer.cancel()
    if not run.streamed:
        _put(loop, run, None)


def _put(loop: asyncio.AbstractEventLoop, run: _Run, item: _Item) -> None:
    try:
        loop.call_soon_threadsafe(run.items.put_nowait, item)
    except RuntimeError:  # the loop closed (gateway shutting down)
        pass


class _Handler(DefaultRequestHandler):
    """a2a-sdk's request handler, with zlink's checks before a message becomes a task.

    A message that names no skill, an unknown skill, bad arguments or a task to
    continue gets a JSON-RPC "invalid params" error (-32602) and no task.
    """

    def __init__(self, gateway: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._gw = gateway

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Task | Message:
        await self._gw._admit(params, context, stream=False)
        result: Task | Message = await super().on_message_send(params, context)
        return result

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        await self._gw._admit(params, context, stream=True)
        inner = super().on_message_send_stream(params, context)
        try:
            async for event in inner:
                yield event
        finally:
            await inner.aclose()


# --------------------------------------------------------------------------- HTTP in front


class _Guard:
    """ASGI middleware: a bearer token for everything but the agent card, and a bound on request bodies."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int = MAX_BODY) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        is_card = scope.get("path") == AGENT_CARD_WELL_KNOWN_PATH and scope.get("method") in ("GET", "HEAD")
        if self._token is not None and not is_card and not self._authorized(headers.get(b"authorization", b"")):
            await _reply(send, 401, b'{"error": "unauthorized: send Authorization: Bearer <the gateway token>"}',
                         [(b"www-authenticate", b'Bearer realm="zlink gateway"')])  # fmt: skip
            return
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if length > self.max_body:
            await _reply(send, 413, b'{"error": "request body too large"}')
            return
        await self.app(scope, self._bounded(receive), send)

    def _authorized(self, header: bytes) -> bool:
        assert self._token is not None
        scheme, _, credentials = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)

    def _bounded(self, receive: Receive) -> Receive:
        """A chunked body that grows past the bound fails the request as 413 (a JSON-RPC error)."""
        seen = 0
        limit = self.max_body

        async def bounded() -> AsgiMessage:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(status_code=413)
            return message

        return bounded


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as (host, port); ConfigError when it is not."""
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port <= 65535:
        raise ConfigError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host, port


def _some(names: Mapping[str, Any] | None, limit: int = 50) -> str:
    """Skill names for an error message, at most ``limit`` of them."""
    listed = list(names or ())
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = default_host()
    return f"[{host}]" if ":" in host else host


def _server_class() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, returning normally after SIGINT/SIGTERM (uvicorn re-raises the signal once it has
        shut down, which would kill the process before the gateway leaves the swarm)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server


# --------------------------------------------------------------------------- the gateway


class Gateway:
    """The swarm as one A2A agent: ``Gateway(join, http="127.0.0.1:8080").run()``.

    ``token`` is the bearer token A2A clients must send (one is generated when
    None; read it from :attr:`token`); ``auth=False`` serves without one.
    ``default_skill`` runs messages that name no skill. ``task_timeout`` bounds
    every task (a message's metadata ``"timeout"`` may ask for less);
    ``task_ttl`` is how long a finished task stays readable (GetTask,
    ListTasks). ``client`` uses an existing zlink client instead of connecting.
    """

    def __init__(
        self,
        join: str | Join | None = None,
        *,
        http: str = "127.0.0.1:8080",
        token: str | None = None,
        auth: bool = True,
        public_url: str | None = None,
        name: str = "zlink swarm",
        description: str | None = None,
        default_skill: str | None = None,
        task_timeout: float = 3600.0,
        task_ttl: float = 600.0,
        max_tasks: int = 10_000,
        advertise_zmq: bool = True,
        rest: bool = True,
        card_refresh: float = 1.0,
        seal_key: SealKey | str | None = None,
        connect_timeout: float = 10.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        client: Client | None = None,
    ) -> None:
        self.host, self.port = parse_http(http)
        if auth:
            if token is None:
                token = secrets.token_urlsafe(32)
                self.token_generated = True
            else:
                self.token_generated = False
            if len(token) < 16 or any(c.isspace() for c in token):
                raise ConfigError("the gateway token must be at least 16 characters, without spaces")
        else:
            token, self.token_generated = None, False
        if not (task_timeout > 0 and math.isfinite(task_timeout)) or not task_ttl >= 0 or max_tasks < 1:
            raise ConfigError("--task-timeout must be positive, --task-ttl at least 0, --max-tasks at least 1")
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        self.token = token
        self.public_url = public_url.rstrip("/") if public_url else None
        self.name = name
        self.description = description
        self.default_skill = default_skill
        self.task_timeout = task_timeout
        self.advertise_zmq = advertise_zmq
        self.rest = rest
        self.card_refresh = card_refresh
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self.store = TTLTaskStore(ttl=task_ttl, max_tasks=max_tasks, stale=task_ttl + task_timeout + 60)
        self._join = join
        self._seal_key = seal_key
        self._connect_timeout = connect_timeout
        self._own_client = client is None
        self.client: Client | None = client
        self._skills: dict[str, dict[str, Any]] | None = None
        self._skills_at = -math.inf
        self._status_lock: asyncio.Lock | None = None
        self._server: Any = None
        self._executor: _Executor | None = None
        self._handler: _Handler | None = None
        self.url = self.public_url or f"{'https' if self.tls else 'http'}://{_url_host(self.host)}:{self.port}"

    # ------------------------------------------------------------------ zlink side

    def connect(self) -> Client:
        """The zlink client (connected on first use: ConnectError/AuthenticationError when it cannot)."""
        if self.client is None:
            self.client = Client(self._join, connect_timeout=self._connect_timeout, seal_key=self._seal_key)
        return self.client

    async def _swarm(self) -> dict[str, dict[str, Any]] | None:
        """The live skills (cached ``card_refresh`` seconds); the last known ones if the broker does not answer."""
        if time.monotonic() - self._skills_at < self.card_refresh:
            return self._skills
        if self._status_lock is None:
            self._status_lock = asyncio.Lock()
        async with self._status_lock:
            if time.monotonic() - self._skills_at < self.card_refresh:
                return self._skills
            client = self.connect()
            try:
                status = await asyncio.get_running_loop().run_in_executor(None, client.status, 5.0)
                self._skills = swarm_skills(status)
            except ZlinkError as exc:
                log.warning("the broker's status did not come (%s): the card keeps the skills it had", exc)
            self._skills_at = time.monotonic()
            return self._skills

    async def _admit(self, params: SendMessageRequest, context: ServerCallContext, *, stream: bool) -> None:
        """Check a message and record its call in the request context; InvalidParamsError says what is wrong."""
        validate_proto_required_fields(params)
        if params.message.task_id:
            if self._executor is not None and self._executor.waiting_for_input(params.message.task_id):
                return  # the answer to the skill's question
            raise InvalidParamsError(
                message="each message runs one new zlink task: send it without a taskId (a contextId groups "
                "tasks), unless the task is input-required (then the message answers its question)"
            )
        try:
            request_meta = struct_dict(params.metadata) if params.HasField("metadata") else None
            skill, args, kwargs, timeout = message_call(params.message, request_meta, default_skill=self.default_skill)
        except ValueError as exc:
            raise InvalidParamsError(message=str(exc)) from None
        live = await self._swarm()
        if skill is None:
            names = _some(live) or "none live"
            raise InvalidParamsError(message=f"name a zlink skill in the message metadata 'skill' ({names})")
        if live is not None and skill not in live:
            names = _some(live) or "none"
            raise InvalidParamsError(message=f"no node offers the skill {skill!r} (live skills: {names})")
        limit = self.task_timeout
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
                raise InvalidParamsError(message="metadata 'timeout' must be a positive number of seconds")
            limit = min(limit, float(timeout))
        context.state[_CALL] = _Call(skill, args, kwargs, limit, stream)

    async def _start(self, call: _Call, on_question: Callable[[Any], Any] | None) -> TaskFuture | TaskStream:
        """Submit a call, waiting for room under the broker's per-client bound without blocking the loop."""
        client = self.connect()
        while not client.has_room():
            await asyncio.get_running_loop().run_in_executor(None, client.wait_room, 1.0)
        if call.stream:  # questions come in the stream
            return client.stream(call.skill, *call.args, timeout=call.timeout, **call.kwargs)
        return client.submit(call.skill, *call.args, timeout=call.timeout, on_question=on_question, **call.kwargs)

    # ------------------------------------------------------------------ A2A side

    async def card(self, _base: AgentCard | None = None) -> AgentCard:
        """The agent card as of now: the skills of the live nodes."""
        skills = await self._swarm()
        zmq_urls = self.client.join.endpoints if self.advertise_zmq and self.client is not None else ()
        return build_card(
            url=self.url, skills=skills or {}, name=self.name, description=self.description,
            auth=self.token is not None, rest=self.rest, zmq_urls=zmq_urls,
        )  # fmt: skip

    def app(self) -> ASGIApp:
        """The ASGI application: the agent card, JSON-RPC at ``/``, HTTP+JSON under ``/rest``."""
        # the SDK wants a complete card up front (one skill at least); every request gets card() instead
        first = build_card(url=self.url, skills={"-": {}}, name=self.name, auth=self.token is not None)
        self._executor = _Executor(self)
        handler = self._handler = _Handler(self, agent_executor=self._executor, task_store=self.store, agent_card=first)
        routes: list[Any] = [
            *create_agent_card_routes(first, card_modifier=self.card, cache_control="no-cache"),
            *create_jsonrpc_routes(handler, rpc_url="/"),
        ]
        if self.rest:
            routes += create_rest_routes(handler, path_prefix="/rest")

        @asynccontextmanager
        async def lifespan(_app: Starlette) -> AsyncIterator[None]:
            sweeper = asyncio.create_task(self._sweep_forever())
            try:
                yield
            finally:
                sweeper.cancel()
                await handler.aclose()  # cancels the tasks still running (their zlink tasks too)

        return _Guard(Starlette(routes=routes, lifespan=lifespan), self.token)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            gone = await self.store.sweep(force=True)
            if gone:
                log.debug("forgot %d finished task(s)", gone)
            await self._close_abandoned()

    async def _close_abandoned(self) -> None:
        """Fail the tasks that waited for input until their zlink task ended (its timeout passed)."""
        if self._executor is None or self._handler is None:
            return
        for task_id in self._executor.parked_and_over():
            try:  # the SDK's cancel path: our executor writes the failure (see _Executor.cancel)
                await self._handler.on_cancel_task(CancelTaskRequest(id=task_id), ServerCallContext())
            except A2AError as exc:
                log.info("task %s: could not close: %s", task_id, type(exc).__name__)

    # ------------------------------------------------------------------ serving

    def bind(self) -> socket.socket:
        """Listen on the HTTP address; ConfigError when it cannot. Fills in :attr:`port` when it was 0."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _name, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = int(sock.getsockname()[1])
        if self.public_url is None:
            self.url = f"{'https' if self.tls else 'http'}://{_url_host(self.host)}:{self.port}"
        return sock

    def run(self, sock: socket.socket | None = None) -> None:
        """Serve until SIGINT/SIGTERM (or :meth:`stop`); the zlink client is closed at the end."""
        import uvicorn

        sock = sock or self.bind()
        try:
            self.connect()
            config = uvicorn.Config(
                self.app(), log_config=None, access_log=False, lifespan="on", server_header=False,
                timeout_graceful_shutdown=3, limit_concurrency=1000,
                ssl_certfile=self.tls[0] if self.tls else None, ssl_keyfile=self.tls[1] if self.tls else None,
            )  # fmt: skip
            self._server = _server_class()(config)
            self._server.run(sockets=[sock])
        finally:
            sock.close()
            self.close()

    def stop(self) -> None:
        """Ask a running :meth:`run` to finish (any thread)."""
        if self._server is not None:
            self._server.should_exit = True

    def close(self) -> None:
        if self._own_client and self.client is not None:
            self.client.close()

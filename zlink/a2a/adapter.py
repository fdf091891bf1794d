"""``zlink node --a2a-agent URL``: a remote A2A agent's skills, served by a zlink node.

:func:`agent_skills` reads the agent's card (a2a-sdk's card resolver) and makes
one ``async def`` zlink skill per skill on it. Each call sends the agent one
message (a2a-sdk's client, over the JSON-RPC or HTTP+JSON binding the card
offers) and returns its answer; cancelling the zlink task cancels the A2A task,
and an agent that asks for input (``input-required``) asks the zlink client
through ``zlink.current_task().ask``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import uuid
from collections.abc import Callable, Generator, Iterable
from typing import Any, Final

import httpx
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    A2AClientTimeoutError,
    AgentCardResolutionError,
    ClientConfig,
    ClientFactory,
)
from a2a.client import Client as A2AClient
from a2a.types import (
    AgentCard,
    Artifact,
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Role,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskState,
)
from a2a.utils.constants import AGENT_CARD_WELL_KNOWN_PATH, TransportProtocol
from a2a.utils.errors import A2AError

from ..errors import ConfigError, ConnectError, TaskError
from ..node import current_task, skill
from ..protocol import MAX_NAME
from ._convert import call_message_fields, parts_value

__all__ = ["RemoteAgentError", "agent_skills", "fetch_card"]

log = logging.getLogger("zlink.a2a")

_STATE_WORDS: Final = {
    TaskState.TASK_STATE_FAILED: "failed",
    TaskState.TASK_STATE_REJECTED: "rejected",
    TaskState.TASK_STATE_CANCELED: "cancelled",
    TaskState.TASK_STATE_AUTH_REQUIRED: "needs authorization zlink cannot give for",
    TaskState.TASK_STATE_INPUT_REQUIRED: "needs input for",
}
_DONE: Final = frozenset(
    {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED,
     TaskState.TASK_STATE_REJECTED}
)  # fmt: skip


class RemoteAgentError(TaskError):
    """The remote A2A agent did not complete the task: it failed, rejected or cancelled it,
    needs something zlink cannot give, or refused the request (``code``: its JSON-RPC error code)."""

    def __init__(self, message: str, *, state: str = "", code: int | None = None, task_id: str | None = None) -> None:
        super().__init__(message, task_id=task_id)
        self.state = state
        self.code = code


# --------------------------------------------------------------------------- the card


def _base_url(url: str) -> str:
    url = url.strip()
    if url.endswith(AGENT_CARD_WELL_KNOWN_PATH):
        url = url[: -len(AGENT_CARD_WELL_KNOWN_PATH)]
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--a2a-agent wants an http(s) URL, got {url!r}")
    return url.rstrip("/")


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host, port


class _Bearer(httpx.Auth):
    """The agent's bearer token, sent only to the origin (scheme, host, port) it was given for."""

    def __init__(self, token: str, url: str) -> None:
        self._header = f"Bearer {token}"
        self._origin = _origin(httpx.URL(url))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request


def _http(url: str, token: str | None, timeout: float, *, answers: bool = False) -> httpx.AsyncClient:
    """An HTTP client for the agent; ``answers``: no read timeout, as an answer takes as long as its
    task (the zlink task's own timeout bounds it)."""
    limits = httpx.Timeout(timeout, read=None) if answers else httpx.Timeout(timeout)
    return httpx.AsyncClient(auth=_Bearer(token, url) if token else None, timeout=limits, follow_redirects=False)


def _run_sync(make: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from sync code, even when the caller is inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with cf.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def fetch_card(url: str, *, token: str | None = None, timeout: float = 10.0) -> AgentCard:
    """The agent card at ``url`` (the agent's base URL, or its card's URL).

    Raises :class:`~zlink.ConnectError` when the agent cannot be reached and
    :class:`~zlink.ConfigError` when it refuses the token or serves no valid card.
    """
    base = _base_url(url)

    async def fetch() -> AgentCard:
        async with _http(base, token, timeout) as http:
            return await A2ACardResolver(http, base).get_agent_card()

    try:
        card: AgentCard = _run_sync(fetch)
    except AgentCardResolutionError as exc:
        status = exc.status_code
        if status in (401, 403):
            raise ConfigError(f"the A2A agent at {base} refused the token (HTTP {status}): check --a2a-token") from None
        if status is not None and status < 500:
            raise ConfigError(f"no A2A agent card at {base}{AGENT_CARD_WELL_KNOWN_PATH} (HTTP {status})") from None
        if status is not None or isinstance(exc.__cause__, httpx.RequestError):
            raise ConnectError(f"cannot read the A2A agent card at {base}: {exc.message}") from None
        raise ConfigError(f"{base} does not serve a valid A2A agent card: {exc.message}") from None
    except httpx.HTTPError as exc:
        raise ConnectError(f"cannot reach the A2A agent at {base}: {exc}") from None
    return card


# --------------------------------------------------------------------------- calling the agent


class _Answer:
    """What the agent said so far about one message: the task (as streamed) or a direct message."""

    __slots__ = ("message", "task")

    def __init__(self) -> None:
        self.task = Task()
        self.message: Message | None = None

    def take(self, event: StreamResponse) -> None:
        kind = event.WhichOneof("payload")
        if kind == "task":
            self.task.CopyFrom(event.task)
        elif kind == "status_update":
            update = event.status_update
            self.task.id = self.task.id or update.task_id
            self.task.context_id = self.task.context_id or update.context_id
            self.task.status.CopyFrom(update.status)
        elif kind == "artifact_update":
            self._artifact(event.artifact_update.artifact, event.artifact_update.append)
        elif kind == "message":
            self.message = event.message

    def _artifact(self, artifact: Artifact, append: bool) -> None:
        for existing in self.task.artifacts:
            if existing.artifact_id == artifact.artifact_id:
                if append:
                    existing.parts.extend(artifact.parts)
                else:
                    existing.CopyFrom(artifact)
                return
        self.task.artifacts.append(artifact)

    @property
    def state(self) -> int:
        return int(self.task.status.state)

    def status_text(self) -> str:
        parts = self.task.status.message.parts
        text = " ".join(p.text for p in parts if p.WhichOneof("content") == "text")
        return text or "(no message)"

    def result(self, url: str) -> Any:
        """The answer's value; RemoteAgentError when the agent did not complete the task."""
        if self.message is not None:
            return parts_value(self.message.parts)
        state = self.state
        if state == TaskState.TASK_STATE_COMPLETED:
            artifacts = list(self.task.artifacts)
            # a zlink gateway's answer: the artifact "result" (next to "partials")
            chosen = [a for a in artifacts if a.name == "result"] or artifacts
            parts = [p for a in chosen for p in a.parts]
            if not parts:
                parts = list(self.task.status.message.parts)
            return parts_value(parts) if parts else None
        word = _STATE_WORDS.get(TaskState.ValueType(state), f"left in state {TaskState.Name(state)}")
        raise RemoteAgentError(
            f"the A2A agent at {url} {word} the task: {self.status_text()}",
            state=TaskState.Name(state),
            task_id=self.task.id or None,
        )


def _mapped(exc: Exception, url: str) -> Exception:
    """An a2a-sdk or httpx error as a zlink error."""
    if isinstance(exc, A2AClientTimeoutError):
        return ConnectError(f"the A2A agent at {url} did not answer in time")
    if isinstance(exc, A2AClientError):
        cause = exc.__cause__
        if isinstance(cause, httpx.HTTPStatusError):
            status = cause.response.status_code
            return RemoteAgentError(f"the A2A agent at {url} answered HTTP {status}", state="", code=status)
        if isinstance(cause, httpx.RequestError) or "Network communication error" in str(exc):
            return ConnectError(f"cannot reach the A2A agent at {url}: {cause or exc}")
        return RemoteAgentError(f"the A2A agent at {url}: {exc}")
    if isinstance(exc, A2AError):
        from a2a.utils.errors import JSON_RPC_ERROR_CODE_MAP

        code = JSON_RPC_ERROR_CODE_MAP.get(type(exc))
        return RemoteAgentError(f"the A2A agent at {url} refused the request: {exc.message}", code=code)
    if isinstance(exc, httpx.HTTPError):
        return ConnectError(f"cannot reach the A2A agent at {url}: {exc}")
    return exc


class RemoteAgent:
    """One A2A agent, called from a node's event loop (one a2a-sdk client per loop)."""

    def __init__(self, url: str, card: AgentCard, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = _base_url(url)
        self.card = card
        self._token = token
        self._timeout = timeout
        self._clients: dict[asyncio.AbstractEventLoop, A2AClient] = {}

    def _new_client(self, *, answers: bool = True) -> tuple[A2AClient, httpx.AsyncClient]:
        http = _http(self.url, self._token, self._timeout, answers=answers)
        config = ClientConfig(
            streaming=self.card.capabilities.streaming,
            httpx_client=http,
            supported_protocol_bindings=[TransportProtocol.JSONRPC, TransportProtocol.HTTP_JSON],
        )
        try:
            return ClientFactory(config).create(self.card), http
        except ValueError as exc:
            raise ConfigError(f"the A2A agent at {self.url} offers no binding zlink speaks: {exc}") from None

    def _client(self) -> A2AClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._new_client()[0]
        return client

    async def check(self) -> None:
        """Ask the agent about a task that does not exist: any answer but HTTP 401/403 means it takes our token.

        Agent cards are public, so reading one proves nothing about the token;
        this catches a wrong ``--a2a-token`` when the node starts, not at its
        first task. ConfigError when refused, ConnectError when unreachable.
        """
        client, http = self._new_client(answers=False)
        try:
            await client.get_task(GetTaskRequest(id=f"zlink-token-check-{uuid.uuid4().hex}"))
        except (A2AError, httpx.HTTPError) as exc:
            mapped = _mapped(exc, self.url)
            if isinstance(mapped, RemoteAgentError) and mapped.code in (401, 403):
                raise ConfigError(
                    f"the A2A agent at {self.url} refused the token (HTTP {mapped.code}): check --a2a-token"
                ) from None
            if isinstance(mapped, ConnectError):
                raise mapped from None
        finally:
            await http.aclose()

    async def call(self, skill_id: str, args: Iterable[Any], kwargs: dict[str, Any]) -> Any:
        """Send the agent one message calling ``skill_id``; its answer's value (see docs/a2a.md)."""
        parts, meta = call_message_fields(list(args), kwargs)
        meta["skill"] = skill_id
        message = Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=parts, metadata=meta)
        client = self._client()
        answer = _Answer()
        try:
            while True:
                async for event in client.send_message(SendMessageRequest(message=message)):
                    answer.take(event)
                if answer.message is not None or answer.state != TaskState.TASK_STATE_INPUT_REQUIRED:
                    break
                # the agent asks a question: the zlink client that submitted the task answers it
                asked = answer.task.status.message.parts
                reply = await current_task().ask(parts_value(asked) if asked else "the agent needs input")
                parts, _ = call_message_fields([reply], {})
                message = Message(
                    role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=parts,
                    task_id=answer.task.id, context_id=answer.task.context_id,
                )  # fmt: skip
        except asyncio.CancelledError:
            if answer.task.id and answer.state not in _DONE:
                await asyncio.shield(self._cancel(client, answer.task.id))
            raise
        except (A2AError, httpx.HTTPError) as exc:
            raise _mapped(exc, self.url) from None
        return answer.result(self.url)

    async def _cancel(self, client: A2AClient, task_id: str) -> None:
        """Best effort: tell the agent to cancel a task whose zlink task was cancelled."""
        try:
            await asyncio.wait_for(client.cancel_task(CancelTaskRequest(id=task_id)), self._timeout)
            log.info("cancelled A2A task %s at %s", task_id, self.url)
        except (A2AError, httpx.HTTPError, asyncio.TimeoutError) as exc:
            log.warning("could not cancel A2A task %s at %s: %s", task_id, self.url, type(exc).__name__)


def agent_skills(
    url: str, *, token: str | None = None, timeout: float = 10.0, prefix: str = ""
) -> list[Callable[..., Any]]:
    """One zlink skill per skill on the A2A agent's card, for ``Node.add_skills``.

    ::

        node = zlink.Node(join, slots=8)
        node.add_skills(zlink.a2a.agent_skills("http://127.0.0.1:9999", token=...))

    A skill's name is ``prefix`` + the A2A skill id; its description, tags,
    examples and modes come from the card. ``timeout`` bounds connecting (an
    answer takes as long as the task). Raises :class:`~zlink.ConnectError` or
    :class:`~zlink.ConfigError` (see :func:`fetch_card`).
    """
    card = fetch_card(url, token=token, timeout=timeout)
    agent = RemoteAgent(url, card, token=token, timeout=timeout)
    _run_sync(agent.check)
    if not card.skills:
        raise ConfigError(f"the A2A agent at {agent.url} lists no skills on its card")
    out: dict[str, Callable[..., Any]] = {}
    for s in card.skills:
        name = prefix + s.id
        if not s.id or len(name) > MAX_NAME:
            raise ConfigError(f"the A2A agent at {agent.url} has a skill id zlink cannot use: {name!r}")
        out[name] = _forwarder(agent, s.id, name, card, s)
    return list(out.values())


def _forwarder(agent: RemoteAgent, skill_id: str, name: str, card: AgentCard, s: Any) -> Callable[..., Any]:
    async def forward(*args: Any, **kwargs: Any) -> Any:
        return await agent.call(skill_id, args, kwargs)

    forward.__name__ = forward.__qualname__ = "a2a_" + "".join(c if c.isalnum() else "_" for c in skill_id)
    forward.__doc__ = s.description or f"The skill {skill_id!r} of the A2A agent {card.name!r} at {agent.url}"
    marked: Callable[..., Any] = skill(
        name,
        description=forward.__doc__,
        tags=[*_bounded(s.tags, 31, 100), "a2a"],
        examples=_bounded(s.examples, 32, 1000),
        input_modes=_bounded(s.input_modes or card.default_input_modes, 32, 100),
        output_modes=_bounded(s.output_modes or card.default_output_modes, 32, 100),
    )(forward)
    return marked


def _bounded(values: Iterable[str], count: int, size: int) -> list[str]:
    """The card's strings that fit zlink's skill metadata (a card is another party's data)."""
    return [v for v in values if v and len(v) <= size][:count]

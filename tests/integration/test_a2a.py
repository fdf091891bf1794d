"""A2A in both directions, end to end, with a2a-sdk's own client and server.

- Gateway: a CLI broker, a CLI node serving skills_a2a.py and a CLI ``zlink
  gateway``; the a2a-sdk client resolves the card, sends and streams messages,
  gets, lists and cancels tasks, as any A2A client would.
- Adapter: an A2A agent built with a2a-sdk in this test process (uvicorn on a
  thread) joins the swarm through ``zlink node --a2a-agent`` and is called
  from a zlink client.

Everything listens on 127.0.0.1 on ports chosen at run time; every process and
server is stopped at the end of its fixture.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("a2a.server.routes", reason="needs a2a-sdk: pip install -e '.[a2a]'")
pytest.importorskip("uvicorn", reason="needs uvicorn: pip install -e '.[a2a]'")

import httpx
import uvicorn
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    AuthInterceptor,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
    CredentialService,
)
from a2a.client import Client as A2AClient
from a2a.helpers import get_data_parts
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    CancelTaskRequest,
    GetTaskRequest,
    InvalidParamsError,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskNotCancelableError,
    TaskState,
    TaskStatus,
)
from a2a.utils.constants import TransportProtocol
from starlette.applications import Starlette

import zlink
from zlink.a2a import BINDING_URI
from zlink.demo import LocalSwarm

from .conftest import REPO, free_port, wait_for

SKILLS = Path(__file__).resolve().with_name("skills_a2a.py")
BASIC = Path(__file__).resolve().with_name("skills_basic.py")
TOKEN = "gw-" + uuid.uuid4().hex  # the gateway's bearer token
SECRET = "payload-" + uuid.uuid4().hex  # a payload that must never reach a log line
TIMED_OUT = re.compile("timed out|timeout")  # the client's words or the broker's, whichever comes first


@pytest.fixture(scope="module", autouse=True)
def _forget_zlink_a2a_attribute() -> Iterator[None]:
    """Importing zlink.a2a sets the attribute ``zlink.a2a``; tests/unit/test_api.py checks zlink's public
    attributes against a list of submodules that does not name a2a yet, and fails after this module ran."""
    yield
    vars(zlink).pop("a2a", None)


# --------------------------------------------------------------------------- the gateway side


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    sw = LocalSwarm(home=tmp_path_factory.mktemp("a2a") / "home")
    try:
        sw.start_broker()
        sw.start_node(str(SKILLS), slots=4, name="a2a-node")
        with zlink.Client(sw.invite("client", "a2a-probe"), connect_timeout=15) as probe:
            sw.wait_nodes(probe, 1, timeout=30)
        yield sw
    finally:
        sw.close()


@pytest.fixture(scope="module")
def client(swarm: LocalSwarm) -> Iterator[zlink.Client]:
    with zlink.Client(swarm.invite("client", "a2a-zclient"), connect_timeout=15) as c:
        yield c


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZLINK_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the process serving {url} exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not answer within {timeout:g} s")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the process did not stop within 10 s of SIGTERM")
    return proc.returncode


@pytest.fixture(scope="module")
def gateway(swarm: LocalSwarm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = _env(ZLINK_JOIN=swarm.invite("client", "a2a-gateway"), ZLINK_GATEWAY_TOKEN=TOKEN)
    with open(log, "wb") as err:  # debug logs: the zero-log test reads them
        proc = subprocess.Popen(
            [sys.executable, "-m", "zlink", "gateway", "--http", f"127.0.0.1:{port}", "--log-level", "debug",
             "--task-ttl", "30"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    gw = Gateway(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_http(gw.url + "/.well-known/agent-card.json", proc)
        yield gw
    finally:
        code = _stop(proc)
    assert code == 0, f"the gateway exited with {code} on SIGTERM:\n{log.read_text()[-3000:]}"


class Token(CredentialService):
    """What an A2A client does with a bearer scheme on the card: hand its token to AuthInterceptor."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(self, security_scheme_name: str, context: ClientCallContext | None) -> str | None:
        return self.token


@asynccontextmanager
async def a2a_client(
    url: str, *, token: str | None = TOKEN, streaming: bool = True, bindings: list[str] | None = None
) -> AsyncIterator[tuple[A2AClient, AgentCard]]:
    """Resolve the card, then a client over the card's preferred binding, authenticated as the card says."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        card = await A2ACardResolver(http, url).get_agent_card()
        config = ClientConfig(httpx_client=http, streaming=streaming, supported_protocol_bindings=bindings or [])
        interceptors = [AuthInterceptor(Token(token))] if token else []
        client = ClientFactory(config).create(card, interceptors=interceptors)
        try:
            yield client, card
        finally:
            await client.close()


def message(*parts: Part, **metadata: Any) -> SendMessageRequest:
    msg = Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=list(parts), metadata=metadata)
    return SendMessageRequest(message=msg)


def text(value: str) -> Part:
    return Part(text=value)


def data(value: Any) -> Part:
    from a2a.helpers import new_data_part

    return new_data_part(value)


async def send(client: A2AClient, request: SendMessageRequest) -> Task:
    """SendMessage (a non-streaming client): the one Task it answers with."""
    events = [e async for e in client.send_message(request)]
    assert len(events) == 1 and events[0].HasField("task"), events
    return events[0].task


def result_value(task: Task) -> Any:
    [artifact] = [a for a in task.artifacts if a.name == "result"]
    [part] = artifact.parts
    kind = part.WhichOneof("content")
    return get_data_parts([part])[0] if kind == "data" else getattr(part, kind)


def status_text(task: Task) -> str:
    return " ".join(p.text for p in task.status.message.parts)


def card_skills(url: str) -> dict[str, Any]:
    card = httpx.get(url + "/.well-known/agent-card.json", timeout=5).json()
    return {s["id"]: s for s in card.get("skills", [])}


def rpc(url: str, body: Any, *, token: str | None = TOKEN, raw: bytes | None = None) -> httpx.Response:
    headers = {"A2A-Version": "1.0", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + "/", content=content, headers=headers, timeout=10)


# --------------------------------------------------------------------------- the gateway: card and auth


@pytest.mark.timeout(60)
def test_card_lists_live_skills_and_follows_nodes(swarm: LocalSwarm, client: zlink.Client, gateway: Gateway) -> None:
    async def resolve() -> AgentCard:
        async with httpx.AsyncClient() as http:  # the card is public: no token
            return await A2ACardResolver(http, gateway.url).get_agent_card()

    card = asyncio.run(resolve())
    skills = {s.id: s for s in card.skills}
    assert {"greet", "echo", "add", "count_up", "nap", "fail"} <= set(skills)
    assert all(s.description and s.tags for s in card.skills)  # the fields the card requires
    assert card.capabilities.streaming and not card.capabilities.push_notifications
    bindings = {i.protocol_binding: i.url for i in card.supported_interfaces}
    assert bindings[TransportProtocol.JSONRPC] == gateway.url + "/"
    assert bindings[TransportProtocol.HTTP_JSON] == gateway.url + "/rest"
    assert bindings[BINDING_URI] == swarm.endpoint  # zlink's own binding: the broker
    assert card.supported_interfaces[0].protocol_binding == TransportProtocol.JSONRPC  # preferred first
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert [list(r.schemes) for r in card.security_requirements] == [["bearer"]]

    # a node joins with more skills: the card lists them; it leaves: they go
    proc = swarm.start_node(str(BASIC), slots=1, name="a2a-extra")
    try:
        wait_for(lambda: "square" in card_skills(gateway.url), timeout=20, what="square on the card")
    finally:
        proc.terminate()
        proc.wait(10)
    wait_for(lambda: "square" not in card_skills(gateway.url), timeout=20, what="square to leave the card")


@pytest.mark.timeout(30)
def test_card_carries_the_metadata_nodes_announce(gateway: Gateway) -> None:
    greet = card_skills(gateway.url)["greet"]
    assert greet["description"] == "Say hello to someone."
    assert greet["tags"] == ["text", "demo"] and greet["examples"] == ["Ada"]
    assert greet["inputModes"] == ["text/plain"] and greet["outputModes"] == ["text/plain"]


@pytest.mark.timeout(30)
def test_every_call_but_the_card_needs_the_token(gateway: Gateway) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": {}}
    for token in (None, "wrong-" + TOKEN):
        r = rpc(gateway.url, body, token=token)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(gateway.url + "/rest/tasks", timeout=5).status_code == 401
    assert rpc(gateway.url, body).status_code == 200

    async def without_token() -> None:
        async with a2a_client(gateway.url, token=None, streaming=False) as (c, _card):
            await send(c, message(text("Ada"), skill="greet"))

    with pytest.raises(A2AClientError, match="401"):
        asyncio.run(without_token())


# --------------------------------------------------------------------------- the gateway: tasks


@pytest.mark.timeout(30)
def test_send_message_runs_a_zlink_task(gateway: Gateway) -> None:
    async def main() -> None:
        async with a2a_client(gateway.url, streaming=False) as (c, _card):
            task = await send(c, message(text("Ada"), skill="greet", kwargs={"punctuation": "?"}))
            assert task.status.state == TaskState.TASK_STATE_COMPLETED
            assert result_value(task) == "hello, Ada?"
            assert task.metadata["skill"] == "greet" and len(task.metadata["zlink_task_id"]) == 32
            assert task.history[0].parts[0].text == "Ada"
            # data parts are JSON; whole numbers come back as ints on the zlink side
            task = await send(c, message(data(2), data(40), skill="add"))
            assert result_value(task) == 42
            value = {"list": [1, 2.5, None, True], "blob": {"$bytes": "AP8="}, "text": "ünï"}
            task = await send(c, message(data(value), skill="echo"))
            assert result_value(task) == value  # bytes went to the skill as bytes, and back as $bytes
            # metadata 'args' replaces the parts (a client that must send text)
            task = await send(c, message(text("ignored"), skill="add", args=["ab", "cd"]))
            assert result_value(task) == "abcd"

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_streaming_message_relays_partial_results(gateway: Gateway) -> None:
    async def main() -> list[tuple[float, StreamResponse]]:
        async with a2a_client(gateway.url, streaming=True) as (c, _card):
            t0 = time.monotonic()
            request = message(data(4), data(0.2), skill="count_up")
            return [(time.monotonic() - t0, e) async for e in c.send_message(request)]

    events = asyncio.run(main())
    kinds = [e.WhichOneof("payload") for _t, e in events]
    assert kinds[0] == "task" and events[0][1].task.status.state == TaskState.TASK_STATE_SUBMITTED
    states = [e.status_update.status.state for _t, e in events if e.HasField("status_update")]
    assert states == [TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_COMPLETED]
    updates = [(t, e.artifact_update) for t, e in events if e.HasField("artifact_update")]
    partials = [(t, u) for t, u in updates if u.artifact.name == "partials"]
    assert [get_data_parts(u.artifact.parts)[0] for _t, u in partials] == [0, 1, 2, 3]
    assert [u.append for _t, u in partials] == [False, True, True, True]
    assert partials[0][0] < events[-1][0] - 0.4  # the first partial came while the task ran, not at its end
    [result] = [u for _t, u in updates if u.artifact.name == "result"]
    assert result.artifact.parts[0].text == "counted to 4" and result.last_chunk


@pytest.mark.timeout(40)
def test_get_list_and_cancel_a_task(gateway: Gateway, client: zlink.Client) -> None:
    def busy() -> int:
        return sum(n["busy"] for n in client.status()["nodes"])

    async def main() -> None:
        async with a2a_client(gateway.url, streaming=False) as (c, _card):
            request = message(data(30), skill="nap")
            request.configuration.CopyFrom(SendMessageConfiguration(return_immediately=True))
            task = await send(c, request)
            assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)
            await asyncio.to_thread(wait_for, lambda: busy() >= 1, 10, 0.05, "nap to run on the node")
            got = await c.get_task(GetTaskRequest(id=task.id))
            assert got.status.state == TaskState.TASK_STATE_WORKING and got.metadata["skill"] == "nap"
            listed = await c.list_tasks(ListTasksRequest(status=TaskState.TASK_STATE_WORKING))
            assert task.id in [t.id for t in listed.tasks]
            cancelled = await c.cancel_task(CancelTaskRequest(id=task.id))
            assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
            # the zlink task was cancelled too: the node's slot is free long before 30 s
            await asyncio.to_thread(wait_for, lambda: busy() == 0, 10, 0.05, "nap to leave the node")
            got = await c.get_task(GetTaskRequest(id=task.id))
            assert got.status.state == TaskState.TASK_STATE_CANCELED
            with pytest.raises(TaskNotCancelableError):  # -32002: a finished task
                await c.cancel_task(CancelTaskRequest(id=task.id))
            everything = await c.list_tasks(ListTasksRequest())
            assert everything.total_size >= 1 and task.id in [t.id for t in everything.tasks]

    asyncio.run(main())


@pytest.mark.timeout(40)
def test_a_skills_question_makes_the_task_input_required(gateway: Gateway) -> None:
    def answer(task: Task, value: Any) -> SendMessageRequest:
        request = message(data(value))
        request.message.task_id, request.message.context_id = task.id, task.context_id
        return request

    async def main() -> None:
        async with a2a_client(gateway.url, streaming=False) as (c, _card):
            task = await send(c, message(text("Lisbon"), skill="plan"))
            assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            assert status_text(task) == "how many days?"
            task = await send(c, answer(task, 4))
            assert task.status.state == TaskState.TASK_STATE_COMPLETED and result_value(task) == "4 days in Lisbon"
            # a message to a task that waits for nothing is refused
            with pytest.raises(InvalidParamsError):
                await send(c, answer(task, 5))
            # nobody answers: the task's timeout passes and the gateway fails it
            task = await send(c, message(text("Oslo"), skill="plan", timeout=1))
            assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            for _ in range(100):
                got = await c.get_task(GetTaskRequest(id=task.id))
                if got.status.state != TaskState.TASK_STATE_INPUT_REQUIRED:
                    break
                await asyncio.sleep(0.1)
            assert got.status.state == TaskState.TASK_STATE_FAILED and TIMED_OUT.search(status_text(got))
        async with a2a_client(gateway.url, streaming=True) as (c, _card):  # the same over SSE
            events = [e async for e in c.send_message(message(text("Rome"), skill="plan"))]
            last = events[-1].status_update
            assert last.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            task = Task(id=last.task_id, context_id=last.context_id)
            events = [e async for e in c.send_message(answer(task, 2))]
            assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
            [result] = [e.artifact_update for e in events if e.HasField("artifact_update")]
            assert result.artifact.parts[0].text == "2 days in Rome"

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_failures_become_failed_tasks(gateway: Gateway) -> None:
    async def main() -> None:
        async with a2a_client(gateway.url, streaming=False) as (c, _card):
            task = await send(c, message(text(SECRET), skill="fail"))
            assert task.status.state == TaskState.TASK_STATE_FAILED
            assert status_text(task) == f"ValueError: {SECRET}"
            task = await send(c, message(data(30), skill="nap", timeout=0.5))
            assert task.status.state == TaskState.TASK_STATE_FAILED and TIMED_OUT.search(status_text(task))

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_http_json_binding(gateway: Gateway) -> None:
    async def main() -> None:
        async with a2a_client(gateway.url, streaming=False, bindings=[TransportProtocol.HTTP_JSON]) as (c, _card):
            task = await send(c, message(text("REST"), skill="greet"))
            assert result_value(task) == "hello, REST!"
            assert (await c.get_task(GetTaskRequest(id=task.id))).status.state == TaskState.TASK_STATE_COMPLETED

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_bad_requests_get_json_rpc_errors_and_the_gateway_stays_up(gateway: Gateway) -> None:
    def send_body(**metadata: Any) -> dict[str, Any]:
        msg = {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}], "metadata": metadata}
        return {"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": {"message": msg}}

    def error(r: httpx.Response) -> dict[str, Any]:
        assert r.status_code == 200, r.text
        err: dict[str, Any] = r.json()["error"]
        return err

    assert error(rpc(gateway.url, None, raw=b"{not json"))["code"] == -32700
    assert error(rpc(gateway.url, {"jsonrpc": "2.0", "id": 1, "method": "Nope", "params": {}}))["code"] == -32601
    assert error(rpc(gateway.url, [1, 2]))["code"] == -32600
    bad_params = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": 5}}
    assert error(rpc(gateway.url, bad_params))["code"] == -32602
    err = error(rpc(gateway.url, send_body()))
    assert err["code"] == -32602 and "name a zlink skill" in err["message"] and "greet" in err["message"]
    err = error(rpc(gateway.url, send_body(skill="no_such_skill")))
    assert err["code"] == -32602 and "no node offers the skill 'no_such_skill'" in err["message"]
    err = error(rpc(gateway.url, send_body(skill="echo", kwargs={"timeout": 1})))
    assert err["code"] == -32602 and "timeout" in err["message"]
    for meta in ({"skill": "echo", "args": "x"}, {"skill": "echo", "kwargs": [1]}, {"skill": 5},
                 {"skill": "echo", "timeout": -1}):  # fmt: skip
        assert error(rpc(gateway.url, send_body(**meta)))["code"] == -32602, meta
    continuing = send_body(skill="echo")
    continuing["params"]["message"]["taskId"] = "some-task"
    assert error(rpc(gateway.url, continuing))["code"] == -32602
    r = rpc(gateway.url, None, raw=b"x" * (33 * 1024 * 1024))
    assert r.status_code == 413
    missing = {"jsonrpc": "2.0", "id": 3, "method": "GetTask", "params": {"id": "nope"}}
    assert error(rpc(gateway.url, missing))["code"] == -32001
    # and it still works
    ok = rpc(gateway.url, send_body(skill="echo")).json()
    assert ok["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    assert gateway.proc.poll() is None


@pytest.mark.timeout(30)
def test_gateway_logs_hold_no_payload(gateway: Gateway) -> None:
    # after the tasks above (one of them failed with SECRET as its message), at --log-level debug
    async def main() -> None:
        async with a2a_client(gateway.url, streaming=True) as (c, _card):
            [_ async for _ in c.send_message(message(text(SECRET), skill="echo"))]

    asyncio.run(main())
    logged = gateway.log.read_text()
    assert "zlink.a2a" in logged  # it does log: ids, skill names
    assert SECRET not in logged
    assert TOKEN not in logged


# --------------------------------------------------------------------------- the adapter: an A2A agent in the swarm

AGENT_TOKEN = "agent-" + uuid.uuid4().hex


class EchoingAgent(AgentExecutor):
    """An A2A agent written with a2a-sdk and nothing else: three skills, chosen by the metadata 'skill'."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id and context.message is not None
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        text = context.get_user_input()
        if context.current_task is not None:  # the answer to our question (ask_name)
            await updater.add_artifact([Part(text=f"nice to meet you, {text}")], artifact_id="answer")
            await updater.complete()
            return
        status = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
        task = Task(id=context.task_id, context_id=context.context_id, status=status, history=[context.message])
        await event_queue.enqueue_event(task)
        named = context.message.metadata.fields.get("skill")  # metadata is a protobuf Struct
        skill = named.string_value if named is not None else ""
        if skill == "reverse" and not text:
            await updater.failed(updater.new_agent_message([Part(text="nothing to reverse")]))
        elif skill == "reverse":
            await updater.add_artifact([Part(text=text[::-1])], artifact_id="reversed")
            await updater.complete()
        elif skill == "ask_name":
            await updater.requires_input(updater.new_agent_message([Part(text="what is your name?")]))
        elif skill == "stall":
            await updater.start_work()
            await asyncio.sleep(60)
        else:
            await updater.failed(updater.new_agent_message([Part(text=f"no skill {skill!r}")]))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.cancelled.append(context.task_id or "")
        await TaskUpdater(event_queue, context.task_id or "", context.context_id or "").cancel()


class Agent:
    def __init__(self, url: str, executor: EchoingAgent) -> None:
        self.url = url
        self.executor = executor


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    executor = EchoingAgent()
    skills = [
        AgentSkill(id="reverse", name="Reverse", description="Reverses text.", tags=["text"], examples=["abc"]),
        AgentSkill(id="ask_name", name="Ask name", description="Asks your name, then greets you.", tags=["chat"]),
        AgentSkill(id="stall", name="Stall", description="Works for a minute.", tags=["slow"]),
    ]
    card = AgentCard(
        name="test agent", description="An A2A agent built with a2a-sdk for this test.", version="1.0",
        supported_interfaces=[AgentInterface(url=url + "/", protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True), skills=skills,
        default_input_modes=["text/plain"], default_output_modes=["text/plain"],
    )  # fmt: skip
    handler = DefaultRequestHandler(agent_executor=executor, task_store=InMemoryTaskStore(), agent_card=card)
    inner = Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")])

    async def app(scope: Any, receive: Any, send: Any) -> None:  # a bearer token, as real agents ask
        is_card = scope["type"] != "http" or scope["path"] == "/.well-known/agent-card.json"
        if not is_card and dict(scope["headers"]).get(b"authorization") != f"Bearer {AGENT_TOKEN}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await inner(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-a2a-agent", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what="the test agent to start")
        yield Agent(url, executor)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def adapter_node(swarm: LocalSwarm, client: zlink.Client, agent: Agent) -> Iterator[subprocess.Popen[bytes]]:
    proc = swarm._spawn(
        ["node", "--a2a-agent", agent.url, "--slots", "4", "--log-level", "warning"],
        env={"ZLINK_JOIN": swarm.invite("node", "a2a-adapter"), "ZLINK_A2A_TOKEN": AGENT_TOKEN},
    )
    try:
        wait_for(lambda: any(n["name"] == "a2a-adapter" for n in client.status()["nodes"]), timeout=20,
                 what="the adapter node to join")  # fmt: skip
        yield proc
    finally:
        code = _stop(proc)
        swarm.procs.remove(proc)
        assert code == 0


@pytest.mark.timeout(30)
def test_a2a_agent_joins_the_swarm_and_answers_zlink_clients(
    client: zlink.Client, adapter_node: subprocess.Popen[bytes], gateway: Gateway
) -> None:
    [node] = [n for n in client.status()["nodes"] if n["name"] == "a2a-adapter"]
    assert node["skills"] == ["ask_name", "reverse", "stall"]
    assert client.submit("reverse", "stressed").result(timeout=20) == "desserts"
    futures = [client.submit("reverse", f"item {k}") for k in range(20)]  # four slots, concurrent calls
    assert [f.result(timeout=20) for f in futures] == [f"item {k}"[::-1] for k in range(20)]
    # the agent asks a question (input-required): the zlink client answers it
    fut = client.submit("ask_name", "hi", on_question=lambda q: "Ada" if q == "what is your name?" else "?")
    assert fut.result(timeout=20) == "nice to meet you, Ada"
    # and the gateway lists the agent's skills too: an A2A agent reached through the swarm
    wait_for(lambda: "reverse" in card_skills(gateway.url), timeout=10, what="reverse on the gateway's card")


@pytest.mark.timeout(30)
def test_cancelling_the_zlink_task_cancels_the_a2a_task(
    client: zlink.Client, adapter_node: subprocess.Popen[bytes], agent: Agent
) -> None:
    before = len(agent.executor.cancelled)
    fut = client.submit("stall")
    time.sleep(0.5)  # it reached the agent
    assert fut.cancel()
    wait_for(lambda: len(agent.executor.cancelled) > before, timeout=10, what="the agent to hear the cancel")
    with pytest.raises(zlink.TaskTimeout):  # and a timeout cancels it the same way
        client.submit("stall", timeout=0.5).result(timeout=10)
    wait_for(lambda: len(agent.executor.cancelled) > before + 1, timeout=10, what="the second cancel")


@pytest.mark.timeout(30)
def test_adapter_failures_are_zlink_errors(
    swarm: LocalSwarm, client: zlink.Client, agent: Agent, adapter_node: subprocess.Popen[bytes]
) -> None:
    # the agent fails the task: a RemoteError naming the adapter's error type, with the agent's words
    with pytest.raises(zlink.RemoteError) as info:
        client.submit("reverse", "").result(timeout=20)
    assert info.value.remote_type == "zlink.a2a.adapter.RemoteAgentError"
    assert "failed the task: nothing to reverse" in info.value.remote_message
    # a wrong token: the node refuses to start, with a clear message and exit code 2
    r = subprocess.run(
        [sys.executable, "-m", "zlink", "node", "--a2a-agent", agent.url, "--a2a-token", "wrong-token"],
        env=_env(ZLINK_JOIN=swarm.invite("node", "a2a-bad-token")), capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "refused the token" in r.stderr and "--a2a-token" in r.stderr
    # nobody there: exit code 3 (cannot connect)
    r = subprocess.run(
        [sys.executable, "-m", "zlink", "node", "--a2a-agent", f"http://127.0.0.1:{free_port()}"],
        env=_env(ZLINK_JOIN=swarm.invite("node", "a2a-nobody")), capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert "cannot" in r.stderr

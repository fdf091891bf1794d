"""The A2A gateway and adapter in pieces: value conversion, the card, the task store, the
HTTP guard, the executor against a stand-in zlink client, log scrubbing, error mapping."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("a2a.server.routes", reason="needs a2a-sdk: pip install -e '.[a2a]'")
pytest.importorskip("uvicorn", reason="needs uvicorn: pip install -e '.[a2a]'")

from a2a.helpers import new_data_part
from a2a.server.context import ServerCallContext
from a2a.types import (
    Artifact,
    ListTasksRequest,
    Message,
    Part,
    Role,
    StreamResponse,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import TaskNotFoundError
from a2a.utils.proto_utils import validate_proto_required_fields

with warnings.catch_warnings():  # starlette asks for httpx2; httpx is what a2a-sdk uses
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

import zlink
from zlink import ConfigError, ConnectError
from zlink.a2a import BINDING_URI, require_sdk
from zlink.a2a._convert import (
    call_message_fields,
    from_json,
    message_call,
    part_value,
    parts_value,
    scrub_logs,
    to_json,
    value_parts,
)
from zlink.a2a.adapter import RemoteAgentError, _Answer, _mapped, fetch_card
from zlink.a2a.gateway import Gateway, TTLTaskStore, build_card, parse_http, swarm_skills

TOKEN = "unit-test-token-0123456789"


@pytest.fixture(scope="module", autouse=True)
def _forget_zlink_a2a_attribute() -> Iterator[None]:
    """Importing zlink.a2a sets the attribute ``zlink.a2a``; tests/unit/test_api.py checks zlink's public
    attributes against a list of submodules that does not name a2a yet, and fails after this module ran."""
    yield
    vars(zlink).pop("a2a", None)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -7, 2**53, 1.5, "ünï", b"\x00\xff", [1, [2, None]], {"a": {"b": [b"x", 2.25]}}, [], {}],
)
def test_values_survive_a_part(value: Any) -> None:
    [part] = value_parts(value)
    assert part_value(part) == value
    assert type(part_value(part)) is type(value)


def test_json_edges() -> None:
    assert to_json(2**60) == str(2**60)  # beyond a double's exact integers: its decimal text
    assert to_json(float("nan")) == "nan" and to_json(-math.inf) == "-inf"
    assert to_json({1: "a", b"k": 2}) == {"1": "a", "b'k'": 2}
    assert to_json((1, 2)) == [1, 2]
    assert from_json(7.0) == 7 and type(from_json(7.0)) is int
    assert from_json(2.0**60) == 2.0**60  # not exact as an int: left a float
    assert from_json({"$bytes": "not base64!"}) == {"$bytes": "not base64!"}
    assert from_json({"$bytes": "AA==", "other": 1}) == {"$bytes": "AA==", "other": 1}
    assert [p.WhichOneof("content") for p in value_parts("t") + value_parts(b"b") + value_parts(3)] == [
        "text", "raw", "data",
    ]  # fmt: skip
    assert part_value(Part(url="https://x/y")) == "https://x/y"
    assert parts_value([Part(text="a")]) == "a" and parts_value([Part(text="a"), Part(text="b")]) == ["a", "b"]


def _message(*parts: Part, **metadata: Any) -> Message:
    return Message(role=Role.ROLE_USER, message_id="m", parts=list(parts), metadata=metadata or None)


def test_message_call() -> None:
    msg = _message(Part(text="Ada"), new_data_part(3), skill="greet", kwargs={"n": 2.0})
    assert message_call(msg) == ("greet", ["Ada", 3], {"n": 2}, None)
    # metadata 'args' replaces the parts; the request's metadata counts, the message's wins
    msg = _message(Part(text="shown to humans"), args=[1, {"$bytes": "AP8="}], timeout=5)
    assert message_call(msg, {"skill": "echo", "timeout": 1}) == ("echo", [1, b"\x00\xff"], {}, 5)
    assert message_call(_message(Part(text="x")), default_skill="d")[0] == "d"
    assert message_call(_message(Part(text="x")))[0] is None
    for bad in ({"skill": 3}, {"skill": ""}, {"args": "x"}, {"kwargs": [1]}, {"kwargs": {"timeout": 1}},
                {"kwargs": {"writes": ["k"]}}):  # fmt: skip
        with pytest.raises(ValueError):
            message_call(_message(Part(text="x"), **bad))


def test_call_message_fields_round_trip_through_message_call() -> None:
    for args, kwargs in [(("a", b"b", [3]), {}), ((), {"k": 1}), ((), {}), ((1,), {"x": {"y": b"z"}})]:
        parts, meta = call_message_fields(args, kwargs)
        assert parts, "A2A needs a part"
        assert message_call(_message(*parts, skill="s", **meta)) == ("s", list(args), kwargs, None)


# --------------------------------------------------------------------------- the card


def test_swarm_skills_reads_every_status_shape() -> None:
    status = {
        "nodes": [
            {"name": "a", "skills": ["echo", "greet"]},  # today's broker: names only
            {"name": "b", "skills": ["greet"], "skill_info": {"greet": {"description": "Say hello", "tags": ["t"]}}},
            {"name": "c", "skills": {"shout": {"description": "LOUD"}}},  # a map of metadata
            {"name": "d", "skills": ["gone"], "draining": True},
            {"name": "e", "skills": [7, "", None]},
            "not a node",
        ]
    }
    assert swarm_skills(status) == {
        "echo": {},
        "greet": {"description": "Say hello", "tags": ["t"]},
        "shout": {"description": "LOUD"},
    }
    assert swarm_skills({}) == {} and swarm_skills({"nodes": "x"}) == {}


def test_card_is_complete_and_declares_auth_and_the_zmq_binding() -> None:
    skills = {
        "greet": {"description": "Say hello", "tags": ["text"], "examples": ["Ada"], "input_modes": ["text/plain"]},
        "bare": {},
        "odd": {"description": 5, "tags": "x", "examples": [1, "ok"], "output_modes": [None]},
    }
    card = build_card(url="http://h:1/", skills=skills, zmq_urls=["tcp://h:7700", "tcp://h2:7700"])
    validate_proto_required_fields(card)  # every field A2A requires is there
    by_id = {s.id: s for s in card.skills}
    assert by_id["greet"].description == "Say hello" and list(by_id["greet"].input_modes) == ["text/plain"]
    assert by_id["bare"].description and list(by_id["bare"].tags) == ["zlink"]
    assert list(by_id["odd"].examples) == ["ok"] and not by_id["odd"].output_modes
    assert [(i.protocol_binding, i.url) for i in card.supported_interfaces] == [
        ("JSONRPC", "http://h:1/"), ("HTTP+JSON", "http://h:1/rest"), (BINDING_URI, "tcp://h:7700"),
        (BINDING_URI, "tcp://h2:7700"),
    ]  # fmt: skip
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert "bearer" in card.security_requirements[0].schemes
    open_card = build_card(url="http://h:1", skills=skills, auth=False, rest=False)
    assert not open_card.security_schemes and not open_card.security_requirements
    assert [i.protocol_binding for i in open_card.supported_interfaces] == ["JSONRPC"]


def test_parse_http() -> None:
    assert parse_http("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", "host:x", ":80", "h:70000"):
        with pytest.raises(ConfigError):
            parse_http(bad)


# --------------------------------------------------------------------------- the task store


def _task(tid: str, state: int) -> Task:
    status = TaskStatus(state=TaskState.ValueType(state))
    status.timestamp.GetCurrentTime()
    return Task(id=tid, context_id="c", status=status)


def test_task_store_forgets_finished_tasks_after_the_ttl() -> None:
    async def main() -> None:
        ctx = ServerCallContext()
        store = TTLTaskStore(ttl=0.0, max_tasks=100)
        await store.save(_task("running", TaskState.TASK_STATE_WORKING), ctx)
        await store.save(_task("done", TaskState.TASK_STATE_COMPLETED), ctx)
        await asyncio.sleep(0.01)
        assert await store.sweep(force=True) == 1
        assert await store.get("done", ctx) is None
        assert (await store.get("running", ctx)) is not None  # never cut short while it runs
        assert [t.id for t in (await store.list(ListTasksRequest(), ctx)).tasks] == ["running"]

    asyncio.run(main())


def test_task_store_bound_drops_the_oldest_finished_tasks_first() -> None:
    async def main() -> None:
        ctx = ServerCallContext()
        store = TTLTaskStore(ttl=3600, max_tasks=3)
        await store.save(_task("w", TaskState.TASK_STATE_WORKING), ctx)
        for k in range(4):
            await store.save(_task(f"d{k}", TaskState.TASK_STATE_FAILED), ctx)
        assert len(store) == 3
        assert await store.get("d0", ctx) is None and await store.get("d1", ctx) is None
        assert all([await store.get(t, ctx) for t in ("w", "d2", "d3")])
        await store.delete("w", ctx)
        assert len(store) == 2

    asyncio.run(main())


# --------------------------------------------------------------------------- the gateway against a stand-in client


class _Future(cf.Future[Any]):
    _ids = itertools.count(1)

    def __init__(self) -> None:
        super().__init__()
        self.task_id = f"{next(self._ids):032x}"


class _Join:
    endpoints = ("tcp://127.0.0.1:7700",)


class FakeClient:
    """What the gateway uses of zlink.Client: status, has_room/wait_room, submit (stream is not needed here)."""

    join = _Join()

    def __init__(self, skills: dict[str, Any]) -> None:
        self.skills = skills
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.futures: list[_Future] = []

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return {"nodes": [{"name": "n", "skills": sorted(self.skills)}]}

    def has_room(self) -> bool:
        return True

    def wait_room(self, timeout: float | None = None) -> bool:
        return True

    def submit(
        self, skill: str, /, *args: Any, timeout: float | None = None, on_question: Any = None, **kwargs: Any
    ) -> _Future:
        self.calls.append((skill, args, kwargs))
        fut = _Future()
        self.futures.append(fut)
        outcome = self.skills[skill]
        if outcome == "hold":
            return fut
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome(*args, **kwargs))
        return fut

    def close(self) -> None:
        pass


@pytest.fixture
def fake() -> FakeClient:
    return FakeClient(
        {
            "greet": lambda name: f"hello, {name}",
            "fail": zlink.RemoteError("ValueError", "boom"),
            "late": zlink.TaskTimeout("the task did not finish within 1 s"),
            "hold": "hold",
        }
    )


@pytest.fixture
def http(fake: FakeClient) -> Iterator[TestClient]:
    gw = Gateway(http="127.0.0.1:1", token=TOKEN, client=fake)  # type: ignore[arg-type]
    with TestClient(gw.app(), base_url="http://127.0.0.1:1") as tc:
        yield tc


def _rpc(tc: TestClient, method: str, params: dict[str, Any], token: str | None = TOKEN) -> dict[str, Any]:
    headers = {"A2A-Version": "1.0"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    r = tc.post("/", json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _send(tc: TestClient, text: str, **metadata: Any) -> dict[str, Any]:
    msg = {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": text}], "metadata": metadata}
    return _rpc(tc, "SendMessage", {"message": msg})


def test_card_is_public_and_everything_else_needs_the_token(http: TestClient) -> None:
    card = http.get("/.well-known/agent-card.json").json()
    assert [s["id"] for s in card["skills"]] == ["fail", "greet", "hold", "late"]
    assert card["supportedInterfaces"][-1] == {
        "url": "tcp://127.0.0.1:7700", "protocolBinding": BINDING_URI, "protocolVersion": "1.0",
    }  # fmt: skip
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        r = http.post("/", json={"jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": {}}, headers=headers)
        assert r.status_code == 401
    assert http.get("/rest/tasks").status_code == 401
    assert "result" in _rpc(http, "ListTasks", {})
    r = http.post("/", content=b"{}", headers={"Authorization": f"bearer {TOKEN}", "Content-Length": str(10**9)})
    assert r.status_code == 413


def test_messages_become_tasks(http: TestClient, fake: FakeClient) -> None:
    task = _send(http, "Ada", skill="greet")["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    assert task["artifacts"][0]["parts"][0]["text"] == "hello, Ada"
    assert fake.calls[-1] == ("greet", ("Ada",), {})
    task = _send(http, "x", skill="fail")["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_FAILED"
    assert task["status"]["message"]["parts"][0]["text"] == "ValueError: boom"
    task = _send(http, "x", skill="late")["result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_FAILED" and "did not finish" in str(task["status"])
    assert "no node offers the skill 'nope'" in _send(http, "x", skill="nope")["error"]["message"]
    assert _send(http, "x")["error"]["code"] == -32602
    got = _rpc(http, "GetTask", {"id": task["id"]})["result"]
    assert got["id"] == task["id"]


def test_cancel_reaches_the_zlink_task(http: TestClient, fake: FakeClient) -> None:
    msg = {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "x"}], "metadata": {"skill": "hold"}}
    params = {"message": msg, "configuration": {"returnImmediately": True}}
    task = _rpc(http, "SendMessage", params)["result"]["task"]
    cancelled = _rpc(http, "CancelTask", {"id": task["id"]})["result"]
    assert cancelled["status"]["state"] == "TASK_STATE_CANCELED"
    assert fake.futures[-1].cancelled()
    assert _rpc(http, "CancelTask", {"id": task["id"]})["error"]["code"] == -32002


def test_gateway_options_are_checked() -> None:
    gw = Gateway(http="127.0.0.1:0")
    assert gw.token is not None and len(gw.token) >= 32 and gw.token_generated
    assert Gateway(http="127.0.0.1:0", auth=False).token is None
    for bad in ({"token": "short"}, {"token": "has space in the middle"}, {"task_timeout": 0},
                {"task_ttl": -1}, {"max_tasks": 0}, {"tls_cert": "x"}, {"http": "nope"}):  # fmt: skip
        with pytest.raises(ConfigError):
            Gateway(**bad)  # type: ignore[arg-type]


def test_bind_fills_in_the_port_and_refuses_a_taken_one() -> None:
    gw = Gateway(http="127.0.0.1:0", auth=False)
    sock = gw.bind()
    try:
        assert gw.port > 0 and gw.url == f"http://127.0.0.1:{gw.port}"
        with pytest.raises(ConfigError, match="cannot listen"):
            Gateway(http=f"127.0.0.1:{gw.port}", auth=False).bind().close()
    finally:
        sock.close()


# --------------------------------------------------------------------------- the adapter


def _status(state: int, text: str = "") -> TaskStatus:
    status = TaskStatus(state=TaskState.ValueType(state))
    if text:
        status.message.CopyFrom(Message(role=Role.ROLE_AGENT, message_id="s", parts=[Part(text=text)]))
    return status


def test_answer_prefers_the_result_artifact_and_raises_for_unfinished_tasks() -> None:
    answer = _Answer()
    answer.take(StreamResponse(task=Task(id="t", context_id="c", status=_status(TaskState.TASK_STATE_WORKING))))
    partial = Artifact(artifact_id="p", name="partials", parts=[Part(text="0")])
    answer.take(StreamResponse(artifact_update=TaskArtifactUpdateEvent(task_id="t", artifact=partial)))
    more = Artifact(artifact_id="p", parts=[Part(text="1")])
    answer.take(StreamResponse(artifact_update=TaskArtifactUpdateEvent(task_id="t", artifact=more, append=True)))
    assert [p.text for p in answer.task.artifacts[0].parts] == ["0", "1"]
    done = Artifact(artifact_id="r", name="result", parts=[new_data_part({"n": 1})])
    answer.take(StreamResponse(artifact_update=TaskArtifactUpdateEvent(task_id="t", artifact=done)))
    answer.take(StreamResponse(status_update=TaskStatusUpdateEvent(task_id="t", status=_status(3))))
    assert answer.result("u") == {"n": 1}

    other = _Answer()  # no artifact called result: all the parts
    arts = [Artifact(artifact_id="a", parts=[Part(text="x")]), Artifact(artifact_id="b", parts=[Part(raw=b"y")])]
    other.take(StreamResponse(task=Task(id="t", status=_status(TaskState.TASK_STATE_COMPLETED), artifacts=arts)))
    assert other.result("u") == ["x", b"y"]

    direct = _Answer()
    direct.take(StreamResponse(message=Message(message_id="m", parts=[Part(text="hi")])))
    assert direct.result("u") == "hi"

    for state, word in [(TaskState.TASK_STATE_FAILED, "failed"), (TaskState.TASK_STATE_REJECTED, "rejected"),
                        (TaskState.TASK_STATE_AUTH_REQUIRED, "authorization"),
                        (TaskState.TASK_STATE_WORKING, "TASK_STATE_WORKING")]:  # fmt: skip
        bad = _Answer()
        bad.take(StreamResponse(task=Task(id="t", status=_status(state, "because"))))
        with pytest.raises(RemoteAgentError, match=word) as info:
            bad.result("http://agent")
        assert isinstance(info.value, zlink.TaskError) and info.value.task_id == "t"


def test_sdk_errors_map_to_zlink_errors() -> None:
    import httpx
    from a2a.client import A2AClientError, A2AClientTimeoutError

    assert isinstance(_mapped(A2AClientTimeoutError("slow"), "u"), ConnectError)
    request = httpx.Request("POST", "http://u/")
    status = httpx.HTTPStatusError("no", request=request, response=httpx.Response(503, request=request))
    wrapped = A2AClientError("HTTP Error 503")
    wrapped.__cause__ = status
    mapped = _mapped(wrapped, "u")
    assert isinstance(mapped, RemoteAgentError) and mapped.code == 503
    net = A2AClientError("Network communication error: refused")
    net.__cause__ = httpx.ConnectError("refused")
    assert isinstance(_mapped(net, "u"), ConnectError)
    mapped = _mapped(TaskNotFoundError(), "u")
    assert isinstance(mapped, RemoteAgentError) and mapped.code == -32001
    assert isinstance(_mapped(httpx.ReadError("x"), "u"), ConnectError)


def test_fetch_card_errors_are_zlink_errors() -> None:
    import socket

    with pytest.raises(ConfigError, match="http"):
        fetch_card("ftp://example")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConnectError, match="cannot"):
            fetch_card(f"http://127.0.0.1:{port}/.well-known/agent-card.json", timeout=2)
    with socket.socket() as s:  # listening, never answering: the card's read times out
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConnectError, match="cannot"):
            fetch_card(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=0.3)


# --------------------------------------------------------------------------- zero-log and the optional dependency


def test_scrubbed_third_party_logs_keep_no_payload(caplog: pytest.LogCaptureFixture) -> None:
    handler = logging.StreamHandler(sys.stderr)
    seen: list[str] = []
    handler.emit = lambda record: seen.append(handler.format(record))  # type: ignore[method-assign]
    scrub_logs([handler])
    log = logging.getLogger("a2a.server.test")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        log.warning("request %s failed with code %d", {"secret": "PAYLOAD"}, -32602)
        log.warning("body: %s", {"secret": "PAYLOAD"})  # one mapping argument: logging's dict form
        try:
            raise ValueError("PAYLOAD")
        except ValueError:
            log.exception("handler failed")
        logging.getLogger("zlink.a2a").warning("own line %s", "kept")  # not a library's: untouched
        # a2a-sdk's "Message=%r%s" with an empty data suffix: the empty string prints as nothing
        log.error("Code=%s, Message=%r%s", -32700, "PAYLOAD", "")
    finally:
        log.removeHandler(handler)
    assert seen[0] == "request <dict> failed with code -32602"
    assert "PAYLOAD" not in "\n".join(seen)
    assert seen[2] == "handler failed [ValueError]"
    assert seen[-1] == "Code=-32700, Message='<str>'"


def test_without_the_sdk_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'zlink\[a2a\]'"):
        require_sdk()
    require_sdk(server=False)  # the adapter needs no server
    import importlib

    package = importlib.import_module("zlink.a2a")
    with pytest.raises(ConfigError):
        package.Gateway  # noqa: B018 (loaded lazily: the attribute access is the import)


def test_skills_declare_media_types() -> None:
    @zlink.skill(input_modes=["text/plain"], output_modes="application/json")
    def f(x: str) -> str:
        return x

    wire = f.__zlink_skill__.wire()  # type: ignore[attr-defined]
    assert wire["input_modes"] == ["text/plain"] and wire["output_modes"] == ["application/json"]
    assert "input_modes" not in zlink.skill()(lambda: 1).__zlink_skill__.wire()  # type: ignore[attr-defined]
    for bad in (["x" * 101], [""], [3], ["m"] * 33):
        with pytest.raises(ValueError):
            zlink.skill(input_modes=bad)(lambda: 1)

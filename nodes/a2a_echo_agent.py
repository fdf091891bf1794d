"""A small A2A agent built with a2a-sdk alone (no zlink), to bring into a swarm.

::

    python -m nodes.a2a_echo_agent --port 9999 --token "$AGENT_TOKEN"     # the agent
    zlink node --a2a-agent http://127.0.0.1:9999 --a2a-token "$AGENT_TOKEN"   # its skills on the swarm

Two skills: ``echo`` answers with the message's parts unchanged, ``shout``
with its text in capitals. The skill is chosen by the message metadata
``"skill"`` (what ``zlink node --a2a-agent`` sends), else by the first word of
the text. See docs/a2a.md.
"""

from __future__ import annotations

import argparse
import hmac
import uuid

import uvicorn
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
    HTTPAuthSecurityScheme,
    Part,
    SecurityRequirement,
    SecurityScheme,
    StringList,
    Task,
    TaskState,
    TaskStatus,
)
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

SKILLS = {
    "echo": AgentSkill(
        id="echo", name="Echo", description="Answers with the message's parts, unchanged.",
        tags=["demo"], examples=["hello"],
    ),
    "shout": AgentSkill(
        id="shout", name="Shout", description="Answers with the message's text in capital letters.",
        tags=["demo", "text"], examples=["hello there"], input_modes=["text/plain"], output_modes=["text/plain"],
    ),
}  # fmt: skip


class EchoExecutor(AgentExecutor):
    """Each message is one task: answered at once with one artifact."""

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id and context.context_id and context.message is not None
        message = context.message
        status = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
        await event_queue.enqueue_event(
            Task(id=context.task_id, context_id=context.context_id, status=status, history=[message])
        )
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        text = context.get_user_input()
        named = message.metadata.fields.get("skill")  # metadata is a protobuf Struct
        skill = named.string_value if named is not None else ""
        if skill not in SKILLS:
            skill = "shout" if text.split(" ", 1)[0].lower() == "shout" else "echo"
        parts = [Part(text=text.upper(), media_type="text/plain")] if skill == "shout" else list(message.parts)
        await updater.add_artifact(parts, artifact_id=str(uuid.uuid4()), name=skill)
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, context.task_id or "", context.context_id or "").cancel()


class BearerToken:
    """Every request but the agent card needs ``Authorization: Bearer TOKEN``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/.well-known/agent-card.json":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


def make_app(url: str, token: str | None = None) -> ASGIApp:
    card = AgentCard(
        name="echo agent",
        description="A demo A2A agent: echo and shout.",
        supported_interfaces=[AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")],
        version="1.0.0",
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "application/json"],
        skills=list(SKILLS.values()),
    )
    if token:
        card.security_schemes["bearer"].CopyFrom(
            SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(scheme="Bearer"))
        )
        card.security_requirements.append(SecurityRequirement(schemes={"bearer": StringList()}))
    handler = DefaultRequestHandler(agent_executor=EchoExecutor(), task_store=InMemoryTaskStore(), agent_card=card)
    app = Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")])
    return BearerToken(app, token) if token else app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--token", default=None, help="require this bearer token (all but the agent card)")
    args = parser.parse_args()
    url = f"http://{args.host}:{args.port}/"
    uvicorn.run(make_app(url, args.token), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

"""A command-line A2A client built on a2a-sdk alone, to try ``zlink gateway`` (or any A2A agent).

::

    export A2A_TOKEN=...                                  # the agent's bearer token, if it wants one
    python -m nodes.a2a_client URL card                   # the agent card (public)
    python -m nodes.a2a_client URL send greet Ada         # SendMessage: one part per argument
    python -m nodes.a2a_client URL stream count_up 5      # SendStreamingMessage: events as they come
    python -m nodes.a2a_client URL send wait 60 --no-wait # returns at once with the task's id
    python -m nodes.a2a_client URL get TASK_ID            # GetTask
    python -m nodes.a2a_client URL list                   # ListTasks
    python -m nodes.a2a_client URL cancel TASK_ID         # CancelTask

An argument that parses as JSON is sent as a data part, any other as a text
part; ``--kw name=value`` adds a keyword argument. It does what an A2A client
does: resolve the card, pick the binding the card prefers, and authenticate as
the card's security scheme says (``AuthInterceptor``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from typing import Any

import httpx
from a2a.client import (
    A2ACardResolver,
    AuthInterceptor,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
    CredentialService,
)
from a2a.client.errors import A2AClientError
from a2a.helpers import new_data_part
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
)
from a2a.utils.errors import A2AError
from google.protobuf.json_format import MessageToDict


class EnvToken(CredentialService):
    """The token for whatever scheme the card names: $A2A_TOKEN."""

    async def get_credentials(self, security_scheme_name: str, context: ClientCallContext | None) -> str | None:
        return os.environ.get("A2A_TOKEN")


def part(arg: str) -> Part:
    try:
        return new_data_part(json.loads(arg))
    except ValueError:
        return Part(text=arg)


def value(kw: str) -> tuple[str, Any]:
    name, _, text = kw.partition("=")
    try:
        return name, json.loads(text)
    except ValueError:
        return name, text


def show(message: Any) -> None:
    print(json.dumps(MessageToDict(message), indent=2, ensure_ascii=False))
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as http:
        card = await A2ACardResolver(http, args.url).get_agent_card()
        if args.command == "card":
            show(card)
            return
        config = ClientConfig(httpx_client=http, streaming=args.command == "stream")
        client = ClientFactory(config).create(card, interceptors=[AuthInterceptor(EnvToken())])
        if args.command in ("send", "stream"):
            metadata: dict[str, Any] = {"skill": args.skill}
            if args.kw:
                metadata["kwargs"] = dict(value(kw) for kw in args.kw)
            parts = [part(a) for a in args.args]
            if not parts:  # A2A wants a part; metadata 'args' says there are no positional arguments
                parts, metadata["args"] = [Part(text="")], []
            message = Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=parts, metadata=metadata)
            configuration = SendMessageConfiguration(return_immediately=args.no_wait)
            request = SendMessageRequest(message=message, configuration=configuration)
            async for event in client.send_message(request):
                show(event)
        elif args.command == "get":
            show(await client.get_task(GetTaskRequest(id=args.task_id)))
        elif args.command == "list":
            show(await client.list_tasks(ListTasksRequest()))
        elif args.command == "cancel":
            show(await client.cancel_task(CancelTaskRequest(id=args.task_id)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the agent's base URL, e.g. http://127.0.0.1:8080")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("card")
    for name in ("send", "stream"):
        p = sub.add_parser(name)
        p.add_argument("skill")
        p.add_argument("args", nargs="*")
        p.add_argument("--kw", action="append", default=[], metavar="NAME=VALUE")
        p.add_argument("--no-wait", action="store_true", help="return at once (returnImmediately)")
    for name in ("get", "cancel"):
        sub.add_parser(name).add_argument("task_id")
    sub.add_parser("list")
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except (A2AError, A2AClientError, httpx.HTTPError) as exc:
        print(f"a2a_client: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

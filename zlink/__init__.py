"""zlink: a neutral, encrypted relay that fans work out across agents and machines.

::

    import zlink

    @zlink.skill()
    def square(x: int) -> int:
        return x * x

    with zlink.Client() as client:          # $ZLINK_JOIN names the swarm
        print(list(client.map("square", range(10))))
"""

from __future__ import annotations

from ._peer import Message
from .broker import Broker
from .client import AsyncClient, Client, Executor, Question, TaskFuture, TaskStream
from .errors import (
    AuthenticationError,
    ClosedError,
    ConfigError,
    ConnectError,
    LocalProtocolError,
    LoopGuarded,
    ProtocolError,
    RejectedError,
    RemoteError,
    RemoteProtocolError,
    SealError,
    TaskCancelled,
    TaskError,
    TaskLost,
    TaskTimeout,
    Undeliverable,
    ZlinkError,
)
from .node import Node, SkillSpec, TaskContext, current_task, skill
from .seal import SealKey
from .security import Join, KeyPair

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Broker",
    "Client",
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "Executor",
    "Join",
    "KeyPair",
    "LocalProtocolError",
    "LoopGuarded",
    "Message",
    "Node",
    "ProtocolError",
    "Question",
    "RejectedError",
    "RemoteError",
    "RemoteProtocolError",
    "SealError",
    "SealKey",
    "SkillSpec",
    "TaskCancelled",
    "TaskContext",
    "TaskError",
    "TaskFuture",
    "TaskLost",
    "TaskStream",
    "TaskTimeout",
    "Undeliverable",
    "ZlinkError",
    "__version__",
    "current_task",
    "skill",
]

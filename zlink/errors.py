"""The zlink exception tree.

Every error a public zlink call raises is a :class:`ZlinkError`; errors from
pyzmq and msgpack are mapped at the edges and never leak out::

    ZlinkError
    ├── ConfigError             bad join string, key file, option or home folder
    ├── ConnectError            the broker could not be reached in time
    │   └── AuthenticationError the CurveZMQ handshake was refused (key not
    │                           authorised, wrong broker key, revoked key)
    ├── ProtocolError           a message broke the wire protocol
    │   ├── LocalProtocolError  ...that we built (a bug on our side, or bad input
    │   │                       to encode such as a non-msgpack argument)
    │   └── RemoteProtocolError ...that a peer sent us
    ├── RejectedError           the broker refused a request (role, limit,
    │                           message size, ...) and said why
    ├── TaskError               a task did not produce a result
    │   ├── RemoteError         the skill raised; carries the remote type,
    │   │                       message and traceback text
    │   ├── TaskTimeout         the task did not finish before its timeout
    │   ├── TaskLost            the task was tried ``max_attempts`` times and
    │   │                       each time its node died (a poison task)
    │   ├── TaskCancelled       the task was cancelled
    │   └── SealError           a sealed payload did not open: tampered with,
    │                           sealed with another seal key, or unsealed in a
    │                           swarm that seals
    ├── Undeliverable           an agent message could not be delivered (the
    │   │                       peer did not connect within the TTL, a full
    │   │                       mailbox, a forbidden topic)
    │   └── LoopGuarded         ...because the conversation went over the
    │                           broker's loop-guard limits
    └── ClosedError             the client or node was already closed

``TypeError`` (not a ZlinkError) is raised at ``submit`` when an argument is
not a msgpack value, as Python itself does for wrong argument types.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClosedError",
    "ConfigError",
    "ConnectError",
    "LocalProtocolError",
    "LoopGuarded",
    "ProtocolError",
    "RejectedError",
    "RemoteError",
    "RemoteProtocolError",
    "SealError",
    "TaskCancelled",
    "TaskError",
    "TaskLost",
    "TaskTimeout",
    "Undeliverable",
    "ZlinkError",
]


class ZlinkError(Exception):
    """Root of every error zlink raises on purpose."""


class ConfigError(ZlinkError):
    """A join string, key file, option or home folder is missing or malformed."""


class ConnectError(ZlinkError):
    """The broker could not be reached within the connect timeout."""


class AuthenticationError(ConnectError):
    """The broker refused the CurveZMQ handshake.

    Either this peer's key is not authorised (or was revoked), or the join string
    names the wrong broker public key.
    """


class ProtocolError(ZlinkError):
    """A message broke the zlink wire protocol.

    ``code`` is a short machine-readable reason, e.g. ``"bad-version"``.
    """

    def __init__(self, message: str, *, code: str = "protocol") -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """A peer sent us something the protocol does not allow."""


class RejectedError(ZlinkError):
    """The broker refused a request and said why (``code`` and message)."""

    def __init__(self, message: str, *, code: str = "rejected") -> None:
        super().__init__(message)
        self.code = code


class TaskError(ZlinkError):
    """A task finished without a result."""

    def __init__(self, message: str, *, task_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id


class RemoteError(TaskError):
    """The skill raised an exception on the node.

    ``remote_type`` is the exception's qualified type name, ``remote_message``
    its message and ``remote_traceback`` the formatted traceback text.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        *,
        task_id: str | None = None,
        node: str | None = None,
    ) -> None:
        where = f" on node {node!r}" if node else ""
        super().__init__(f"{remote_type}: {remote_message}{where}", task_id=task_id)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.node = node


class TaskTimeout(TaskError):
    """The task did not finish before its timeout."""


class TaskLost(TaskError):
    """Every attempt at the task ended with its node dying (a poison task)."""


class TaskCancelled(TaskError):
    """The task was cancelled before it finished."""


class SealError(TaskError):
    """A sealed payload did not open, so its task has no trustworthy result.

    It was tampered with on the way, sealed with another seal key, or arrived
    unsealed where sealing is on (see docs/security.md).
    """


class Undeliverable(ZlinkError):
    """An agent message was not delivered; the message says why."""


class LoopGuarded(Undeliverable):
    """A conversation (two peers, or a task's questions) went over the broker's loop-guard
    limits and is paused; the message names the limit."""


class ClosedError(ZlinkError):
    """The client or node has been closed."""

"""zlink and the Agent2Agent (A2A) protocol, in both directions (docs/a2a.md).

- :class:`Gateway` (``zlink gateway``) serves a swarm as one A2A v1.0 agent over
  HTTP: an agent card listing the skills of the live nodes, JSON-RPC and
  HTTP+JSON bindings, tasks run on the swarm.
- :func:`agent_skills` (``zlink node --a2a-agent URL``) turns a remote A2A
  agent's skills into zlink skills that a node serves.

Both are built on the official ``a2a-sdk`` package, which zlink does not need
otherwise: install it with ``pip install 'zlink[a2a]'``. Without it, reaching
for :class:`Gateway` or :func:`agent_skills` raises :class:`~zlink.ConfigError`
saying so (this package itself imports without it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

__all__ = [
    "BINDING_URI",
    "Gateway",
    "RemoteAgentError",
    "agent_skills",
    "require_sdk",
]

#: the protocol binding URI under which a gateway's agent card declares zlink's own
#: ZeroMQ transport (A2A spec section 5.8: custom bindings are named by a versioned URI)
BINDING_URI = "urn:zlink:binding:zmq:v1"

_MISSING = "the A2A gateway and adapter need the a2a-sdk package: pip install 'zlink[a2a]'"


def require_sdk(*, server: bool = True) -> None:
    """Raise :class:`~zlink.ConfigError` unless a2a-sdk is installed (with its HTTP server
    extras and uvicorn when ``server``: the gateway needs them, the adapter does not)."""
    try:
        import a2a.client
        import httpx  # noqa: F401

        if server:
            import a2a.server.routes  # noqa: F401
            import sse_starlette  # noqa: F401
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{_MISSING} (missing: {exc.name or exc})") from None


if TYPE_CHECKING:
    from .adapter import RemoteAgentError, agent_skills
    from .gateway import Gateway


def __getattr__(name: str) -> Any:
    """The gateway and adapter load a2a-sdk only when first used."""
    if name == "Gateway":
        require_sdk()
        from .gateway import Gateway

        return Gateway
    if name in ("agent_skills", "RemoteAgentError"):
        require_sdk(server=False)
        from . import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module 'zlink.a2a' has no attribute {name!r}")

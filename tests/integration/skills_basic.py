"""Skills for the integration tests' node processes (loaded by file path).

``late_square`` is only offered when ``$SKILLS_BASIC_LATE`` is set, so a test can
start a node that brings a skill no other node has.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import zlink


@zlink.skill()
def square(x: int) -> int:
    """Return x * x."""
    return x * x


@zlink.skill()
def add(a: Any, b: Any = 0) -> Any:
    """Return a + b."""
    return a + b


@zlink.skill()
def echo(value: Any) -> Any:
    """Return the argument unchanged."""
    return value


@zlink.skill()
def fail() -> None:
    """Always raise ValueError("boom")."""
    raise ValueError("boom")


@zlink.skill()
def sleep_then(x: Any, seconds: float) -> Any:
    """Sleep (stopping early when the task is cancelled), then return x."""
    task = zlink.current_task()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if task.cancelled:
            return None
        time.sleep(0.02)
    return x


@zlink.skill()
def whoami() -> dict[str, Any]:
    """Which process and task this is."""
    task = zlink.current_task()
    return {"pid": os.getpid(), "task": task.id, "skill": task.skill, "attempt": task.attempt}


@zlink.skill()
async def async_double(x: int) -> int:
    """Coroutine skill: 2 * x after yielding to the event loop."""
    await asyncio.sleep(0.001)
    return 2 * x


if os.environ.get("SKILLS_BASIC_LATE"):

    @zlink.skill()
    def late_square(x: int) -> int:
        """Only on nodes started with $SKILLS_BASIC_LATE."""
        return x * x

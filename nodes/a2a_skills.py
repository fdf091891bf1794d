"""Skills for the A2A walk-through in docs/a2a.md: serve them with a node, call them through ``zlink gateway``.

::

    zlink node --skills nodes/a2a_skills.py
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import zlink


@zlink.skill(
    description="Say hello to someone.",
    tags=["text", "demo"],
    examples=["Ada"],
    input_modes=["text/plain"],
    output_modes=["text/plain"],
)
def greet(name: str, punctuation: str = "!") -> str:
    return f"hello, {name}{punctuation}"


@zlink.skill(description="Count from 0 to n-1, one number every delay seconds, then sum them up.", tags=["stream"])
def count_up(n: int, delay: float = 0.2) -> Iterator[int]:
    for k in range(n):
        time.sleep(delay)
        yield k  # a partial result: an A2A streaming client sees it at once
    return sum(range(n))  # the task's result


@zlink.skill(description="Wait, then answer; cancelling the task stops it at once.", tags=["demo"])
async def wait(seconds: float = 60.0) -> str:
    await asyncio.sleep(seconds)
    return f"waited {seconds:g} s"

"""Skills for the A2A tests (tests/integration/test_a2a.py), served by a CLI node behind a gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

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


@zlink.skill()
def echo(value: Any) -> Any:
    """Return the argument unchanged."""
    return value


@zlink.skill()
def add(a: Any, b: Any = 0) -> Any:
    return a + b


@zlink.skill()
def count_up(n: int, delay: float = 0.05) -> Iterator[int]:
    """A generator skill: yields 0..n-1, returns a summary."""
    for k in range(n):
        time.sleep(delay)
        yield k
    return f"counted to {n}"


@zlink.skill()
async def nap(seconds: float = 30.0) -> str:
    """Sleep (cancelled at once: an async skill)."""
    await asyncio.sleep(seconds)
    return "rested"


@zlink.skill()
def fail(message: str = "boom") -> None:
    raise ValueError(message)


@zlink.skill()
def plan(city: str) -> str:
    """A multi-turn skill: asks its caller a question (A2A: input-required), then answers."""
    days = zlink.current_task().ask("how many days?")
    return f"{days} days in {city}"

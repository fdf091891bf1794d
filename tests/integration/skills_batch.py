"""Skills for tests/integration/test_batching.py (loaded by node processes by file path).

Batched ``map`` runs many items of one skill in one task; these skills are
fast (``inc``), fail or misbehave for one chosen item (``fail_at``,
``unpackable_at``), sleep (``nap``), or are generator and async skills, so the
tests can see each item resolve as if it had been its own task. Side effects a
test must see for items whose results it never receives go to files in a
directory the test passes in (same machine).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import zlink


class ItemFailed(Exception):
    """Raised by ``fail_at`` for its chosen item."""


@zlink.skill()
def inc(x: int) -> int:
    """x + 1: a no-op-sized skill."""
    return x + 1


@zlink.skill()
def fail_at(x: int, bad: int, logdir: str) -> int:
    """Write ``ran-X`` to ``logdir``, then return x * 10, or raise ItemFailed when x == bad."""
    Path(logdir, f"ran-{x}").write_text(f"{os.getpid()}\n")
    if x == bad:
        raise ItemFailed(f"item {x} failed on purpose")
    return x * 10


@zlink.skill()
def nap(x: Any, seconds: float) -> Any:
    """Sleep ``seconds`` (not looking at cancellation: the batch stops between items), return x."""
    if seconds > 0:
        time.sleep(seconds)
    return x


@zlink.skill()
def unpackable_at(x: int, bad: int) -> Any:
    """Return x, or a set (not a msgpack value) when x == bad."""
    if x == bad:
        return {x, -x}
    return x


@zlink.skill()
def gen_sum(n: int) -> Generator[int, None, int]:
    """Generator skill: yield 0..n-1 (partials), return their sum."""
    total = 0
    for k in range(n):
        total += k
        yield k
    return total


@zlink.skill()
async def async_double(x: int) -> int:
    """Async skill: 2 * x after yielding to the node's event loop once."""
    await asyncio.sleep(0)
    return 2 * x


@zlink.skill()
def inc_all(results: list[int]) -> list[int]:
    """A reduce skill: every result + 1, in the order received."""
    return [r + 1 for r in results]


@zlink.skill()
def blob(i: int, big_from: int, size: int) -> bytes:
    """10 bytes for items before ``big_from``, then ``size`` bytes each."""
    return b"x" * (size if i >= big_from else 10)

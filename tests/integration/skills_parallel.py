"""Skills for tests/integration/test_parallel.py (loaded by node processes by file path).

Every timing skill reports wall-clock times (``time.time()``): all the node
processes of a test run on one machine, so their clocks agree and intervals
from different nodes can be compared. Side effects that a test must see even
for a task whose result it never receives go to files under a directory the
test passes in (same machine again).

``cube`` is also imported by the test itself, so that the very same function
can run in a :class:`concurrent.futures.ProcessPoolExecutor` and on the swarm
through :class:`zlink.Executor`.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import zlink


def _touch(logdir: str | None, name: str) -> None:
    if logdir:
        Path(logdir, name).write_text(f"{time.time()!r} {os.getpid()}\n")


def _sleep(seconds: float) -> bool:
    """Sleep, stopping early when the task is cancelled; True if it was."""
    task = zlink.current_task()
    end = time.monotonic() + seconds
    while True:
        if task.cancelled:
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(0.01, left))


@zlink.skill()
def cube(x: int, plus: int = 0) -> int:
    """x ** 3 + plus: an ordinary function, also run by a ProcessPoolExecutor."""
    return x**3 + plus


@zlink.skill()
def timed(i: Any, seconds: float, logdir: str | None = None) -> dict[str, Any]:
    """Sleep ``seconds`` and report when this ran: {"i", "start", "end", "pid"}."""
    start = time.time()
    _touch(logdir, f"start-{i}")
    _sleep(seconds)
    return {"i": i, "start": start, "end": time.time(), "pid": os.getpid()}


@zlink.skill()
def jitter(i: int, max_seconds: float) -> int:
    """Sleep a random time up to ``max_seconds``, then return ``i``."""
    time.sleep(random.uniform(0.0, max_seconds))
    return i


@zlink.skill()
def ident(x: Any) -> Any:
    """Return the argument at once (throughput and memory tests)."""
    return x


@zlink.skill()
def hold(tag: str, seconds: float, logdir: str) -> str:
    """A cooperative long task: polls ``current_task().cancelled`` while it works.

    Writes ``started-TAG`` when it starts, and ``noticed-TAG`` when it sees that
    it was cancelled (``finished-TAG`` when it was not).
    """
    _touch(logdir, f"started-{tag}")
    if _sleep(seconds):
        _touch(logdir, f"noticed-{tag}")
        return "cancelled"
    _touch(logdir, f"finished-{tag}")
    return "finished"


@zlink.skill()
def chunks(n: int, delay: float) -> Generator[int, None, str]:
    """Generator skill: yield 0..n-1, one every ``delay`` seconds, then return "done"."""
    for k in range(n):
        time.sleep(delay)
        yield k
    return "done"


@zlink.skill()
def chunks_then_fail(n: int) -> Iterator[int]:
    """Generator skill: yield 0..n-1, then raise ValueError."""
    yield from range(n)
    raise ValueError(f"failed after {n} chunks")


@zlink.skill()
async def async_chunks(n: int, delay: float) -> AsyncIterator[int]:
    """Async generator skill: yield 0..n-1, one every ``delay`` seconds."""
    for k in range(n):
        await asyncio.sleep(delay)
        yield k


@zlink.skill()
def scale(x: float, k: float) -> dict[str, Any]:
    """One of two skills every item goes to in the multi-skill map_reduce."""
    return {"skill": "scale", "x": x, "value": x * k}


@zlink.skill()
def shift(x: float, k: float) -> dict[str, Any]:
    """The other one."""
    return {"skill": "shift", "x": x, "value": x + k}


@zlink.skill()
def collect(results: list[Any]) -> dict[str, Any]:
    """A reduce skill that returns what it got, and a total of the numbers in it."""
    values = [r["value"] if isinstance(r, dict) else r for r in results]
    return {"results": results, "total": sum(values), "count": len(results)}


@zlink.skill()
def stubborn(i: Any, seconds: float, logdir: str | None = None) -> dict[str, Any]:
    """Like ``timed`` but never looks at ``cancelled``: a sync skill that ignores cancellation."""
    start = time.time()
    _touch(logdir, f"start-{i}")
    time.sleep(seconds)
    end = time.time()
    _touch(logdir, f"end-{i}")
    return {"i": i, "start": start, "end": end, "pid": os.getpid()}


@zlink.skill()
def kw_echo(x: Any, timeout: float | None = None, writes: Any = None) -> list[Any]:
    """Return its arguments: parameters named like zlink's own submit options."""
    return [x, timeout, writes]


@zlink.skill()
def nap(seconds: float) -> float:
    """Sleep ``seconds`` (cooperatively) and return it: a one-argument slow skill."""
    _sleep(seconds)
    return seconds

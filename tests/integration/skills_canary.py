"""Skills for the zero-log test (loaded by file path by ``zlink node``).

Every skill receives the test's canary string and puts it everywhere a skill
can put data: the result, keyword arguments, partial results of generator
skills, exception messages, chained exceptions, tracebacks and async variants
of all of these. The node and the broker must never write any of it to a log
or a file. Nothing here prints or logs on its own: anything that reaches a
log is zlink's doing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zlink


@zlink.skill()
def leak_echo(value: Any, extra: Any = None) -> Any:
    """Return the arguments (keyword argument included)."""
    return {"value": value, "extra": extra}


@zlink.skill()
def leak_raise(value: str) -> None:
    """Raise with the canary in the message."""
    raise ValueError(f"refusing {value}")


@zlink.skill()
def leak_chain(value: str) -> None:
    """Raise with the canary in a chained exception and in the local variables of the frames."""
    secret = {"held": value}
    try:
        raise KeyError(secret["held"])
    except KeyError as exc:
        raise RuntimeError(f"wrapped {value}") from exc


@zlink.skill()
def leak_stream(value: str, n: int = 3) -> Iterator[str]:
    """Yield partial results carrying the canary, then return it."""
    for i in range(n):
        yield f"{value}/{i}"
    return f"{value}/done"


@zlink.skill()
def leak_stream_raise(value: str) -> Iterator[str]:
    """Yield once, then raise with the canary."""
    yield f"{value}/first"
    raise ValueError(f"stream broke on {value}")


@zlink.skill()
async def leak_async(value: str) -> list[str]:
    """Coroutine skill returning the canary."""
    await asyncio.sleep(0.001)
    return [value]


@zlink.skill()
async def leak_async_raise(value: str) -> None:
    """Coroutine skill raising with the canary."""
    await asyncio.sleep(0.001)
    raise ValueError(f"async refusing {value}")


@zlink.skill()
async def leak_async_stream(value: str) -> AsyncIterator[str]:
    """Async generator skill yielding the canary."""
    for i in range(3):
        await asyncio.sleep(0.001)
        yield f"{value}#{i}"


@zlink.skill()
def leak_slow(value: str, seconds: float) -> str:
    """Hold the canary for a while (stops early when cancelled), then return it."""
    task = zlink.current_task()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if task.cancelled:
            return f"cancelled {value}"
        time.sleep(0.02)
    return value


@zlink.skill()
async def leak_async_slow(value: str, seconds: float) -> str:
    """Coroutine that holds the canary; when cancelled it raises with the canary."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        raise RuntimeError(f"cancelled while holding {value}") from None
    return value


@zlink.skill()
def leak_big(value: str, n: int) -> str:
    """A large result made of the canary."""
    return value * n


@zlink.skill()
def leak_bad_result(value: str) -> Any:
    """A result that is not a msgpack value (a set): the node fails the task."""
    return {value: {value}}


@zlink.skill()
def leak_exit(value: str) -> None:
    """SystemExit with the canary: the task fails, the node carries on."""
    raise SystemExit(f"exit {value}")


@zlink.skill()
def leak_interrupt(value: str) -> None:
    """KeyboardInterrupt with the canary: the task fails, the node carries on."""
    raise KeyboardInterrupt(f"interrupt {value}")


@zlink.skill()
def leak_ask(value: str) -> list[Any]:
    """A multi-turn task: ask the client a question carrying the canary, return its answer."""
    answer = zlink.current_task().ask(f"question about {value}", timeout=30)
    return [value, answer]

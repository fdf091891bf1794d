"""Multi-turn skills for test_messaging.py's node process (loaded by file path).

Each one asks the client that submitted it with ``zlink.current_task().ask``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zlink


@zlink.skill()
def plan_trip(city: str) -> str:
    """Sync skill: asks twice, then answers with both replies."""
    task = zlink.current_task()
    days = task.ask(f"How many days in {city}?", timeout=30)
    budget = task.ask(f"And the budget for {days} days?", timeout=30)
    return f"{days} days in {city} for {budget}"


@zlink.skill()
async def confirm_order(order: dict[str, Any]) -> dict[str, Any]:
    """Async skill: awaits two answers."""
    task = zlink.current_task()
    ok = await task.ask({"confirm": order}, timeout=30)
    if not ok:
        return {"order": order, "confirmed": False}
    address = await task.ask("Ship to?", timeout=30)
    return {"order": order, "confirmed": True, "ship_to": address}


@zlink.skill()
def trip_stream(city: str) -> Iterator[str]:
    """Generator skill: yields progress, asks in between, returns a summary."""
    task = zlink.current_task()
    yield f"planning {city}"
    days = task.ask("days?", timeout=30)
    yield f"{days} days booked"
    hotel = task.ask("hotel?", timeout=30)
    yield f"{hotel} booked"
    return f"{city}: {days} days at {hotel}"


@zlink.skill()
def ask_until_guarded() -> dict[str, Any]:
    """Asks until the broker's question limit makes ``ask`` raise LoopGuarded."""
    task = zlink.current_task()
    answered = 0
    while answered < 10_000:
        try:
            reply = task.ask(answered, timeout=20)
        except zlink.LoopGuarded as exc:
            return {"answered": answered, "error": type(exc).__name__, "message": str(exc)}
        assert reply == answered
        answered += 1
    return {"answered": answered, "error": None, "message": ""}


@zlink.skill()
def wait_for_answer(marker: str) -> Any:
    """Asks once and waits; records in the file ``marker`` how the wait ended."""
    task = zlink.current_task()
    try:
        reply = task.ask("anyone there?", timeout=40)
    except zlink.TaskCancelled as exc:
        Path(marker).write_text(f"TaskCancelled: {exc}")
        raise
    except BaseException as exc:
        Path(marker).write_text(f"{type(exc).__name__}: {exc}")
        raise
    Path(marker).write_text(f"answered: {reply!r}")
    return reply

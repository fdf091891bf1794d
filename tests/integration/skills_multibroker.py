"""Skills for tests/integration/test_multibroker.py: a held task that reports how many ran at once."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import zlink

_lock = threading.Lock()
_running = 0
_peak = 0


@zlink.skill()
def hold(i: int, seconds: float) -> dict[str, Any]:
    """Sleep ``seconds``; returns the item, this node's pid and the most tasks it ran at once so far."""
    global _running, _peak
    with _lock:
        _running += 1
        _peak = max(_peak, _running)
    try:
        time.sleep(seconds)
    finally:
        with _lock:
            _running -= 1
    return {"i": i, "pid": os.getpid(), "peak": _peak}


@zlink.skill()
def echo(value: Any) -> Any:
    return value

"""Skills for ``scripts/bench.py``: started as ``zlink node --skills scripts/bench_skills.py``."""

from __future__ import annotations

import time
from typing import Any

import zlink


@zlink.skill()
def noop(x: Any) -> Any:
    """Return the argument unchanged (measures pure fabric overhead)."""
    return x


@zlink.skill()
def wait50(x: Any) -> Any:
    """Sleep 50 ms, then return the argument (parallel speed-up measurements)."""
    time.sleep(0.05)
    return x

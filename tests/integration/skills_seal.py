"""Skills for the sealing tests' node processes (loaded by file path).

``$SKILLS_SEAL_SET`` picks what a node offers, so a test can start a node whose
skills no other node has: unset, the main set; ``extra``, only ``extra_square``;
``bare``, only ``bare_square``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import Any

import zlink

_SET = os.environ.get("SKILLS_SEAL_SET", "")

if _SET == "extra":

    @zlink.skill()
    def extra_square(x: int) -> int:
        """Only on nodes started with SKILLS_SEAL_SET=extra."""
        return x * x

elif _SET == "bare":

    @zlink.skill()
    def bare_square(x: int) -> int:
        """Only on nodes started with SKILLS_SEAL_SET=bare."""
        return x * x

else:

    @zlink.skill()
    def square(x: int) -> int:
        """Return x * x."""
        return x * x

    @zlink.skill()
    def echo(value: Any) -> Any:
        """Return the argument unchanged."""
        return value

    @zlink.skill()
    def fail(message: str) -> None:
        """Raise ValueError(message)."""
        raise ValueError(message)

    @zlink.skill()
    def count_up(n: int, tag: str = "") -> Generator[str, None, str]:
        """Generator skill: yield tag0..tag{n-1}, then return tag + "done"."""
        for i in range(n):
            yield f"{tag}{i}"
        return f"{tag}done"

    @zlink.skill()
    def hold(value: Any, seconds: float) -> Any:
        """Sleep (stopping early when cancelled), then return value."""
        task = zlink.current_task()
        end = time.monotonic() + seconds
        while time.monotonic() < end and not task.cancelled:
            time.sleep(0.02)
        return value

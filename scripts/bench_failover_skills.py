"""Skills for the failure-detection run of ``scripts/bench.py`` (started as ``zlink node --skills ...``).

``hold`` appends ``start <tag> <pid> <CLOCK_MONOTONIC seconds>`` to a log file
the moment it starts, then runs until cancelled (or ``seconds`` pass). The
benchmark kills the node running it with SIGKILL and reads the next ``start``
line of the same tag, written by another node once the broker re-dispatched the
task: CLOCK_MONOTONIC is one clock for every process on a Linux machine, so the
two times compare directly.
"""

from __future__ import annotations

import os
import time

import zlink


@zlink.skill()
def hold(tag: str, seconds: float, log_path: str) -> str:
    """Log the start, then stay busy (polling for cancellation) for ``seconds``."""
    started = time.monotonic()
    with open(log_path, "a") as fh:  # one short write() in append mode: lines from several nodes never mix
        fh.write(f"start {tag} {os.getpid()} {started:.6f}\n")
    ctx = zlink.current_task()
    while not ctx.cancelled and time.monotonic() - started < seconds:
        time.sleep(0.05)
    return tag

"""Skills for the failure and chaos tests' node processes (loaded by file path).

Every skill that runs to completion appends one line to the file named by
``$ZLINK_CHAOS_LOG`` (opened with ``O_APPEND`` and written with a single
``write``, so lines from concurrent processes never interleave). Tests and
``scripts/chaos.py`` count executions from it:

* ``work``: ``"<i> <pid>\\n"`` when it finishes (a node killed mid-task writes nothing);
* ``poison``: ``"poison <i> <pid>\\n"`` just before the process dies;
* ``spin``: ``"spin <pid> <loops>\\n"``;
* ``cooperative``: ``"cooperative <tag> <pid> cancelled|finished <elapsed>\\n"``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import zlink


def _log(line: str) -> None:
    path = os.environ.get("ZLINK_CHAOS_LOG")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_log(path: str | os.PathLike[str]) -> list[list[str]]:
    """The log's lines, split on whitespace (empty when the file does not exist)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [ln.split() for ln in fh if ln.strip()]
    except FileNotFoundError:
        return []


def work_runs(path: str | os.PathLike[str]) -> dict[int, list[int]]:
    """i -> pids of every completed ``work(i, ...)`` execution, in log order."""
    runs: dict[int, list[int]] = {}
    for parts in read_log(path):
        if len(parts) == 2 and parts[0].lstrip("-").isdigit():
            runs.setdefault(int(parts[0]), []).append(int(parts[1]))
    return runs


@zlink.skill()
def work(i: int, seconds: float = 0.0) -> int:
    """Sleep ``seconds``, log ``"<i> <pid>"``, return i * i."""
    if seconds > 0:
        time.sleep(seconds)
    _log(f"{i} {os.getpid()}\n")
    return i * i


@zlink.skill()
def pid() -> int:
    """The node process's pid."""
    return os.getpid()


@zlink.skill()
def spin(seconds: float) -> dict[str, Any]:
    """Hold the CPU in pure Python for ``seconds`` (the GIL is only released by the interpreter's switch)."""
    end = time.monotonic() + seconds
    loops = 0
    x = 0
    while time.monotonic() < end:
        for _ in range(10_000):
            x += 1
        loops += 1
    _log(f"spin {os.getpid()} {loops}\n")
    return {"pid": os.getpid(), "loops": loops}


@zlink.skill()
def poison(i: int) -> None:
    """Kill the whole node process (as a segfaulting extension would)."""
    _log(f"poison {i} {os.getpid()}\n")
    os._exit(137)


@zlink.skill()
def cooperative(seconds: float, tag: str = "coop") -> dict[str, Any]:
    """A sync loop of ``seconds`` that stops early once the task is cancelled."""
    task = zlink.current_task()
    t0 = time.monotonic()
    end = t0 + seconds
    outcome = "finished"
    while time.monotonic() < end:
        if task.cancelled:
            outcome = "cancelled"
            break
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    _log(f"cooperative {tag} {os.getpid()} {outcome} {elapsed:.3f}\n")
    return {"pid": os.getpid(), "outcome": outcome, "elapsed": elapsed}

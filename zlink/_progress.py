"""A small progress bar on stderr, for ``map(progress=True)`` and the demo (internal)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """One line on stderr, redrawn at most 10 times a second; a summary line when not a TTY.

    ``total`` may be None (an iterable of unknown length): then it counts without a bar.
    """

    def __init__(self, total: int | None, label: str = "tasks", stream: TextIO | None = None) -> None:
        self.total = None if total is None else max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()
        self._tty = self.stream.isatty()
        self._closed = False

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self._tty and (now - self._last > 0.1 or self.done == self.total):
                self._last = now
                self._draw(now)

    def _count(self) -> str:
        return f"{self.done:,}/{self.total:,}" if self.total is not None else f"{self.done:,}"

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        bar = ""
        if self.total is not None:
            width = 30
            filled = int(min(1.0, self.done / self.total) * width)
            bar = "[" + "#" * filled + "-" * (width - filled) + "] "
        self.stream.write(f"\r{bar}{self._count()} {self.label}  {elapsed:5.1f} s  {rate:,.0f}/s ")
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._tty:
                self._draw(time.monotonic())
                self.stream.write("\n")
            else:
                elapsed = time.monotonic() - self.start
                self.stream.write(f"{self._count()} {self.label} in {elapsed:.1f} s\n")
            self.stream.flush()

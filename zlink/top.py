"""``zlink top``: a live terminal view of a swarm, drawn from ``status()`` once a second.

:class:`Top` keeps the last minute of samples and renders a frame as plain text
(so it can be tested, piped or logged); the command redraws it in place with
ANSI escapes. It needs a key that may read status (client, both or admin).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

__all__ = ["Top", "sparkline"]

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    """``values`` (the last ``width``) as a line of block characters, scaled to their maximum."""
    vals = values[-width:]
    top = max(vals, default=0.0)
    if top <= 0:
        return _BARS[0] * len(vals)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in vals)


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 100 else f"{seconds / 60:.0f}m"


class Top:
    """The dashboard's state: feed it status snapshots with :meth:`update`, draw with :meth:`render`."""

    def __init__(self, window: int = 60, interval: float = 1.0) -> None:
        self.window = window
        self.interval = interval  # seconds between samples, for the sparkline's label
        self.rates: deque[float] = deque(maxlen=window)  # swarm tasks finished per second
        self._last: tuple[float, dict[str, Any]] | None = None
        self.node_rates: dict[str, float] = {}
        self.st: dict[str, Any] = {}

    def update(self, st: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None:
            t0, prev = self._last
            dt = max(1e-6, now - t0)
            c0, c1 = prev.get("counters", {}), st.get("counters", {})
            finished = (c1.get("done", 0) + c1.get("failed", 0)) - (c0.get("done", 0) + c0.get("failed", 0))
            self.rates.append(max(0.0, finished / dt))
            before = {n["name"]: n["done"] + n["failed"] for n in prev.get("nodes", [])}
            self.node_rates = {
                n["name"]: max(0.0, (n["done"] + n["failed"] - before.get(n["name"], n["done"] + n["failed"])) / dt)
                for n in st.get("nodes", [])
            }
        self._last = (now, st)
        self.st = st

    def render(self, width: int = 100) -> str:
        st = self.st
        if not st:
            return "zlink top: waiting for the broker's first status..."
        c = st.get("counters", {})
        nodes = st.get("nodes", [])
        slots = sum(n["slots"] for n in nodes)
        busy = sum(min(n["busy"], n["slots"]) for n in nodes)  # "busy" counts prefetched tasks too
        rate = self.rates[-1] if self.rates else 0.0
        lines = [
            f"zlink top  broker {st.get('epoch', '?')[:8]}  up {_age(float(st.get('uptime', 0)))}  "
            f"nodes {len(nodes)}  clients {st.get('clients', 0)}  slots {busy}/{slots} busy  "
            f"in flight {st.get('running', 0)}",
            f"throughput {rate:,.0f} tasks/s   last {len(self.rates) * self.interval:.0f} s: "
            f"{sparkline(list(self.rates), self.window)}",
            f"tasks: done {c.get('done', 0):,}  failed {c.get('failed', 0):,}  requeued {c.get('requeued', 0):,}  "
            f"lost {c.get('lost', 0):,}  timed out {c.get('timed_out', 0):,}  cancelled {c.get('cancelled', 0):,}  "
            f"nodes died {c.get('nodes_died', 0):,}",
            "",
        ]
        if nodes:
            w = max(4, *(len(n["name"]) for n in nodes))
            aw = max(7, *(len(n.get("address", "")) for n in nodes))
            lines.append(
                f"{'NODE':<{w}}  {'ADDRESS':<{aw}}  {'SLOTS':>7}  {'BEAT':>5}  {'TASKS/S':>8}  {'DONE':>9}  "
                f"{'FAILED':>6}  SKILLS"
            )
            for n in nodes:
                state = " (draining)" if n.get("draining") else ""
                used = f"{min(n['busy'], n['slots'])}/{n['slots']}"
                lines.append(
                    f"{n['name']:<{w}}  {n.get('address', ''):<{aw}}  {used:>7}  "
                    f"{_age(n['last_seen']):>5}  {self.node_rates.get(n['name'], 0.0):>8,.0f}  {n['done']:>9,}  "
                    f"{n['failed']:>6,}  {', '.join(n['skills'])}{state}"
                )
        else:
            lines.append("no nodes connected")
        queued = st.get("queued", {})
        lines.append("")
        lines.append(
            "queued: " + ("  ".join(f"{k} {v:,}" for k, v in sorted(queued.items(), key=lambda kv: -kv[1])) or "none")
        )
        events = st.get("events", [])[-5:]
        if events:
            lines.append("recent:")
            lines.extend(f"  {_age(float(st.get('uptime', 0)) - t)} ago  {text}" for t, text in reversed(events))
        return "\n".join(line[:width] for line in lines)

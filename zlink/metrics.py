"""Prometheus text exposition of the broker's status (``zlink broker --metrics HOST:PORT``).

Only counts, gauges, skill names and latency histograms: no payload, argument or
result ever appears in a metric or a label. Served by a small HTTP thread; the
figures come from a snapshot the broker's loop takes when a scrape asks for one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MetricsServer", "render"]

log = logging.getLogger("zlink.metrics")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    """Every digit: counts as integers, other values as Python's shortest exact float."""
    v = float(value)
    return str(int(v)) if v.is_integer() and abs(v) < 2**63 else repr(v)


def render(st: dict[str, Any]) -> str:
    """The status snapshot as Prometheus text format 0.0.4."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {_num(value)}")

    nodes = st.get("nodes", [])
    metric("zlink_up", "gauge", "1 while the broker runs.", [("", 1)])
    metric("zlink_uptime_seconds", "gauge", "Seconds since the broker started.", [("", float(st.get("uptime", 0)))])
    metric("zlink_nodes", "gauge", "Connected nodes.", [("", len(nodes))])
    metric("zlink_clients", "gauge", "Connected clients.", [("", int(st.get("clients", 0)))])
    metric("zlink_slots", "gauge", "Slots of the connected nodes.", [("", sum(n["slots"] for n in nodes))])
    metric("zlink_slots_busy", "gauge", "Tasks sent to nodes and not answered.", [("", sum(n["busy"] for n in nodes))])
    metric("zlink_tasks_running", "gauge", "Tasks dispatched to a node.", [("", int(st.get("running", 0)))])
    queued = st.get("queued", {})
    metric(
        "zlink_tasks_queued", "gauge", "Tasks waiting for a node, per skill.",
        [(f'{{skill="{_label(k)}"}}', v) for k, v in sorted(queued.items())],
    )  # fmt: skip
    metric(
        "zlink_node_tasks_total", "counter", "Tasks each node finished, by outcome.",
        [(f'{{node="{_label(n["name"])}",outcome="done"}}', n["done"]) for n in nodes]
        + [(f'{{node="{_label(n["name"])}",outcome="failed"}}', n["failed"]) for n in nodes],
    )  # fmt: skip
    counters = st.get("counters", {})
    metric(
        "zlink_events_total", "counter", "Task and peer events since the broker started.",
        [(f'{{event="{_label(k)}"}}', v) for k, v in sorted(counters.items())],
    )  # fmt: skip
    errors = st.get("errors", {})
    metric(
        "zlink_refused_total", "counter", "Messages refused, by error code.",
        [(f'{{code="{_label(k)}"}}', v) for k, v in sorted(errors.items())],
    )  # fmt: skip
    out.append("# HELP zlink_task_seconds Submit-to-result time of the tasks nodes answered, per skill.")
    out.append("# TYPE zlink_task_seconds histogram")
    for skill, h in sorted(st.get("latency", {}).items()):
        lab = _label(skill)
        running = 0.0
        for le, count in zip(h["le"], h["counts"], strict=False):
            running += count
            out.append(f'zlink_task_seconds_bucket{{skill="{lab}",le="{le:g}"}} {_num(running)}')
        total = running + h["counts"][-1] if len(h["counts"]) > len(h["le"]) else running
        out.append(f'zlink_task_seconds_bucket{{skill="{lab}",le="+Inf"}} {_num(total)}')
        out.append(f'zlink_task_seconds_sum{{skill="{lab}"}} {_num(h["sum"])}')
        out.append(f'zlink_task_seconds_count{{skill="{lab}"}} {_num(total)}')
    return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port``; ``snapshot()`` returns the status to render (or None)."""

    def __init__(self, address: str, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        host, _, port = address.rpartition(":")
        self.snapshot = snapshot
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                st = outer.snapshot()
                if st is None:
                    self.send_error(503, "the broker did not answer in time")
                    return
                body = render(st).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics scrape from %s", self.client_address[0])

        self.httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        bound_host, bound_port = self.httpd.server_address[:2]
        self.address = f"{bound_host!s}:{bound_port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="zlink-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

"""Unit tests for the operator features: ``zlink top``'s frame, the Prometheus text,
JSON log lines, the configuration loader, and the broker's admin operations.

Everything here is pure and in-process: hand-made status dicts, a fake clock,
click's CliRunner, and the scheduler driven with plain events.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from zlink import protocol as P
from zlink.cli import JsonFormatter, _setup_logging, main
from zlink.metrics import render
from zlink.protocol import Outcome
from zlink.scheduler import LATENCY_BUCKETS, Identity, PeerMessage, Scheduler, SchedulerConfig, Send
from zlink.seal import SealKey
from zlink.security import BrokerHome
from zlink.top import Top, sparkline

BARS = "▁▂▃▄▅▆▇█"

# --------------------------------------------------------------------------- hand-made status


def a_node(
    name: str,
    *,
    slots: int = 2,
    busy: int = 0,
    done: int = 0,
    failed: int = 0,
    last_seen: float = 0.2,
    address: str = "10.1.2.3",
    skills: tuple[str, ...] = ("echo",),
    draining: bool = False,
) -> dict[str, Any]:
    return {
        "name": name, "key_name": name, "skills": sorted(skills), "slots": slots, "busy": busy,
        "last_seen": last_seen, "done": done, "failed": failed, "seal": "abcdef012345",
        "address": address, "draining": draining,
    }  # fmt: skip


def a_status(
    nodes: list[dict[str, Any]] | None = None,
    *,
    done: int = 0,
    failed: int = 0,
    queued: dict[str, int] | None = None,
    events: list[list[Any]] | None = None,
    uptime: float = 50.0,
    clients: int = 1,
    running: int = 0,
    latency: dict[str, Any] | None = None,
    errors: dict[str, int] | None = None,
    **counters: int,
) -> dict[str, Any]:
    c = {"submitted": done + failed, "done": done, "failed": failed, "requeued": 0, "lost": 0, "timed_out": 0,
         "cancelled": 0, "rejected": 0, "nodes_died": 0}  # fmt: skip
    c.update(counters)
    return {
        "epoch": "0123456789abcdef",
        "uptime": uptime,
        "nodes": nodes if nodes is not None else [],
        "clients": clients,
        "seal_keys": ["abcdef012345"],
        "queued": queued or {},
        "running": running,
        "counters": c,
        "errors": errors or {},
        "events": events or [],
        "latency": latency or {},
    }


def row_of(frame: str, name: str) -> list[str]:
    """The cells of the node table row that starts with ``name``."""
    for line in frame.splitlines():
        if line.startswith(name + " "):
            return line.split()
    raise AssertionError(f"no row for {name!r} in:\n{frame}")


def line_starting(frame: str, prefix: str) -> str:
    for line in frame.splitlines():
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r} in:\n{frame}")


# --------------------------------------------------------------------------- top: sparkline


@pytest.mark.timeout(10)
def test_sparkline_scales_to_the_maximum() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == BARS
    assert sparkline([5, 10]) == "▅█"  # 5/10 of the way up, rounded
    # only the shape matters, not the unit
    assert sparkline([1, 2, 4]) == sparkline([100, 200, 400])
    assert sparkline([3, 3, 3]) == "███"


@pytest.mark.timeout(10)
def test_sparkline_of_nothing_and_of_zeros() -> None:
    assert sparkline([]) == ""
    assert sparkline([0.0, 0.0, 0.0]) == "▁▁▁"


@pytest.mark.timeout(10)
def test_sparkline_keeps_the_last_width_values() -> None:
    line = sparkline([float(v) for v in range(100)], width=10)
    assert len(line) == 10
    assert line[-1] == "█"
    # the first 90 values were dropped: the scale is 90..99, so nothing is near empty
    assert line == sparkline([float(v) for v in range(90, 100)])


# --------------------------------------------------------------------------- top: frames


@pytest.mark.timeout(10)
def test_first_frame_before_any_status() -> None:
    frame = Top().render()
    assert frame == "zlink top: waiting for the broker's first status..."


@pytest.mark.timeout(10)
def test_frame_shows_header_nodes_and_columns() -> None:
    top = Top()
    st = a_status(
        [
            a_node("worker-a", slots=4, busy=6, done=1234567, failed=3, address="192.0.2.7", skills=("b", "a")),
            a_node("w-b", slots=2, busy=1, last_seen=250.0, draining=True),
        ],
        done=1234570,
        failed=3,
        clients=3,
        running=7,
        uptime=12.34,
        requeued=2,
        lost=1,
        timed_out=4,
        cancelled=5,
        nodes_died=6,
    )
    top.update(st, now=10.0)
    frame = top.render(200)
    lines = frame.splitlines()
    # busy counts prefetched tasks too: the header and the rows cap it at the slots
    assert lines[0] == ("zlink top  broker 01234567  up 12.3s  nodes 2  clients 3  slots 5/6 busy  in flight 7")
    assert lines[1].startswith("throughput 0 tasks/s   last 0 s: ")
    assert lines[2] == ("tasks: done 1,234,570  failed 3  requeued 2  lost 1  timed out 4  cancelled 5  nodes died 6")
    header = line_starting(frame, "NODE")
    assert header.split() == ["NODE", "ADDRESS", "SLOTS", "BEAT", "TASKS/S", "DONE", "FAILED", "SKILLS"]
    assert row_of(frame, "worker-a") == ["worker-a", "192.0.2.7", "4/4", "0.2s", "0", "1,234,567", "3", "a,", "b"]
    # a heartbeat 250 s old is shown in minutes; a draining node says so
    assert row_of(frame, "w-b") == ["w-b", "10.1.2.3", "1/2", "4m", "0", "0", "0", "echo", "(draining)"]
    # columns line up: every row starts its ADDRESS where the header does
    col = header.index("ADDRESS")
    for name, address in (("worker-a", "192.0.2.7"), ("w-b", "10.1.2.3")):
        assert line_starting(frame, name + " ").index(address) == col
    assert "queued: none" in lines
    assert "recent:" not in frame


@pytest.mark.timeout(10)
def test_node_without_an_address_still_renders() -> None:
    n = a_node("old-broker-node")
    del n["address"], n["draining"]
    top = Top()
    top.update(a_status([n]), now=1.0)
    assert row_of(top.render(), "old-broker-node")[:3] == ["old-broker-node", "0/2", "0.2s"]


@pytest.mark.timeout(10)
def test_rates_come_from_two_updates_and_the_clock() -> None:
    top = Top()
    top.update(a_status([a_node("n1", done=10), a_node("n2", done=5)], done=15), now=100.0)
    assert top.rates == type(top.rates)()  # no rate from one sample
    # 2 s later: n1 finished 10 + 2 failed, n2 finished 16; n3 is new
    st = a_status([a_node("n1", done=20, failed=2), a_node("n2", done=21), a_node("n3", done=50)], done=41, failed=2)
    top.update(st, now=102.0)
    assert list(top.rates) == [14.0]  # (41 + 2 - 15) / 2
    assert top.node_rates == {"n1": 6.0, "n2": 8.0, "n3": 0.0}  # a node seen once has no rate yet
    frame = top.render()
    assert line_starting(frame, "throughput").startswith("throughput 14 tasks/s   last 1 s: █")
    assert row_of(frame, "n1")[4] == "6"
    assert row_of(frame, "n2")[4] == "8"
    assert row_of(frame, "n3")[4] == "0"


@pytest.mark.timeout(10)
def test_rate_never_goes_negative_when_the_broker_restarts() -> None:
    top = Top()
    top.update(a_status([a_node("n1", done=500)], done=500), now=1.0)
    top.update(a_status([a_node("n1", done=0)], done=0), now=2.0)  # a new broker: counters from zero
    assert list(top.rates) == [0.0]
    assert top.node_rates == {"n1": 0.0}
    assert "throughput 0 tasks/s" in top.render()


@pytest.mark.timeout(10)
def test_the_same_instant_twice_does_not_divide_by_zero() -> None:
    top = Top()
    top.update(a_status(done=1), now=5.0)
    top.update(a_status(done=1), now=5.0)
    assert list(top.rates) == [0.0]


@pytest.mark.timeout(10)
def test_throughput_sparkline_keeps_the_window_and_scales() -> None:
    top = Top(window=5)
    done = 0
    for i, per_second in enumerate([0, 1, 2, 3, 4, 5, 6, 7]):
        done += per_second
        top.update(a_status(done=done), now=float(i))
    assert list(top.rates) == [3.0, 4.0, 5.0, 6.0, 7.0]
    line = line_starting(top.render(), "throughput")
    assert line == "throughput 7 tasks/s   last 5 s: " + sparkline([3, 4, 5, 6, 7])
    assert line.endswith("▄▅▆▇█")


@pytest.mark.timeout(10)
def test_queued_skills_are_sorted_by_count() -> None:
    top = Top()
    top.update(a_status(queued={"small": 1, "big": 12345, "mid": 20}), now=0.0)
    assert "queued: big 12,345  mid 20  small 1" in top.render().splitlines()


@pytest.mark.timeout(10)
def test_recent_events_newest_first_last_five() -> None:
    events = [[float(t), f"event number {t}"] for t in range(1, 8)]  # seconds after the broker started
    top = Top()
    top.update(a_status(events=events, uptime=10.0), now=0.0)
    lines = top.render().splitlines()
    start = lines.index("recent:")
    assert lines[start + 1 :] == [
        "  3.0s ago  event number 7",
        "  4.0s ago  event number 6",
        "  5.0s ago  event number 5",
        "  6.0s ago  event number 4",
        "  7.0s ago  event number 3",
    ]


@pytest.mark.timeout(10)
def test_every_line_fits_the_width() -> None:
    skills = tuple(f"a_rather_long_skill_name_{i}" for i in range(20))
    st = a_status(
        [a_node("node-with-a-long-name", skills=skills)],
        queued={s: 1 for s in skills},
        events=[[1.0, "node node-with-a-long-name joined: " + ", ".join(skills)]],
    )
    top = Top()
    top.update(st, now=0.0)
    top.update(st, now=1.0)
    for width in (20, 40, 80):
        frame = top.render(width)
        assert max(len(line) for line in frame.splitlines()) <= width
        assert frame.startswith("zlink top  broker "[:width])
    wide = top.render(10_000)
    assert ", ".join(skills) in wide  # nothing cut when there is room


@pytest.mark.timeout(10)
def test_no_nodes() -> None:
    top = Top()
    top.update(a_status([], clients=0), now=0.0)
    frame = top.render()
    assert "nodes 0  clients 0  slots 0/0 busy" in frame.splitlines()[0]
    assert "no nodes connected" in frame.splitlines()
    assert "NODE" not in frame


@pytest.mark.timeout(10)
def test_a_scheduler_status_renders() -> None:
    """The real status() shape (from the scheduler) goes through the dashboard."""
    harness = Harness()
    harness.node(b"n1", name="real-node", skills=("echo",), slots=2)
    harness.client(b"c1")
    _, (tid,) = harness.submit(b"c1", [b"t1"])
    harness.result(b"n1", tid)
    top = Top()
    top.update(harness.s.status(), now=0.0)
    frame = top.render()
    assert row_of(frame, "real-node")[:3] == ["real-node", "198.51.100.1", "0/2"]
    assert "tasks: done 1" in frame
    assert "node real-node joined" in frame


# --------------------------------------------------------------------------- metrics

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_metrics(text: str) -> dict[str, dict[str, Any]]:
    """A strict reader of Prometheus text format 0.0.4: families with HELP, TYPE and samples."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current = ""
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            assert name not in families, f"{name} declared twice"
            assert help_
            families[name] = {"help": help_, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current, f"TYPE of {name} not right after its HELP"
            assert families[name]["type"] is None and not families[name]["samples"]
            assert kind in ("gauge", "counter", "histogram")
            families[name]["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            family = families[current]
            allowed = [current]
            if family["type"] == "histogram":
                allowed = [current + "_bucket", current + "_sum", current + "_count"]
            assert name in allowed, f"{name} under family {current}"
            raw = dict(LABEL.findall(labels))
            unescaped = {
                k: re.sub(r"\\(.)", lambda mm: "\n" if mm.group(1) == "n" else mm.group(1), v) for k, v in raw.items()
            }
            family["samples"].append((name, unescaped, float(value), value))
    return families


def one(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    found = [v for n, lab, v, _ in families_samples(families) if n == name and lab == labels]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def families_samples(families: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, str], float, str]]:
    for fam in families.values():
        yield from fam["samples"]


def histogram(counts_by_bucket: dict[float, int], over: int = 0, total_seconds: float = 0.0) -> dict[str, Any]:
    counts = [float(counts_by_bucket.get(le, 0)) for le in LATENCY_BUCKETS] + [float(over)]
    return {"le": list(LATENCY_BUCKETS), "counts": counts, "sum": total_seconds}


@pytest.mark.timeout(10)
def test_metrics_are_valid_prometheus_text_with_the_documented_families() -> None:
    st = a_status(
        [a_node("n1", slots=4, busy=3, done=7, failed=1), a_node("n2", slots=2, busy=5, done=2)],
        done=9,
        failed=1,
        queued={"echo": 4, "square": 2},
        running=8,
        clients=3,
        uptime=12.5,
        errors={"forbidden": 2, "bad-frame": 1},
        latency={"echo": histogram({0.001: 2, 0.01: 3}, over=1, total_seconds=61.25)},
    )
    fams = parse_metrics(render(st))
    kinds = {name: f["type"] for name, f in fams.items()}
    assert kinds == {
        "zlink_up": "gauge", "zlink_uptime_seconds": "gauge", "zlink_nodes": "gauge", "zlink_clients": "gauge",
        "zlink_slots": "gauge", "zlink_slots_busy": "gauge", "zlink_tasks_running": "gauge",
        "zlink_tasks_queued": "gauge", "zlink_node_tasks_total": "counter", "zlink_events_total": "counter",
        "zlink_refused_total": "counter", "zlink_task_seconds": "histogram",
    }  # fmt: skip
    assert one(fams, "zlink_up") == 1
    assert one(fams, "zlink_uptime_seconds") == 12.5
    assert one(fams, "zlink_nodes") == 2
    assert one(fams, "zlink_clients") == 3
    assert one(fams, "zlink_slots") == 6
    assert one(fams, "zlink_slots_busy") == 8
    assert one(fams, "zlink_tasks_running") == 8
    assert one(fams, "zlink_tasks_queued", skill="echo") == 4
    assert one(fams, "zlink_tasks_queued", skill="square") == 2
    assert one(fams, "zlink_node_tasks_total", node="n1", outcome="done") == 7
    assert one(fams, "zlink_node_tasks_total", node="n1", outcome="failed") == 1
    assert one(fams, "zlink_node_tasks_total", node="n2", outcome="done") == 2
    assert one(fams, "zlink_node_tasks_total", node="n2", outcome="failed") == 0
    assert one(fams, "zlink_events_total", event="done") == 9
    assert one(fams, "zlink_events_total", event="nodes_died") == 0
    assert one(fams, "zlink_refused_total", code="forbidden") == 2
    assert one(fams, "zlink_refused_total", code="bad-frame") == 1


@pytest.mark.timeout(10)
def test_empty_status_still_declares_every_family() -> None:
    fams = parse_metrics(render({}))
    assert one(fams, "zlink_up") == 1
    assert one(fams, "zlink_nodes") == 0
    assert fams["zlink_tasks_queued"]["samples"] == []
    assert fams["zlink_task_seconds"]["type"] == "histogram"
    assert fams["zlink_task_seconds"]["samples"] == []


@pytest.mark.timeout(10)
def test_label_values_are_escaped() -> None:
    nasty = 'we"ird\\skill\nname'
    node = 'no"de\\\n'
    st = a_status(
        [a_node(node)], queued={nasty: 3}, latency={nasty: histogram({0.5: 1}, total_seconds=0.4)},
        errors={'co"de\n': 1},
    )  # fmt: skip
    text = render(st)
    assert 'skill="we\\"ird\\\\skill\\nname"' in text
    # every sample stays on one line, and every label reads back as it was
    fams = parse_metrics(text)
    assert one(fams, "zlink_tasks_queued", skill=nasty) == 3
    assert one(fams, "zlink_node_tasks_total", node=node, outcome="done") == 0
    assert one(fams, "zlink_refused_total", code='co"de\n') == 1
    assert one(fams, "zlink_task_seconds_count", skill=nasty) == 1
    assert one(fams, "zlink_task_seconds_bucket", skill=nasty, le="+Inf") == 1


@pytest.mark.timeout(10)
def test_histogram_buckets_are_cumulative_and_end_in_inf() -> None:
    h = histogram({0.001: 2, 0.0025: 1, 0.1: 4, 60.0: 1}, over=3, total_seconds=250.5)
    fams = parse_metrics(render(a_status(latency={"echo": h, "idle": histogram({})})))
    for skill, expect_total in (("echo", 11), ("idle", 0)):
        buckets = [
            (lab["le"], v) for n, lab, v, _ in fams["zlink_task_seconds"]["samples"]
            if n == "zlink_task_seconds_bucket" and lab["skill"] == skill
        ]  # fmt: skip
        assert [le for le, _ in buckets] == [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
        values = [v for _, v in buckets]
        assert values == sorted(values), "buckets must be cumulative"
        assert values[-1] == expect_total
        assert one(fams, "zlink_task_seconds_count", skill=skill) == expect_total
    echo = {
        lab["le"]: v for n, lab, v, _ in fams["zlink_task_seconds"]["samples"]
        if n == "zlink_task_seconds_bucket" and lab["skill"] == "echo"
    }  # fmt: skip
    assert (echo["0.001"], echo["0.0025"], echo["0.005"], echo["0.1"], echo["30"], echo["60"]) == (2, 3, 3, 7, 7, 8)
    assert one(fams, "zlink_task_seconds_sum", skill="echo") == 250.5


@pytest.mark.timeout(10)
def test_metrics_read_only_counts_and_names_from_status() -> None:
    """Nothing but counts, gauges, node and skill names: no address, event text, epoch or key."""
    canary = "CANARY-7f3a"
    n = a_node("n1", address=f"203.0.113.9-{canary}")
    n["key_name"] = f"key-{canary}"
    n["seal"] = f"seal-{canary}"
    n["payload"] = f"payload-{canary}"
    st = a_status([n], events=[[1.0, f"node n1 joined {canary}"]])
    st["epoch"] = canary
    st["seal_keys"] = [canary]
    st["results"] = {"t1": canary}
    st["args"] = [canary.encode()]
    text = render(st)
    assert canary not in text
    assert "203.0.113.9" not in text
    parse_metrics(text)


@pytest.mark.timeout(10)
def test_metrics_from_a_real_scheduler_status() -> None:
    """The scheduler's own status(): a latency histogram per skill, and the payloads never read."""
    harness = Harness()
    harness.node(b"n1", skills=("echo",), slots=4)
    harness.client(b"c1")
    _, tids = harness.submit(b"c1", [b"t1", b"t2", b"t3"])
    for tid in tids:
        harness.result(b"n1", tid, now=harness.now + 0.004)
    text = render(harness.s.status())
    fams = parse_metrics(text)
    assert one(fams, "zlink_task_seconds_count", skill="echo") == 3
    assert one(fams, "zlink_node_tasks_total", node="name-key-n1", outcome="done") == 3
    assert one(fams, "zlink_events_total", event="done") == 3
    assert "secret-argument" not in text and "secret-result" not in text


@pytest.mark.timeout(10)
def test_latency_bucket_bounds_are_inclusive() -> None:
    """A task that took exactly a bucket's bound counts in that bucket (Prometheus ``le``)."""
    s = Scheduler(epoch=b"e" * 8, config=CONFIG, now=0.0)
    s._observe("x", 0.005)
    s._observe("x", 1000.0)  # beyond the last bound: +Inf only
    fams = parse_metrics(render(s.status()))
    assert one(fams, "zlink_task_seconds_bucket", skill="x", le="0.0025") == 0
    assert one(fams, "zlink_task_seconds_bucket", skill="x", le="0.005") == 1
    assert one(fams, "zlink_task_seconds_bucket", skill="x", le="60") == 1
    assert one(fams, "zlink_task_seconds_bucket", skill="x", le="+Inf") == 2
    assert one(fams, "zlink_task_seconds_count", skill="x") == 2


@pytest.mark.timeout(10)
def test_large_histogram_counts_keep_every_digit() -> None:
    h = histogram({0.01: 1_234_567}, total_seconds=7_654_321.5)
    text = render(a_status(latency={"echo": h}, uptime=1_234_567.5))
    assert 'zlink_task_seconds_count{skill="echo"} 1234567\n' in text
    assert 'zlink_task_seconds_sum{skill="echo"} 7654321.5\n' in text
    assert "zlink_uptime_seconds 1234567.5\n" in text


# --------------------------------------------------------------------------- JSON logs


def _record(msg: str, *args: Any, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("inner\nproblem")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("zlink.broker", logging.WARNING, __file__, 1, msg, args, exc_info)


@pytest.mark.timeout(10)
def test_json_formatter_writes_one_object_per_line() -> None:
    fmt = JsonFormatter()
    rec = _record('task %s: "quoted"\nsecond line\ttab %d', "ab12", 42)
    line = fmt.format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert set(obj) == {"ts", "level", "logger", "msg"}
    assert obj["level"] == "warning"
    assert obj["logger"] == "zlink.broker"
    assert obj["msg"] == 'task ab12: "quoted"\nsecond line\ttab 42'
    assert obj["ts"] == pytest.approx(rec.created, abs=1e-5)


@pytest.mark.timeout(10)
def test_json_formatter_keeps_exceptions_on_the_line() -> None:
    line = JsonFormatter().format(_record("loop crashed", exc=True))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["msg"] == "loop crashed"
    assert "ValueError: inner\nproblem" in obj["exc"]
    assert "Traceback" in obj["exc"]


@pytest.mark.timeout(10)
def test_json_formatter_keeps_non_ascii_text() -> None:
    obj = json.loads(JsonFormatter().format(_record("nœud %s", "été")))
    assert obj["msg"] == "nœud été"


@pytest.mark.timeout(10)
def test_setup_logging_json_sends_json_lines_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    try:
        _setup_logging("info", "json")
        logging.getLogger("zlink.node").info("node %s serving %d skills", "n1", 3)
        logging.getLogger("zlink.broker").debug("not shown at info")
        logging.getLogger("zlink.scheduler").error("one\ntwo")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = err.getvalue().splitlines()
    assert [json.loads(ln)["msg"] for ln in lines] == ["node n1 serving 3 skills", "one\ntwo"]
    assert [json.loads(ln)["level"] for ln in lines] == ["info", "error"]


# --------------------------------------------------------------------------- configuration


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A CliRunner with no ZLINK_* variables from the outside world."""
    import os

    for var in list(os.environ):
        if var.startswith("ZLINK_"):
            monkeypatch.delenv(var)
    return CliRunner()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.timeout(20)
def test_config_table_becomes_the_default(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "from-file.key"
    cfg = write(tmp_path / "zlink.toml", f'[seal-key]\nout = "{target}"\n')
    res = runner.invoke(main, ["--config", str(cfg), "seal-key"])
    assert res.exit_code == 0, res.output
    assert target.is_file()
    assert SealKey.parse(target.read_text()).key_id in res.stderr


@pytest.mark.timeout(20)
def test_config_file_from_zlink_config_env(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "via-env-config.key"
    cfg = write(tmp_path / "zlink.toml", f'[seal-key]\nout = "{target}"\n')
    res = runner.invoke(main, ["seal-key"], env={"ZLINK_CONFIG": str(cfg)})
    assert res.exit_code == 0, res.output
    assert target.is_file()


@pytest.mark.timeout(20)
def test_env_overrides_the_file_and_the_command_line_overrides_both(runner: CliRunner, tmp_path: Path) -> None:
    in_file, in_env, on_line = tmp_path / "file.key", tmp_path / "env.key", tmp_path / "line.key"
    cfg = write(tmp_path / "zlink.toml", f'[seal-key]\nout = "{in_file}"\n')
    env = {"ZLINK_SEAL_KEY_OUT": str(in_env)}

    res = runner.invoke(main, ["--config", str(cfg), "seal-key"], env=env)
    assert res.exit_code == 0, res.output
    assert in_env.is_file() and not in_file.exists()

    res = runner.invoke(main, ["--config", str(cfg), "seal-key", "--out", str(on_line)], env=env)
    assert res.exit_code == 0, res.output
    assert on_line.is_file() and not in_file.exists()


def _dead_join(tmp_path: Path) -> str:
    """A well-formed join string for a broker that is not running (nothing listens on the port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = BrokerHome(tmp_path / "brokerhome")
    home.ensure()
    return home.invite(name="cfg-client", role="client", endpoints=[f"tcp://127.0.0.1:{port}"]).dump()


@pytest.mark.timeout(30)
def test_dashed_and_underscored_option_names_and_typed_values(runner: CliRunner, tmp_path: Path) -> None:
    """``connect-timeout`` or ``connect_timeout`` in TOML, a float; the error message shows which won."""
    join = _dead_join(tmp_path)
    dashed = write(tmp_path / "dashed.toml", "[status]\nconnect-timeout = 0.3\n")
    under = write(tmp_path / "under.toml", "[status]\nconnect_timeout = 0.35\n")
    for cfg, env, args, shown in (
        (dashed, {}, [], "within 0.3 s"),
        (under, {}, [], "within 0.35 s"),
        (dashed, {"ZLINK_STATUS_CONNECT_TIMEOUT": "0.2"}, [], "within 0.2 s"),
        (dashed, {"ZLINK_STATUS_CONNECT_TIMEOUT": "0.2"}, ["--connect-timeout", "0.1"], "within 0.1 s"),
    ):
        res = runner.invoke(main, ["--config", str(cfg), "status", *args], env={"ZLINK_JOIN": join, **env})
        assert res.exit_code == 3, res.output
        assert shown in res.stderr, (cfg.name, env, args, res.stderr)


@pytest.mark.timeout(20)
def test_unknown_table_is_refused_with_the_list_of_commands(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "never.key"
    cfg = write(tmp_path / "zlink.toml", f'[brokr]\nbind = "tcp://127.0.0.1:1"\n[seal-key]\nout = "{target}"\n')
    res = runner.invoke(main, ["--config", str(cfg), "seal-key"])
    assert res.exit_code == 2, res.output
    assert "brokr" in res.stderr
    assert "broker" in res.stderr and "seal-key" in res.stderr  # the commands it knows
    assert not target.exists()


@pytest.mark.timeout(20)
def test_top_level_value_outside_a_table_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    cfg = write(tmp_path / "zlink.toml", 'bind = "tcp://127.0.0.1:1"\n')
    res = runner.invoke(main, ["--config", str(cfg), "seal-key"])
    assert res.exit_code == 2, res.output
    assert "expected one [table] per command" in res.stderr


@pytest.mark.timeout(20)
@pytest.mark.parametrize("text", ["[seal-key\nout = 1\n", "[seal-key]\nout = \n", "[seal-key]\nout = 'a'\nout = 'b'\n"])
def test_malformed_toml_is_refused(runner: CliRunner, tmp_path: Path, text: str) -> None:
    cfg = write(tmp_path / "zlink.toml", text)
    res = runner.invoke(main, ["--config", str(cfg), "seal-key"])
    assert res.exit_code == 2, res.output
    assert "is not valid TOML" in res.stderr


@pytest.mark.timeout(20)
def test_missing_config_file_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(main, ["--config", str(tmp_path / "nowhere.toml"), "seal-key"])
    assert res.exit_code == 2, res.output


@pytest.mark.timeout(20)
def test_every_option_can_come_from_the_file_by_its_own_name(runner: CliRunner, tmp_path: Path) -> None:
    key = SealKey.generate()
    key_file = tmp_path / "swarm.key"
    key.save(key_file)
    cfg = write(tmp_path / "zlink.toml", f'[seal-key]\nkey = "{key_file}"\n')
    res = runner.invoke(main, ["--config", str(cfg), "seal-key"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == key.text()  # the key from the file, not a new random one


@pytest.mark.timeout(20)
def test_top_refuses_a_zero_interval(runner: CliRunner) -> None:
    res = runner.invoke(main, ["top", "--interval", "0"], env={"ZLINK_JOIN": "zlink1:unused"})
    assert res.exit_code == 2
    assert "--interval must be more than 0" in res.stderr


# --------------------------------------------------------------------------- scheduler: admin operations

CONFIG = SchedulerConfig(
    heartbeat_interval=1.0, liveness=3, max_message_size=1 << 20, beacon_port=5001, heartbeat_port=5002
)


class Harness:
    """A scheduler with a fake clock and opaque payloads (never read by the scheduler)."""

    def __init__(self) -> None:
        self.s = Scheduler(epoch=b"epoch-ops", config=CONFIG, now=0.0)
        self.now = 0.0

    def __call__(self, route: bytes, msg: P.Message, frames: list[Any] | None = None, **kw: Any) -> list[Send]:
        now = kw.pop("now", None)
        if now is not None:
            self.now = now
        out = self.s.handle(PeerMessage(route, msg, frames or [], **kw), self.now)
        for send in out:
            assert P.decode(P.encode(send.msg), len(send.frames)) == send.msg
        return out

    def hello(self, route: bytes, hat: str, role: str, name: str = "", **kw: Any) -> list[Send]:
        ident = Identity("key-" + route.decode(), "name-key-" + route.decode(), role)
        msg = P.Hello(name=name, role=hat, session=b"session-" + route, **kw)
        return self(route, msg, identity=ident, address="198.51.100.1")

    def node(self, route: bytes, *, skills: tuple[str, ...] = ("echo",), slots: int = 1, name: str = "") -> None:
        out = self.hello(route, "node", "node", name=name, skills={s: {} for s in skills}, slots=slots, prefetch=0)
        assert [type(s.msg) for s in out if s.route == route][:1] == [P.Welcome]

    def client(self, route: bytes, role: str = "client") -> None:
        out = self.hello(route, "client", role)
        assert [type(s.msg) for s in out if s.route == route] == [P.Welcome]

    def submit(self, route: bytes, tids: list[bytes], skill: str = "echo") -> tuple[list[Send], list[bytes]]:
        specs = tuple(P.TaskSpec(tid, skill, None, 3) for tid in tids)
        return self(route, P.Submit(tasks=specs), [b"secret-argument-" + tid for tid in tids]), tids

    def result(self, route: bytes, tid: bytes, now: float | None = None) -> list[Send]:
        """The first attempt at ``tid`` succeeded on the node at ``route``."""
        item = P.ResultItem(tid, 1, Outcome.OK)
        return self(route, P.Result(results=(item,)), [b"secret-result-" + tid], now=now)

    def admin(self, route: bytes, op: str, arg: str) -> list[Send]:
        return self(route, P.Status(op=op, arg=arg))


def dispatched(out: list[Send]) -> dict[bytes, tuple[bytes, int]]:
    """tid -> (node route, attempt) of every DISPATCH in ``out``."""
    return {item.tid: (s.route, item.attempt) for s in out if type(s.msg) is P.Dispatch for item in s.msg.tasks}


def replies(out: list[Send], route: bytes) -> list[P.Message]:
    return [s.msg for s in out if s.route == route]


def admin_reply(out: list[Send], route: bytes) -> dict[str, Any]:
    (reply,) = [m for m in replies(out, route) if type(m) is P.StatusReply]
    assert isinstance(reply, P.StatusReply)
    return reply.status


def results_to(out: list[Send], route: bytes) -> list[tuple[bytes, int, Any]]:
    """(tid, status, value) of results to ``route``: a node's payload as it is, a broker-made text decoded."""
    return [
        (item.tid, item.status, frame if item.status == Outcome.OK else P.unpack_value(frame))
        for s in out if s.route == route and type(s.msg) is P.Result
        for item, frame in zip(s.msg.results, s.frames, strict=True)
    ]  # fmt: skip


def swarm() -> Harness:
    h = Harness()
    h.node(b"n1", name="worker-1")
    h.node(b"n2", name="worker-2")
    h.client(b"c1")
    h.client(b"op", role="admin")
    return h


@pytest.mark.timeout(10)
def test_admin_drain_sends_drain_and_stops_dispatch_to_the_node() -> None:
    h = swarm()
    out = h.admin(b"op", "drain", "worker-1")
    assert admin_reply(out, b"op") == {"op": "drain", "ok": True, "message": "draining worker-1"}
    (drain,) = replies(out, b"n1")
    assert isinstance(drain, P.Drain)
    assert replies(out, b"n2") == []
    st = h.s.status()
    assert {n["name"]: n["draining"] for n in st["nodes"]} == {"worker-1": True, "worker-2": False}
    # new tasks go to the other node only, one at a time as it frees its (one) slot
    out, tids = h.submit(b"c1", [b"a1", b"a2", b"a3"])
    for tid in tids:
        assert dispatched(out) == {tid: (b"n2", 1)}
        out = h.result(b"n2", tid)
        assert results_to(out, b"c1") == [(tid, Outcome.OK, b"secret-result-" + tid)]
    assert dispatched(out) == {}
    assert h.s.status()["nodes"][0]["done"] == 0  # worker-1 got nothing


@pytest.mark.timeout(10)
def test_admin_drain_by_key_name_and_a_drained_node_keeps_its_running_task() -> None:
    h = Harness()
    h.node(b"n1", name="nick")  # its key is named name-key-n1
    h.client(b"c1")
    h.client(b"op", role="admin")
    out, _ = h.submit(b"c1", [b"t1"])
    assert dispatched(out) == {b"t1": (b"n1", 1)}
    out = h.admin(b"op", "drain", "name-key-n1")
    assert admin_reply(out, b"op")["ok"] is True
    assert [type(m) for m in replies(out, b"n1")] == [P.Drain]
    assert not [m for m in replies(out, b"n1") if type(m) is P.Cancel]  # the running task is not cancelled
    out, _ = h.submit(b"c1", [b"t2"])
    assert dispatched(out) == {}
    assert h.s.status()["queued"] == {"echo": 1}
    out = h.result(b"n1", b"t1")
    assert results_to(out, b"c1")[0][:2] == (b"t1", Outcome.OK)
    assert dispatched(out) == {}  # the freed slot takes nothing new


@pytest.mark.timeout(10)
def test_admin_cancel_by_hex_id_tells_the_client_and_the_node() -> None:
    h = swarm()
    tid = b"\x00\x01running"
    out, _ = h.submit(b"c1", [tid])
    ((node_route, _),) = dispatched(out).values()
    out = h.admin(b"op", "cancel", tid.hex())
    reply = admin_reply(out, b"op")
    assert reply == {"op": "cancel", "ok": True, "message": f"cancelled task {tid.hex()}"}
    assert results_to(out, b"c1") == [(tid, Outcome.CANCELLED, "cancelled by an operator")]
    cancels = [m for m in replies(out, node_route) if type(m) is P.Cancel]
    assert [m.tids for m in cancels] == [(tid,)]
    assert h.s.counters["cancelled"] == 1
    assert h.s.tasks == {}


@pytest.mark.timeout(10)
def test_admin_cancel_of_a_queued_task() -> None:
    h = swarm()
    out, _ = h.submit(b"c1", [b"q1"], skill="nobody-has-it")
    assert dispatched(out) == {}
    out = h.admin(b"op", "cancel", "7131")  # b"q1".hex()
    assert admin_reply(out, b"op")["ok"] is True
    assert results_to(out, b"c1") == [(b"q1", Outcome.CANCELLED, "cancelled by an operator")]
    assert h.s.status()["queued"] == {}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("op", "arg", "says"),
    [
        ("drain", "no-such-node", "no connected node named 'no-such-node'"),
        ("cancel", "00ff00ff", "no task 00ff00ff at this broker"),
        ("cancel", "not-hex!", "is not a task id (hex)"),
        ("reboot", "worker-1", "unknown operation 'reboot'"),
    ],
)
def test_admin_refuses_unknown_things_with_ok_false(op: str, arg: str, says: str) -> None:
    h = swarm()
    out = h.admin(b"op", op, arg)
    reply = admin_reply(out, b"op")
    assert reply["ok"] is False
    assert reply["op"] == op
    assert says in reply["message"]
    assert replies(out, b"n1") == [] and replies(out, b"n2") == []
    assert not any(n["draining"] for n in h.s.status()["nodes"])


@pytest.mark.timeout(10)
@pytest.mark.parametrize("role", ["client", "both"])
def test_non_admin_roles_get_forbidden(role: str) -> None:
    h = swarm()
    h.client(b"x", role=role)
    out, _ = h.submit(b"c1", [b"t1"])
    for op, arg in (("drain", "worker-1"), ("cancel", b"t1".hex())):
        out = h.admin(b"x", op, arg)
        (err,) = replies(out, b"x")
        assert isinstance(err, P.Error)
        assert err.code == "forbidden"
        assert "admin only" in err.message
        assert replies(out, b"n1") == [] and replies(out, b"n2") == [] and replies(out, b"c1") == []
    assert b"t1" in h.s.tasks
    assert not any(n["draining"] for n in h.s.status()["nodes"])


@pytest.mark.timeout(10)
def test_a_node_key_cannot_manage_the_swarm() -> None:
    h = swarm()
    out = h.admin(b"n2", "drain", "worker-1")
    (err,) = replies(out, b"n2")
    assert isinstance(err, P.Error) and err.code == "forbidden"
    assert replies(out, b"n1") == []


@pytest.mark.timeout(10)
def test_status_reports_address_draining_events_and_latency() -> None:
    h = swarm()
    h.now = 2.5
    _, (tid,) = h.submit(b"c1", [b"t1"])
    h.result(b"n1", tid, now=2.503)
    h.admin(b"op", "drain", "worker-2")
    st = h.s.status()
    assert [(n["name"], n["address"], n["draining"]) for n in st["nodes"]] == [
        ("worker-1", "198.51.100.1", False),
        ("worker-2", "198.51.100.1", True),
    ]
    texts = [text for _, text in st["events"]]
    assert any(t.startswith("node worker-1 joined: 1 slot(s), skills echo") for t in texts)
    assert all(isinstance(t, float) for t, _ in st["events"])
    lat = st["latency"]["echo"]
    assert lat["le"] == list(LATENCY_BUCKETS)
    assert len(lat["counts"]) == len(LATENCY_BUCKETS) + 1
    assert sum(lat["counts"]) == 1
    assert lat["counts"][LATENCY_BUCKETS.index(0.005)] == 1  # 3 ms
    assert lat["sum"] == pytest.approx(0.003, abs=1e-6)

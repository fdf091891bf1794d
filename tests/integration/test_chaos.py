"""A reduced chaos run: scripts/chaos.py as a subprocess, with a small, fixed schedule.

3 nodes, 200 short tasks, 2 node kill -9s, 1 SIGSTOP/SIGCONT and 1 broker
kill -9 + restart in about 20 s of submitting. The script checks that every
future resolved exactly once with the right value; this test reads its JSON
report, checks the counts and the detection times, and that no process of the
run is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zlink.demo import processes_mentioning

from .conftest import REPO, clean_env

CHAOS = REPO / "scripts" / "chaos.py"


@pytest.mark.timeout(150)
def test_reduced_chaos_run(tmp_path: Path) -> None:
    report_file = tmp_path / "chaos.json"
    args = [
        sys.executable, str(CHAOS),
        "--nodes", "3", "--tasks", "200", "--duration", "20",
        "--kills", "2", "--stops", "1", "--broker-restarts", "1",
        "--seed", "11", "--drain", "60", "--json", str(report_file),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=130, env=clean_env(), check=False)
    print(proc.stdout)
    assert report_file.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    report = json.loads(report_file.read_text())
    assert proc.returncode == 0, f"chaos failed: {report['problems']}\n{proc.stderr[-3000:]}"
    assert report["ok"] and not report["problems"]
    assert (report["node_kills"], report["stops"], report["broker_restarts"]) == (2, 1, 1), report["events"]
    assert report["completed"] == 200 and report["pending"] == 0 and not report["failed"]
    assert report["futures_resolved_twice"] == 0
    assert report["executions"] >= 200
    # every kill -9 noticed within interval x liveness + one interval + slack
    unlisted = [k["unlisted_after"] for k in report["kills"]]
    assert all(t is not None and t < 4.0 for t in unlisted), report["kills"]
    dead = [s["dead_after"] for s in report["stops_detail"]]
    assert all(t is not None and t < 4.0 for t in dead), report["stops_detail"]
    rejoined = [s["rejoined_after"] for s in report["conts_detail"]]
    assert all(t is not None and t < 8.0 for t in rejoined), report["conts_detail"]
    assert report["restarts_detail"][0]["nodes_back_after"] is not None, report["restarts_detail"]
    assert processes_mentioning(report["workdir"]) == []
    assert not Path(report["workdir"]).exists()


@pytest.mark.timeout(90)
def test_reduced_multi_broker_chaos_run(tmp_path: Path) -> None:
    """scripts/chaos.py --brokers 3: brokers killed, frozen and restarted (never all at once) as well as nodes.

    3 brokers, 3 clients that fail over, 3 nodes joined to every broker, 200 short
    tasks; 1 node kill -9, 1 node SIGSTOP, 1 broker restart, 1 broker kill -9 (down
    3-6 s) and 1 broker SIGSTOP in about 20 s of submitting.
    """
    report_file = tmp_path / "chaos.json"
    args = [
        sys.executable, str(CHAOS),
        "--brokers", "3", "--clients", "3", "--nodes", "3", "--tasks", "200", "--duration", "20",
        "--kills", "1", "--stops", "1", "--broker-restarts", "1", "--broker-kills", "1", "--broker-stops", "1",
        "--seed", "5", "--drain", "30", "--json", str(report_file),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=80, env=clean_env(), check=False)
    print(proc.stdout)
    assert report_file.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    report = json.loads(report_file.read_text())
    assert proc.returncode == 0, f"chaos failed: {report['problems']}\n{proc.stderr[-3000:]}"
    assert report["ok"] and not report["problems"]
    assert not report["skipped"], report["skipped"]
    counts = [report[k] for k in ("node_kills", "stops", "broker_restarts", "broker_kills", "broker_stops")]
    assert counts == [1, 1, 1, 1, 1], report["events"]
    assert report["completed"] == 200 and report["pending"] == 0 and not report["failed"]
    assert report["futures_resolved_twice"] == 0
    assert report["executions"] >= 200
    # clients on a broker that died or froze registered with another one within the beacon timeout (2 s) + slack
    hits = report["brokers_detail"]
    moved = [h["clients_moved_after"] for h in hits if h["clients_on_it"]]
    assert moved, f"no broker action hit a broker with clients: {hits}"
    assert all(t is not None and t < 4.0 for t in moved), hits
    # every broker that came back lists the live nodes again
    assert all(h["nodes_back_after"] is not None and h["nodes_back_after"] < 10.0 for h in hits), hits
    unlisted = [k["unlisted_after"] for k in report["kills"]]
    assert all(t is not None and t < 4.0 for t in unlisted), report["kills"]
    assert processes_mentioning(report["workdir"]) == []
    assert not Path(report["workdir"]).exists()

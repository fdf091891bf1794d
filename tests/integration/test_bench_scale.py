"""Smoke test of ``scripts/bench_scale.py`` (issue #10's scale figures): every part runs and checks its results.

Tiny counts, so that it runs in well under a minute; it asserts no timing
(these machines are shared and noisy: the figures are for people).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from zlink.demo import processes_mentioning

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_scale.py"


@pytest.mark.timeout(60)
def test_scale_benchmark_runs_every_part(tmp_path: Path) -> None:
    out_json = tmp_path / "scale.json"
    args = [
        "--quick", "--nodes", "20", "--sim-procs", "1", "--queued", "500", "--rtt", "30", "--warmup", "10",
        "--cpu-seconds", "0.5", "--tasks", "300", "--batched-tasks", "2000", "--repeat", "1",
        "--fail-seconds", "5", "--kill-at", "1.5", "--restart-at", "3", "--chunk", "200", "--item-timeout", "8",
        "--json", str(out_json),
    ]  # fmt: skip
    # its own process group: on a timeout the script is stopped with everything it started, and its log shown
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script unwinds through its finally blocks
        try:
            stdout, stderr = proc.communicate(timeout=10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"bench_scale.py did not finish in 45 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    # 2: a map of the failover run did not return every result exactly once (checked below)
    assert proc.returncode in (0, 2), stdout[-3000:] + stderr[-3000:]
    doc = json.loads(out_json.read_text())
    res = doc["results"]
    assert set(res) == {"scale", "brokers", "failover"}
    assert doc["machine"]["cores"] and doc["command"].startswith("python scripts/bench_scale.py")

    scale = res["scale"]
    assert scale["queued"] >= 500 and scale["running"] == 20  # one task handed to each simulated node
    for step in ("rtt_alone", "rtt_nodes", "rtt_queued"):
        assert scale[step]["count"] == 30
    assert scale["listed_at_end"] == 21 and scale["sim"]["beats"] > 0  # the real node and every simulated one

    brokers = res["brokers"]
    for n in ("1", "3"):
        for mode in ("batch1", "batched"):
            assert brokers["best"][n][mode]["tasks"] == 3 * (300 if mode == "batch1" else 2000)
    assert len(set(brokers["runs"]["3"][0]["client_brokers"])) == 3  # each client pinned to a broker of its own

    fo = res["failover"]
    assert fo["maps"] > 0 and fo["items"] > 0
    assert fo["victim_clients"] >= 1  # the killed broker had a client, which failed over

    # the printed table, and nothing left running
    for text in ("1. One broker", "2. Brokers vs no-op throughput", "3. Broker", "processes left behind: 0"):
        assert text in stdout
    assert doc["left_behind"] == []
    assert processes_mentioning(*doc["homes"]) == []

    # every map returned every result exactly once, in order: a wrong, repeated, reordered or lost result fails here
    assert fo["errors"] == [], fo["errors"]
    assert proc.returncode == 0
    assert fo["items"] == fo["maps"] * 200

"""Smoke test of the benchmark suite: ``scripts/bench.py --quick`` runs and produces every row.

It asserts no timing (these machines are noisy; the figures are for people,
with ratios measured in the same run). The peers are left out here: they are
optional (``pip install -e '.[bench]'``) and start slowly; how a skipped peer
is reported is checked in ``tests/unit/test_bench_table.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench.py"


@pytest.mark.timeout(240)
def test_quick_benchmark_produces_every_row(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out_md = tmp_path / "bench.md"
    chart = tmp_path / "chart.png"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--peers", "none", "--json", str(out_json),
         "--markdown", str(out_md), "--chart", str(chart)],
        cwd=REPO, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out_json.read_text())
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCH.parent))
    cfg = bench.Settings(**{**doc["settings"], "peers": tuple(doc["settings"]["peers"]),
                            "only": tuple(doc["settings"]["only"])})  # fmt: skip
    expected = [row.label for row in bench.make_rows(cfg)]
    got = {row["metric"]: row for row in doc["rows"]}
    assert [r["metric"] for r in doc["rows"]] == expected  # every row, in order
    for label in expected:
        assert got[label]["values"]["zlink"] is not None, f"no zlink figure for {label!r}"
    # the floor is measured beside zlink: every per-item map and round-trip row has a raw relay figure and a ratio
    compared = [r for r in doc["rows"] if r["key"].startswith("tps_") or r["measurement"] == "round_trip"]
    assert compared and all(r["values"]["raw"] is not None and r["ratios"]["raw"] is not None for r in compared)
    assert not doc["skipped"]  # no peer was asked for
    # the printed table, the markdown and the chart come with it
    assert "kill -9 to re-dispatch" in proc.stdout and "raw" in proc.stdout
    md = out_md.read_text()
    assert md.count("\n|") >= len(expected) + 1 and "Reproduce: `python scripts/bench.py --quick" in md
    if chart.exists():
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in proc.stderr, proc.stderr[-3000:]

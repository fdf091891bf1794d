"""The benchmark's table logic (scripts/bench.py), on made-up figures: verdicts, ratios, skipped peers, docs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
try:
    import bench
finally:
    sys.path.remove(str(SCRIPTS))


def _cfg(**kw: Any) -> Any:
    base: dict[str, Any] = dict(
        tasks=1000, big_tasks=5000, rtt=10, warmup=10, window=100, workers=2, slots=4, prefetch=None,
        repeat=1, pick="best", budget=10.0, peers=("ray", "dask", "celery"), only=("map", "round_trip"),
    )  # fmt: skip
    base.update(kw)
    return bench.Settings(**base)


def _runs(cfg: Any, **figures: dict[str, Any]) -> Any:
    runs: Any = {m: {s: [] for s in bench.system_names(cfg)} for m in cfg.only}
    for system, values in figures.items():
        for m in cfg.only:
            runs[m][system].append({k: v for k, v in values.items()})
    return runs


def _row(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(r for r in rows if r["key"] == key)


def test_verdicts_against_every_measured_system_and_skipped_peers_are_said() -> None:
    cfg = _cfg()
    runs = _runs(
        cfg,
        raw={"tps_1000": 50_000.0, "tps_5000": 50_000.0, "p50_ms": 0.3, "p99_ms": 0.5},
        zlink={"tps_1000": 20_000.0, "tps_5000": 40_000.0, "batched_tps_1000": 150_000.0,
               "batched_tps_5000": 200_000.0, "p50_ms": 0.4, "p99_ms": 0.9},
        ray={"tps_1000": 10_000.0, "tps_5000": 10_000.0, "p50_ms": 2.0, "p99_ms": 3.0},
        dask={"tps_1000": 2_000.0, "tps_5000": 2_000.0, "p50_ms": 10.0, "p99_ms": 12.0},
    )  # fmt: skip
    skipped = {"celery": "redis-server not found"}
    rows = bench.summarize(runs, cfg, skipped)
    batched_small = _row(rows, "batched_tps_1000")
    # 150k vs raw 50k = 3x (>= 2), vs ray 10k = 15x (>= 10), vs dask 2k = 75x (>= 25): celery cannot be judged
    assert batched_small["ratios"]["raw"] == pytest.approx(3.0)
    assert batched_small["ratios"]["ray"] == pytest.approx(15.0)
    assert batched_small["verdict"] == "PASS" and batched_small["unjudged"] == ["celery"]
    assert _row(rows, "batched_tps_5000")["verdict"] == "PASS"
    assert _row(rows, "tps_1000")["verdict"] == "MISS"  # 0.4x the raw relay, target 0.7x
    assert _row(rows, "tps_5000")["verdict"] == "PASS"  # 0.8x
    rt = _row(rows, "p50_ms")
    assert rt["ratios"]["raw"] == pytest.approx(0.4 / 0.3) and rt["ratios"]["ray"] == pytest.approx(0.2)
    assert rt["verdict"] == "PASS" and rt["unjudged"] == []  # 1.33x raw (<= 1.5), 0.2x ray (<= 0.25)
    lines = bench.table_lines(rows, cfg, skipped)
    assert "skipped" in "\n".join(lines)  # celery's column says so rather than going blank
    text = "\n".join(bench.skipped_lines(skipped) + bench.verdict_lines(rows))
    assert "skipped: celery: redis-server not found" in text
    assert "not judged (peer skipped)" in text and "MISS: map, one task per item, 1k" in text


def test_round_trip_verdict_needs_every_target() -> None:
    cfg = _cfg(peers=("ray",), only=("round_trip",))
    ok = bench.summarize(_runs(cfg, raw={"p50_ms": 0.3}, zlink={"p50_ms": 0.4}, ray={"p50_ms": 2.0}), cfg, {})
    assert _row(ok, "p50_ms")["verdict"] == "PASS"  # 1.33x raw (<= 1.5), 0.2x ray (<= 0.25)
    slow = bench.summarize(_runs(cfg, raw={"p50_ms": 0.3}, zlink={"p50_ms": 0.6}, ray={"p50_ms": 2.0}), cfg, {})
    assert _row(slow, "p50_ms")["verdict"] == "MISS"  # 2x raw


def test_limits_on_zlinks_own_figures() -> None:
    cfg = _cfg(peers=(), only=("queued_memory", "idle_broker"))
    runs = _runs(cfg, zlink={"bytes_per_task": 1500.0, "kib_per_node": 30.0, "cpu_pct": 5.0})
    rows = bench.summarize(runs, cfg, {})
    assert _row(rows, "bytes_per_task")["verdict"] == "PASS"
    assert _row(rows, "kib_per_node")["verdict"] == "MISS"
    assert _row(rows, "cpu_pct")["verdict"] == "MISS"  # strictly under 5%


def test_markdown_and_write_docs_replace_only_their_section(tmp_path: Path) -> None:
    cfg = _cfg(peers=("ray",), only=("round_trip",))
    rows = bench.summarize(_runs(cfg, raw={"p50_ms": 0.3}, zlink={"p50_ms": 0.4}, ray={"p50_ms": 2.0}), cfg, {})
    machine = {"cores": 2, "usable_cores": 2, "cpu_model": "x", "os": "Linux", "python": "3", "pyzmq": "1",
               "libzmq": "4", "zlink": "0", "commit": "", "load_avg": [0.0], "peers": {"ray": "2.0"}}  # fmt: skip
    md = bench.markdown(rows, machine, cfg, "python scripts/bench.py", {}, "img/b.png")
    assert "| round trip p50 (ms) | 0.300 | 0.400 | 2.000 | 1.33x | 0.20x | raw≤1.5x ray≤0.25x | PASS |" in md
    assert "![zlink against the others](img/b.png)" in md and "Ray 2.0" in md
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Profile\n\nkept\n")
    bench.write_docs(md, doc)
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nintro") and "## Profile\n\nkept" in first and md in first
    bench.write_docs(md.replace("0.400", "0.500"), doc)
    second = doc.read_text()
    assert second.count(bench.BEGIN) == 1 and "| 0.500 |" in second and "| 0.400 |" not in second
    assert "## Profile\n\nkept" in second

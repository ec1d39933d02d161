"""Smoke run of the CPU benchmark: it runs, writes its CSV, plots and summary. Never timings."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_bench_quick_run(tmp_path):
    spec = importlib.util.spec_from_file_location("fused_bptt_bench_cpu",
                                                  ROOT / "bench" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "cpu_bench.csv").open()))
    assert {r["impl"] for r in rows} >= {"cpp", "nn", "reference"}, rows[:2]
    assert all(float(r["ms"]) > 0 for r in rows)
    summary = (tmp_path / "cpu_summary.txt").read_text()
    assert "kept for backward" in summary
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())

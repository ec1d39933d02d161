"""Smoke run of the CPU benchmark: it runs, writes its CSV, plots and summary. Never timings."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_bench_cpu():
    spec = importlib.util.spec_from_file_location("fused_bptt_bench_cpu",
                                                  ROOT / "bench" / "bench_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cpu_bench_quick_run(tmp_path):
    bench = _load_bench_cpu()
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "cpu_bench.csv").open()))
    assert {r["impl"] for r in rows} >= {"cpp", "nn", "reference"}, rows[:2]
    assert all(float(r["ms"]) > 0 for r in rows)
    summary = (tmp_path / "cpu_summary.txt").read_text()
    assert "kept for backward" in summary
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())


def test_cpu_bench_quick_run_bfloat16(tmp_path):
    """--dtype bfloat16 writes files of its own, with FusedRNN in float32 timed beside it."""
    bench = _load_bench_cpu()
    bench.main(["--quick", "--dtype", "bfloat16", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "cpu_bench.csv").exists()
    rows = list(csv.DictReader((tmp_path / "cpu_bench_bfloat16.csv").open()))
    assert {r["impl"] for r in rows} >= {"cpp", "nn", "cpp_float32"}, rows[:2]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    summary = (tmp_path / "cpu_summary_bfloat16.txt").read_text()
    assert "FusedRNN float32 time / bfloat16 time" in summary

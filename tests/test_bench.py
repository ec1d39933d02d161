"""Smoke runs of the benchmarks and demos: they run and write their CSV, plots and summaries.
Never timings."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fused_bptt

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_bench_quick_run(tmp_path):
    load_script("bench_cpu").main(["--quick", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "cpu_bench.csv").open()))
    assert {r["impl"] for r in rows} >= {"cpp", "nn", "reference"}, rows[:2]
    assert all(float(r["ms"]) > 0 for r in rows)
    summary = (tmp_path / "cpu_summary.txt").read_text()
    assert "kept for backward" in summary
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())


def load_script(name):
    """A bench script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"fused_bptt_bench_{name}", ROOT / "bench" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name, args):
    """load_script(name).main(args + --threads 1) from two threads: main() must leave torch's
    thread count as it found it (the scripts run in-process here, and in users' notebooks)."""
    torch.set_num_threads(2)  # (conftest's restore_threads puts the count back after the test)
    result = load_script(name).main([*args, "--threads", "1"])
    assert torch.get_num_threads() == 2, f"{name}.main() left torch on another thread count"
    return result


def quick_backend():
    """The demo refuses the slow reference backend unless asked for it by name."""
    return [] if "cpp" in fused_bptt.available_backends() else ["--backend", "reference"]


def test_demo_quick_run(tmp_path):
    pytest.importorskip("matplotlib")
    rows = run_main("demo", ["--quick", "--out", str(tmp_path), *quick_backend()])
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert (tmp_path / "demo.csv").read_text().count("\n") == len(rows["pulse"]) + 1
    assert (tmp_path / "demo_recall.csv").read_text().count("\n") == len(rows["recall"]) + 1
    assert rows["pulse"] and all(math.isfinite(r["eval_mse"]) for r in rows["pulse"])
    assert rows["recall"] and all(
        0 <= r["eval_acc"] <= 1 and r["targets"] > 0 for r in rows["recall"]
    )


@pytest.mark.slow
def test_long_range_demo_quick_run(tmp_path):
    pytest.importorskip("matplotlib")
    if "cpp" not in fused_bptt.available_backends():
        pytest.skip("the long-range demo needs the compiled CPU kernels")
    rows = run_main("long_range", ["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["tbptt", "tbptt_k1_k2", "checkpointed", "plain"]
    curves = list(csv.DictReader((tmp_path / "long_range_curves.csv").open()))
    assert len(curves) == sum(r["updates"] for r in rows)
    assert all(math.isfinite(float(c["grad_norm"])) and c["clipped"] in "01" for c in curves)
    for r in rows[:3]:
        assert 0 <= r["eval_acc"] <= 1 and r["ms_per_update"] > 0 and r["peak_mib"] >= 0
    assert (tmp_path / "long_range.png").stat().st_size > 0


@pytest.mark.slow
def test_memory_bench_quick_run(tmp_path):
    pytest.importorskip("matplotlib")
    if "cpp" not in fused_bptt.available_backends():
        pytest.skip("the memory bench needs the compiled CPU kernels")
    rows, timing = run_main("bench_memory", ["--quick", "--out", str(tmp_path)])
    assert {(r["method"], r["T"]) for r in rows} == {("plain", 400), ("checkpointed", 1600)}
    assert all(r["peak_mib"] >= 0 and r["seconds"] > 0 for r in rows)
    assert timing and all(r["plain_s"] > 0 and r["checkpointed_s"] > 0 for r in timing)
    assert "peak resident set size" in (tmp_path / "memory.txt").read_text()
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_cpu_bench_quick_run_bfloat16(tmp_path):
    """--dtype bfloat16 writes files of its own, with FusedRNN in float32 timed beside it."""
    load_script("bench_cpu").main(["--quick", "--dtype", "bfloat16", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "cpu_bench.csv").exists()
    rows = list(csv.DictReader((tmp_path / "cpu_bench_bfloat16.csv").open()))
    assert {r["impl"] for r in rows} >= {"cpp", "nn", "cpp_float32"}, rows[:2]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    summary = (tmp_path / "cpu_summary_bfloat16.txt").read_text()
    assert "FusedRNN float32 time / bfloat16 time" in summary


def test_gpu_bench_imports_and_its_varlen_rows_run_on_the_cpu():
    """bench_gpu.py cannot time anything here, but it imports, and its boundary rows (bench_cpu's
    run_varlen with the GPU's device argument) build and run their shapes on the CPU."""
    if "cpp" not in fused_bptt.available_backends():
        pytest.skip("the varlen rows need the compiled CPU kernels")
    bench_gpu = load_script("bench_gpu")
    lines = bench_gpu.run_varlen(quick=True, rounds=1, warmup=0, device="cpu")
    assert [line.split()[0] for line in lines] == ["resets", "packed"], lines
    assert all("ratio" in line and "ms" in line for line in lines), lines


def test_lm_boundaries_quick_run(tmp_path):
    """The boundaries demo runs every variant, trains with and without boundaries, evaluates
    each model both ways and writes its table, curves, summary and plot."""
    pytest.importorskip("matplotlib")
    rows = run_main("lm_boundaries", ["--quick", "--out", str(tmp_path), *quick_backend()])
    combos = {(r["variant"], r["trained"], r["evaluated"]) for r in rows}
    assert combos == {
        (v, t, e)
        for v in ("alphabet", "unmarked", "text")
        for t in ("with", "without")
        for e in ("with", "without")
    }
    assert list(csv.DictReader((tmp_path / "lm_boundaries.csv").open())) == [
        {k: str(v) for k, v in r.items()} for r in rows
    ]
    curves = list(csv.DictReader((tmp_path / "lm_boundaries_curves.csv").open()))
    assert curves and all(math.isfinite(float(c["train_bpb"])) for c in curves)
    assert any(c["eval_with_first"] and c["eval_without_first"] for c in curves)
    assert "bpb_first8" in (tmp_path / "lm_boundaries.txt").read_text()
    assert (tmp_path / "lm_boundaries.png").stat().st_size > 0

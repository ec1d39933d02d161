"""FusedRNN(backend="cuda") against torch.nn.RNN (cuDNN) on one GPU, side by side, one layer, fp32.

For every B in {1, 8, 32, 128}, H in {128, 256, 512, 1024}, T in {64, 256} (I = H): the time of a
training forward and of forward + backward, measured with CUDA events, fused and cuDNN interleaved
in rounds so clock and thermal drift hit both alike; the median over rounds is reported, with the
ratio cuDNN / fused (> 1: fused is faster) and the time per recurrent step.

cuDNN is timed twice: with TF32 (torch.backends.cudnn.allow_tf32, on by default: float32 GEMMs
rounded to 10-bit mantissas, about 1e-3 relative error) and without it (full float32, the
precision fused_bptt computes in). Both ratios are reported.

Then the two boundary rows of bench_cpu.py (its run_varlen, on the GPU), fwd+bwd, float32:
FusedRNN with ~1% resets against the per-step nn.RNN loop at T/B/H = 128/64/256, and FusedRNN
against nn.RNN (cuDNN, TF32 off) on one PackedSequence at 64/32/256, lengths uniform in [16, 64].

Writes bench/results/gpu_<device>.csv, gpu_<device>_varlen.txt and, where matplotlib is
installed, gpu_<device>.png. Never asserts speed. Run by bench/gpu.sh after the CUDA tests pass.

    python bench/bench_gpu.py                    # the full grid (a few minutes)
    python bench/bench_gpu.py --quick            # B in {8}, H in {256}, T in {64}
    python bench/bench_gpu.py --varlen-only      # only the two boundary rows
    FUSED_BPTT_CUDA_PATH=per_step python bench/bench_gpu.py   # the fallback path instead
"""

import argparse
import csv
import os
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # bench_cpu's run_varlen, when imported from elsewhere
import bench_cpu  # noqa: E402
import fused_bptt  # noqa: E402  (bench/gpu.sh puts the in-place build first on PYTHONPATH)


def time_ms(fn, rounds_out, warmup):
    """Appends the time of one call of fn (ms, CUDA events) to rounds_out, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    rounds_out.append(start.elapsed_time(end))


def time_interleaved_cuda(calls, rounds, warmup):
    """Median seconds per name of calls {name: fn}, timed with CUDA events and interleaved in
    rounds (bench_cpu.run_varlen's timer on a GPU)."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            time_ms(fn, times[name], warmup)
    return {name: statistics.median(v) / 1e3 for name, v in times.items()}


def run_varlen(quick, rounds, warmup, device="cuda"):
    """bench_cpu.run_varlen's rows on `device` ("cuda"; "cpu" lets the tests run the same
    shapes without a GPU): returns its summary lines. cuDNN without TF32, the precision of the
    fused kernels."""
    if device == "cpu":
        return bench_cpu.run_varlen(quick, 0.0, device="cpu", backend="cpp")
    with cudnn_tf32(False):
        return bench_cpu.run_varlen(
            quick,
            None,
            device=device,
            backend="cuda",
            timer=lambda calls, _budget: time_interleaved_cuda(calls, rounds, warmup),
        )


class cudnn_tf32:
    """Within the block, cuDNN may (True) or may not (False) round float32 to TF32."""

    def __init__(self, allowed):
        self.allowed = allowed

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.allowed

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32 = self.saved


def bench_one(B, H, T, rounds, warmup):
    torch.manual_seed(0)
    I = H
    cudnn = torch.nn.RNN(I, H, 1).cuda()
    fused = fused_bptt.FusedRNN.from_rnn(cudnn, backend="cuda")
    x = torch.randn(T, B, I, device="cuda")
    h0 = torch.zeros(1, B, H, device="cuda")
    grad = torch.randn(T, B, H, device="cuda")

    def forward(model, tf32=False):
        def run():
            with cudnn_tf32(tf32):
                model(x, h0)

        return run

    def forward_backward(model, tf32=False):
        def run():
            with cudnn_tf32(tf32):
                out, _ = model(x, h0)
                out.backward(grad)

        return run

    # Same answer first: a benchmark of a wrong kernel is worthless (cuDNN without TF32).
    with torch.no_grad(), cudnn_tf32(False):
        out_f, out_c = fused(x, h0)[0], cudnn(x, h0)[0]
    err = (out_f - out_c).abs().max().item()

    runs = {
        "fused_fwd": forward(fused),
        "cudnn_fwd": forward(cudnn, True),
        "cudnn_fp32_fwd": forward(cudnn),
        "fused_fwdbwd": forward_backward(fused),
        "cudnn_fwdbwd": forward_backward(cudnn, True),
        "cudnn_fp32_fwdbwd": forward_backward(cudnn),
    }
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            time_ms(fn, times[k], warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {
        k: f"{med[f'cudnn{c}_{m}'] / med[f'fused_{m}']:.3f}"
        for k, c, m in [
            ("fwd_speedup", "", "fwd"),
            ("fwdbwd_speedup", "", "fwdbwd"),
            ("fwd_speedup_fp32", "_fp32", "fwd"),
            ("fwdbwd_speedup_fp32", "_fp32", "fwdbwd"),
        ]
    }
    return dict(
        B=B,
        H=H,
        T=T,
        I=I,
        max_abs_diff_vs_cudnn=f"{err:.2e}",
        **{f"{k}_ms": f"{v:.4f}" for k, v in med.items()},
        **ratio,
        fused_fwd_us_per_step=f"{1000 * med['fused_fwd'] / T:.2f}",
        fused_fwdbwd_us_per_step=f"{1000 * med['fused_fwdbwd'] / T:.2f}",
        cudnn_fwdbwd_us_per_step=f"{1000 * med['cudnn_fwdbwd'] / T:.2f}",
    )


def plot(rows, path, device):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no PNG written ({path}); the CSV has every number.")
        return
    Ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(Ts), figsize=(6 * len(Ts), 4.5), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for B in sorted({r["B"] for r in rows}):
            sel = [r for r in rows if r["T"] == T and r["B"] == B]
            hs = [r["H"] for r in sel]
            ax.plot(hs, [float(r["fwdbwd_speedup"]) for r in sel], marker="o", label=f"B={B}")
            ax.plot(
                hs,
                [float(r["fwdbwd_speedup_fp32"]) for r in sel],
                marker="x",
                ls=":",
                color=ax.lines[-1].get_color(),
                label=f"B={B}, cuDNN without TF32",
            )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(2.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size H (I = H)")
        ax.set_ylabel("cuDNN time / fused time, forward + backward")
        ax.legend(fontsize=7)
        ax.set_title(f"T = {T}, fp32, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="one configuration, a smoke run")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before each timed one")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--varlen-only", action="store_true", help="only the two boundary rows")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    if "cuda" not in fused_bptt.available_backends():
        sys.exit(
            "fused_bptt has no CUDA backend here: build it with bench/gpu.sh "
            "(FORCE_CUDA=1 python setup.py build_ext --inplace)"
        )
    device = torch.cuda.get_device_name()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    if args.quick:
        Bs, Hs, Ts = [8], [256], [64]
    else:
        Bs, Hs, Ts = [1, 8, 32, 128], [128, 256, 512, 1024], [64, 256]
    path_env = os.environ.get("FUSED_BPTT_CUDA_PATH", "auto")
    print(
        f"device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}; fused path: {path_env}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if path_env == "auto" else f"_{path_env}"
    quick = "_quick" if args.quick else ""
    if not args.varlen_only:
        bench_grid(args, Bs, Hs, Ts, device, path_env, out / f"gpu_{tag}{suffix}{quick}.csv")
    lines = run_varlen(args.quick, args.rounds, args.warmup)
    varlen_path = out / f"gpu_{tag}{suffix}{quick}_varlen.txt"
    varlen_path.write_text(f"{device}, fused path {path_env}\n" + "\n".join(lines) + "\n")
    print(f"wrote {varlen_path}")


def bench_grid(args, Bs, Hs, Ts, device, path_env, csv_path):
    """The B x H x T grid against cuDNN: prints a table, writes csv_path and its PNG."""
    print("x: cuDNN time / fused time (cuDNN with TF32, its default; fp32: without)")
    print(
        f"{'B':>4} {'H':>5} {'T':>4} | {'fwd ms':>8} {'cuDNN':>8} {'x':>5} {'fp32':>5} | "
        f"{'f+b ms':>8} {'cuDNN':>8} {'x':>5} {'fp32':>5} | {'us/step f+b':>11}"
    )
    rows = []
    for T in Ts:
        for H in Hs:
            for B in Bs:
                r = bench_one(B, H, T, args.rounds, args.warmup)
                r.update(device=device, path=path_env)
                rows.append(r)
                print(
                    f"{B:>4} {H:>5} {T:>4} | {r['fused_fwd_ms']:>8} {r['cudnn_fwd_ms']:>8} "
                    f"{r['fwd_speedup']:>5} {r['fwd_speedup_fp32']:>5} | "
                    f"{r['fused_fwdbwd_ms']:>8} {r['cudnn_fwdbwd_ms']:>8} "
                    f"{r['fwdbwd_speedup']:>5} {r['fwdbwd_speedup_fp32']:>5} | "
                    f"{r['fused_fwdbwd_us_per_step']:>11}",
                    flush=True,
                )
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    plot(rows, csv_path.with_suffix(".png"), device)


if __name__ == "__main__":
    main()

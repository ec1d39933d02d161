"""CPU benchmark of fused_bptt against torch.nn.RNN: time, speedup, memory saved for backward.

    python bench/bench_cpu.py                    # full sweep, a few minutes on 2 cores
    python bench/bench_cpu.py --dtype bfloat16   # the same in bfloat16 (or float16)
    python bench/bench_cpu.py --quick            # smoke run of a few seconds (numbers not judged)

One layer, input_size = hidden_size, time-major x [T, B, H], every tensor in --dtype (default
float32). Each point is timed for
    cpp        fused_bptt.FusedRNN(..., backend="cpp")    the user-facing path
    ops        torch.ops.fused_bptt.rnn_forward/backward  the raw ops (cpp - ops = Python layer)
    reference  fused_bptt.FusedRNN(..., backend="reference")
    nn         torch.nn.RNN with the same weights
and, for bfloat16 and float16,
    cpp_float32  FusedRNN in float32 with the same weights (the low precision's own gain)
in two modes: "fwd" (forward under torch.no_grad()) and "fwd+bwd" (forward, then the gradients of
y.sum() + h_n.sum() for x, h0 and the weights, so y and h_n both feed the loss). The
implementations are interleaved call by call and each gets the median of its repeats.

Writes bench/results/cpu_bench.csv, cpu_time_vs_H.png and cpu_speedup_vs_H.png (one line per B)
and cpu_summary.txt (for bfloat16 and float16: cpu_bench_bfloat16.csv and so on); prints
progress, and last that summary: the four target shapes (ratio = nn time / cpp time), the memory
saved for backward, the GFLOP/s at large H against the machine's GEMM rates, and the machine.
Benchmarks report; they never assert speed.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_util import import_fused_bptt, require_cpp_backend, save_figure, write_csv  # noqa: E402

fused_bptt = import_fused_bptt("bench_cpu")

IMPLS = ("cpp", "ops", "reference", "nn")
LOW_PRECISION_IMPLS = IMPLS + ("cpp_float32",)
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (T, B, H): must reach, aim (ratio nn / cpp, forward + backward), from the project's targets;
# bfloat16's from issue 10, which float16 is held to as well.
TARGETS = {
    torch.float32: [  # the drop-in issue's (0.1.0's were 6 / 2.5 / 1.4 / 1.05)
        ((256, 8, 64), 12.0, 15.0),
        ((128, 16, 128), 4.5, 5.0),
        ((64, 32, 256), 1.6, 2.0),
        ((32, 64, 1024), 1.15, 1.3),
    ],
    torch.bfloat16: [
        ((256, 8, 64), 6.0, 12.0),
        ((128, 16, 128), 2.5, 5.0),
        ((64, 32, 256), 1.4, 2.0),
        ((32, 64, 1024), 1.1, 1.5),
    ],
}
TARGETS[torch.float16] = TARGETS[torch.bfloat16]
# Low precision at the largest target shape: FusedRNN float32 time / its time must reach this.
LOW_PRECISION_GAIN_TARGET = 2.0


def impls_for(dtype):
    return IMPLS if dtype == torch.float32 else LOW_PRECISION_IMPLS


def make_models(H, dtype=torch.float32, seed=0):
    """nn.RNN and FusedRNN on each backend, with the same weights, in `dtype`; for bfloat16 and
    float16 also "cpp_float32": FusedRNN in float32 with those (rounded) weights."""
    torch.manual_seed(seed)
    nn_rnn = torch.nn.RNN(H, H).to(dtype)
    models = {}
    for backend in ("cpp", "reference"):
        models[backend] = fused_bptt.FusedRNN(H, H, backend=backend).to(dtype)
    models["nn"] = nn_rnn
    if dtype != torch.float32:
        models["cpp_float32"] = fused_bptt.FusedRNN(H, H, backend="cpp")
    for m in models.values():
        m.load_state_dict(nn_rnn.state_dict())  # (copies convert to each model's dtype)
    return models


def make_calls(T, B, H, dtype=torch.float32):
    """{impl: {mode: zero-argument callable}} for one shape."""
    models = make_models(H, dtype)
    x = torch.randn(T, B, H).to(dtype).requires_grad_()
    h0 = torch.randn(1, B, H).to(dtype).requires_grad_()
    calls = {}
    for name, model in models.items():
        params = list(model.parameters())
        xs, h0s = (
            (x, h0)
            if name != "cpp_float32"
            else [t.detach().float().requires_grad_() for t in (x, h0)]
        )

        def fwd(model=model, xs=xs, h0s=h0s):
            with torch.no_grad():
                model(xs, h0s)

        def fwd_bwd(model=model, params=params, xs=xs, h0s=h0s):
            y, h_n = model(xs, h0s)
            torch.autograd.grad(y.sum() + h_n.sum(), [xs, h0s, *params])

        calls[name] = {"fwd": fwd, "fwd+bwd": fwd_bwd}

    w_ih, w_hh, b_ih, b_hh = [p.detach() for p in models["cpp"].parameters()]
    xd, h0d = x.detach(), h0.detach()[0]
    grad_y = torch.ones(T, B, H, dtype=dtype)
    grad_y[-1] += 1  # h_n = y[T-1] feeds the loss too
    ops = torch.ops.fused_bptt

    def ops_fwd():
        return ops.rnn_forward(xd, h0d, w_ih, w_hh, b_ih, b_hh, False)

    def ops_fwd_bwd():
        ops.rnn_backward(grad_y, xd, h0d, w_ih, w_hh, ops_fwd(), False)

    calls["ops"] = {"fwd": ops_fwd, "fwd+bwd": ops_fwd_bwd}
    return calls


def time_interleaved(calls, budget_s, min_reps=3, max_reps=25, block=3, cold=None, samples=None):
    """Median seconds per implementation over rounds in which each one makes `block` calls in a
    row, the order rotating from round to round so that drift and neighbours hit all alike.

    The first call of a block follows another implementation's calls: its caches, branch
    predictors and idle worker threads hold that one's state ("cold"; after a 10 ms nn.RNN call
    it costs a 1 ms FusedRNN call about 0.2 ms more). The later calls run as in a training loop
    that calls the layer chunk after chunk ("steady"): the median of those is returned, the same
    rule for every implementation. `cold`, a dict if given, receives the first calls' medians;
    `samples`, a dict if given, the number of steady calls behind each median."""
    for f in calls.values():  # warm-up (allocator, MKL, first-call dispatch)
        f()
    one = max(sum(_timed(f) for f in calls.values()), 1e-6) * block
    reps = int(min(max_reps, max(min_reps, budget_s / one)))
    names = list(calls)
    steady = {name: [] for name in names}
    first = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            first[name].append(_timed(calls[name]))
            steady[name].extend(_timed(calls[name]) for _ in range(block - 1))
    if cold is not None:
        cold.update({name: statistics.median(s) for name, s in first.items()})
    if samples is not None:
        samples.update({name: len(s or first[name]) for name, s in steady.items()})
    return {name: statistics.median(s or first[name]) for name, s in steady.items()}


def _timed(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def saved_for_backward(model, T, B, H, dtype=torch.float32):
    """Memory a forward leaves for backward, in units of one [T, B, H] tensor of `dtype`:
    (all it allocated and did not free, the part of that beyond the outputs y and h_n).

    Read from the CPU allocator's own accounting through the profiler, so it counts what is
    really kept, whichever way a graph node holds it (x, h0 and the weights exist before the
    call and are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(T, B, H).to(dtype).requires_grad_()
    h0 = torch.randn(1, B, H).to(dtype).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y, h_n = model(x, h0)
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    outputs = y.untyped_storage().nbytes() + h_n.untyped_storage().nbytes()
    unit = T * B * H * x.element_size()
    return kept / unit, (kept - outputs) / unit


def sgemm_gflops(n=2048, threads=None, dtype=torch.float32):
    """The machine's GEMM rate (torch.mm: MKL for float32, oneDNN for bfloat16 in the CPU wheel),
    with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        seconds = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / seconds / 1e9


def flops_fwd_bwd(T, B, H):
    """Multiply-adds x2 of the six [T*B, H] x [H, H] products of one forward + backward."""
    return 6 * 2 * T * B * H * H


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_sweep(points, budget_s, rows, dtype=torch.float32, budgets=None):
    """Times every shape of `points` in both modes; `budgets` maps a shape to its own time budget
    (the target shapes get more rounds than the sweep: their ratios are the verdicts)."""
    impls = impls_for(dtype)
    budgets = budgets or {}
    for i, (T, B, H) in enumerate(points):
        calls = make_calls(T, B, H, dtype)
        budget = budgets.get((T, B, H), budget_s)
        max_reps = 25 if budget <= budget_s else 250  # a bigger budget, more rounds
        for mode in MODES:
            cold, samples = {}, {}
            med = time_interleaved(
                {n: calls[n][mode] for n in impls},
                budget,
                max_reps=max_reps,
                cold=cold,
                samples=samples,
            )
            for name in impls:
                rows.append(
                    dict(
                        T=T,
                        B=B,
                        H=H,
                        dtype=str(dtype).replace("torch.", ""),
                        mode=mode,
                        impl=name,
                        ms=med[name] * 1e3,
                        speedup_vs_nn=med["nn"] / med[name],
                        ms_cold=cold[name] * 1e3,
                        speedup_vs_nn_cold=cold["nn"] / cold[name],
                        samples=samples[name],
                    )
                )
            print(
                f"[{i + 1}/{len(points)}] T={T:4d} B={B:3d} H={H:5d} {mode:8s} "
                + "  ".join(f"{n} {med[n] * 1e3:8.3f} ms" for n in impls)
                + f"  nn/cpp {med['nn'] / med['cpp']:5.2f}x"
                + f" (cold {cold['nn'] / cold['cpp']:5.2f}x, {samples['cpp']} calls each)",
                flush=True,
            )


STYLES = {"cpp": "-o", "ops": "-.^", "reference": ":x", "nn": "--s", "cpp_float32": "-d"}


def plot(rows, T, out_dir, suffix=""):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no PNG plots", flush=True)
        return []
    paths = []
    sweep = [r for r in rows if r["T"] == T]
    for kind, ylabel in (("time", "time per call [ms]"), ("speedup", "torch.nn.RNN time / time")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, mode in zip(axes, MODES):
            for B in sorted({r["B"] for r in sweep}):
                for impl, style in STYLES.items():
                    if kind == "speedup" and impl == "nn":
                        continue
                    pts = sorted(
                        (r["H"], r["ms"] if kind == "time" else r["speedup_vs_nn"])
                        for r in sweep
                        if r["B"] == B and r["mode"] == mode and r["impl"] == impl
                    )
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{impl} B={B}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if kind == "speedup":
                ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_title(f"{mode}, T={T}, {sweep[0]['dtype']}, {torch.get_num_threads()} threads")
            ax.set_xlabel("hidden size H (= input size)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        path = os.path.join(out_dir, f"cpu_{kind}_vs_H{suffix}.png")
        save_figure(fig, path, dpi=110)
        paths.append(path)
    return paths


def lookup(rows, shape, mode, impl):
    T, B, H = shape
    return next(
        r for r in rows if (r["T"], r["B"], r["H"], r["mode"], r["impl"]) == (T, B, H, mode, impl)
    )


def _verdict(ratio, quick, must, aim=None):
    """AIM / PASS / FAIL against the targets; n/a for a --quick run (its shapes are not the
    targets')."""
    if quick:
        return "n/a"
    if aim is not None and ratio >= aim:
        return "AIM"
    return "PASS" if ratio >= must else "FAIL"


def _target_lines(rows, targets, quick, name):
    """The header and one line per target shape: fwd+bwd and fwd, nn.RNN vs cpp and the raw ops
    (the targets, and so the verdict, are forward + backward's)."""
    lines = [
        "\n" + "=" * 100,
        f"fused_bptt CPU benchmark, {name}: ratio = torch.nn.RNN time / FusedRNN(backend='cpp') "
        "time (median of steady calls, interleaved; see time_interleaved)",
        "ops ratio = the same for the raw ops (torch.ops.fused_bptt.*, no Python layer, no "
        "autograd); cold = the ratio of the first calls after another implementation's; "
        "calls = steady calls per implementation behind each fwd+bwd median",
        f"{'T/B/H':>14} {'fwd+bwd nn ms':>13} {'cpp ms':>8} {'ratio':>6} {'must':>5} {'aim':>5} "
        f"{'verdict':>8} {'ops ratio':>9} {'cold':>5} {'calls':>5} | {'fwd nn ms':>9} "
        f"{'cpp ms':>8} {'ratio':>6} {'ops ratio':>9} {'cold':>5}",
    ]
    for shape, must, aim in targets:
        fb = {i: lookup(rows, shape, "fwd+bwd", i) for i in ("nn", "cpp", "ops")}
        fo = {i: lookup(rows, shape, "fwd", i) for i in ("nn", "cpp", "ops")}
        r_fb, r_fo = fb["cpp"]["speedup_vs_nn"], fo["cpp"]["speedup_vs_nn"]
        lines.append(
            f"{'/'.join(map(str, shape)):>14} {fb['nn']['ms']:13.3f} {fb['cpp']['ms']:8.3f} "
            f"{r_fb:6.2f} {must:5.2f} {aim:5.2f} {_verdict(r_fb, quick, must, aim):>8} "
            f"{fb['ops']['speedup_vs_nn']:9.2f} {fb['cpp']['speedup_vs_nn_cold']:5.2f} "
            f"{fb['cpp']['samples']:5d} | "
            f"{fo['nn']['ms']:9.3f} {fo['cpp']['ms']:8.3f} {r_fo:6.2f} "
            f"{fo['ops']['speedup_vs_nn']:9.2f} {fo['cpp']['speedup_vs_nn_cold']:5.2f}"
        )
    return lines


def _low_precision_gain_line(rows, targets, quick, name):
    """FusedRNN float32 time / its time in bfloat16 or float16 at the largest target shape."""
    shape = targets[-1][0]
    gain = (
        lookup(rows, shape, "fwd+bwd", "cpp_float32")["ms"]
        / lookup(rows, shape, "fwd+bwd", "cpp")["ms"]
    )
    return (
        f"FusedRNN float32 time / {name} time at T/B/H={'/'.join(map(str, shape))} fwd+bwd: "
        f"{gain:.2f}x (target {LOW_PRECISION_GAIN_TARGET:.1f}x) "
        f"{_verdict(gain, quick, LOW_PRECISION_GAIN_TARGET)}"
    )


def _slower_and_memory_lines(rows, mem, name):
    """The points where cpp loses to nn.RNN, and the memory each keeps for backward."""
    slower = [r for r in rows if r["impl"] == "cpp" and r["speedup_vs_nn"] < 1.0]
    (T, B, H), kept = mem
    return [
        f"points where cpp is slower than nn.RNN: {len(slower)}"
        + "".join(
            f"\n  T={r['T']} B={r['B']} H={r['H']} {r['mode']}: {r['speedup_vs_nn']:.2f}x"
            for r in slower
        ),
        f"kept for backward at T/B/H={T}/{B}/{H} (allocator accounting), in units of [T,B,H] "
        f"{name}: "
        + "; ".join(
            f"{impl} {tot:.2f} allocated and kept by the forward, {extra:.2f} beyond y and h_n"
            for impl, (tot, extra) in kept.items()
        ),
    ]


def _gemm_rate_lines(rows, targets, gemm_rate, name, lowp_gemm_rate):
    """GFLOP/s at the largest target shape against the machine's GEMM rates, and a warning when
    those rates show that other processes share the cores."""
    shape = targets[-1][0]
    cpp = lookup(rows, shape, "fwd+bwd", "cpp")
    rate = flops_fwd_bwd(*shape) / (cpp["ms"] * 1e-3) / 1e9
    nn_rate = rate * cpp["ms"] / lookup(rows, shape, "fwd+bwd", "nn")["ms"]
    before, after, one = gemm_rate
    best = max(before, after)
    lines = [
        f"GFLOP/s at T/B/H={'/'.join(map(str, shape))} fwd+bwd (6 GEMM-sized products): "
        f"cpp {rate:.0f}, nn.RNN {nn_rate:.0f}; machine sgemm (torch.mm, square) before/after "
        f"the sweep: {before:.0f}/{after:.0f} -> cpp at {100 * rate / best:.0f}% "
        f"(1 thread: {one:.0f})"
        + (f"; {name} GEMM (torch.mm, square): {lowp_gemm_rate:.0f}" if lowp_gemm_rate else "")
    ]
    threads = torch.get_num_threads()
    if min(before, after) < 0.8 * best or (threads > 1 and best < 0.7 * threads * one):
        lines.append(
            "WARNING: the sgemm rate changed during the run or does not scale with the threads: "
            "other processes share these cores; rerun for trustworthy numbers"
        )
    return lines


def _machine_lines(load_before):
    return [
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch.get_num_threads()="
        f"{torch.get_num_threads()}, torch {torch.__version__}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, python {platform.python_version()}",
        f"load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        "(other processes on the cores distort every number)",
    ]


def print_summary(
    rows,
    targets,
    quick,
    mem,
    gemm_rate,
    load_before,
    path,
    dtype=torch.float32,
    lowp_gemm_rate=None,
):
    """Prints the final table and writes the same lines to `path`."""
    name = str(dtype).replace("torch.", "")
    lines = _target_lines(rows, targets, quick, name)
    if dtype != torch.float32:
        lines.append(_low_precision_gain_line(rows, targets, quick, name))
    lines += _slower_and_memory_lines(rows, mem, name)
    lines += _gemm_rate_lines(rows, targets, gemm_rate, name, lowp_gemm_rate)
    lines += _machine_lines(load_before)
    text = "\n".join(lines)
    print(text, flush=True)
    with open(path, "w") as f:
        f.write(text.lstrip("\n") + "\n")


# FusedRNN's own cost per call (the drop-in issue): at most this, in microseconds.
PER_CALL_MUST_US = 20.0


def per_call_cost(quick):
    """FusedRNN's own cost per call: its forward (with grad, the eager training path) at T/B/H =
    1/1/4, where the arithmetic is nothing, against the C++ autograd op it runs, called as
    torch.ops.fused_bptt.rnn_layer; torch.nn.RNN against its op (_VF.rnn_tanh) beside it.
    FusedRNN calls that op through fused_bptt._C.rnn_layer (csrc/eager_call.cpp: the dispatcher
    without torch.ops' argument parsing), timed too, so the line also gives what the Python
    layer costs over that call. Best of 15 blocks of 2,000 calls, the five alternating block by
    block (on a noisy machine the best block of each is the one least disturbed). Returns the
    summary line."""
    blocks, calls = (2, 200) if quick else (15, 2000)
    x = torch.randn(1, 1, 4, requires_grad=True)
    h0 = torch.randn(1, 1, 4, requires_grad=True)
    nn_rnn = torch.nn.RNN(4, 4)
    fused = fused_bptt.FusedRNN.from_rnn(nn_rnn, backend="cpp")
    weights = list(fused.parameters())
    rnn_layer = torch.ops.fused_bptt.rnn_layer.default
    direct = fused_bptt.module._rnn_layer_op()  # what FusedRNN calls
    fns = {
        "FusedRNN": lambda: fused(x, h0),
        "torch.ops": lambda: rnn_layer(x, h0, *weights, False, None, None),
        "direct": lambda: direct(x, h0, *weights, False, None, None),
        "nn.RNN": lambda: nn_rnn(x, h0),
        "_VF": lambda: torch._VF.rnn_tanh(
            x, h0, nn_rnn._flat_weights, True, 1, 0.0, True, False, False
        ),
    }
    best = {name: float("inf") for name in fns}
    for _ in range(blocks):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
    own, nn_own = best["FusedRNN"] - best["torch.ops"], best["nn.RNN"] - best["_VF"]
    verdict = "n/a" if quick else ("PASS" if own <= PER_CALL_MUST_US else "FAIL")
    return (
        f"per call at T/B/H=1/1/4, forward with grad (best of {blocks} x {calls:,} calls): "
        f"FusedRNN {best['FusedRNN']:.1f} us, its op through torch.ops {best['torch.ops']:.1f} "
        f"us -> its own cost {own:.1f} us (must <= {PER_CALL_MUST_US:.0f}: {verdict}); "
        f"FusedRNN calls the op through fused_bptt._C.rnn_layer, {best['direct']:.1f} us, so "
        f"its Python layer costs {best['FusedRNN'] - best['direct']:.1f} us; nn.RNN "
        f"{best['nn.RNN']:.1f} us, _VF.rnn_tanh {best['_VF']:.1f} us -> {nn_own:.1f} us"
    )


# Boundaries inside a batch (issue 9): (T, B, H) and must / aim ratios, fwd+bwd.
VARLEN_RESETS = ((128, 64, 256), 5.0, 8.0)  # FusedRNN(resets) vs the per-step nn.RNN loop
VARLEN_PACKED = ((64, 32, 256), 1.4, None)  # FusedRNN vs nn.RNN on one PackedSequence


def run_varlen(quick, budget_s, device="cpu", backend="cpp", timer=None):
    """Side by side, fwd+bwd, float32: FusedRNN with ~1% resets against the per-step loop users
    write today (zero the state, one nn.RNN call per step), and FusedRNN against nn.RNN on the
    same PackedSequence (lengths uniform in [T/4, T]). Returns the summary lines.
    bench_gpu.py runs the same rows on a GPU: device="cuda", backend="cuda", and a timer of its
    own (timer(calls, budget_s) -> median seconds per name; default time_interleaved)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    timer = timer or time_interleaved
    lines = []
    g = torch.Generator().manual_seed(0)
    (T, B, H), must, aim = VARLEN_RESETS
    if quick:
        T, B, H = 8, 4, 16
    nn_rnn = torch.nn.RNN(H, H).to(device)
    fused = fused_bptt.FusedRNN.from_rnn(nn_rnn, backend=backend)
    x = torch.randn(T, B, H, generator=g).to(device).requires_grad_()
    resets = (torch.rand(T, B, generator=g) < 0.01).to(device)
    keep = (~resets).unsqueeze(-1).float()

    def loop():
        h, ys = torch.zeros(1, B, H, device=device), []
        for t in range(T):
            y, h = nn_rnn(x[t : t + 1], h * keep[t])
            ys.append(y)
        (torch.cat(ys).sum() + h.sum()).backward()

    def fused_resets():
        y, h = fused(x, resets=resets)
        (y.sum() + h.sum()).backward()

    ms = timer({"fused": fused_resets, "loop": loop}, budget_s)
    lines.append(
        f"resets  T/B/H={T}/{B}/{H} ~1% resets, fwd+bwd: FusedRNN {ms['fused'] * 1e3:.1f} ms,"
        f" per-step nn.RNN loop {ms['loop'] * 1e3:.1f} ms, ratio "
        f"{ms['loop'] / ms['fused']:.2f}x (must {must}x, aim {aim}x)"
    )
    (T, B, H), must, _ = VARLEN_PACKED
    if quick:
        T, B, H = 8, 4, 16
    nn_rnn = torch.nn.RNN(H, H).to(device)
    fused = fused_bptt.FusedRNN.from_rnn(nn_rnn, backend=backend)
    # lengths stay on the CPU: pack_padded_sequence wants them there.
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    xp = torch.randn(T, B, H, generator=g).to(device).requires_grad_()

    def packed_call(model):
        def f():
            out, h = model(pack_padded_sequence(xp, lengths, enforce_sorted=False))
            (out.data.sum() + h.sum()).backward()

        return f

    ms = timer({"fused": packed_call(fused), "nn": packed_call(nn_rnn)}, budget_s)
    lines.append(
        f"packed  T/B/H={T}/{B}/{H} lengths in [{T // 4}, {T}], fwd+bwd: FusedRNN "
        f"{ms['fused'] * 1e3:.1f} ms, nn.RNN {ms['nn'] * 1e3:.1f} ms, ratio "
        f"{ms['nn'] / ms['fused']:.2f}x (must {must}x)"
    )
    for line in lines:
        print(line, flush=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run, a few seconds")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of every tensor (default float32)",
    )
    p.add_argument(
        "--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    )
    p.add_argument(
        "--varlen-only",
        action="store_true",
        help="only the resets / PackedSequence rows (run_varlen)",
    )
    args = p.parse_args(argv)
    require_cpp_backend("bench_cpu")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.varlen_only:
        run_varlen(args.quick, 0.02 if args.quick else 2.0)
        return
    dtype = DTYPES[args.dtype]
    suffix = "" if dtype == torch.float32 else f"_{args.dtype}"  # float32 keeps its file names
    load_before = os.getloadavg()[0]
    gemm_n = 512 if args.quick else 2048
    gemm_one = sgemm_gflops(gemm_n, threads=1)
    gemm_before = sgemm_gflops(gemm_n)
    if args.quick:
        sweep_T, budget, target_budget = 16, 0.02, 0.02
        targets = [
            ((max(1, T // 8), B, H), must, aim) for (T, B, H), must, aim in TARGETS[dtype][:3]
        ]
        grid = [(sweep_T, 4, 32), (sweep_T, 16, 64)]
        extra_T = []
    else:
        # The sweep's shapes get 0.4 s each; the target shapes, whose ratios are the verdicts,
        # 3 s each (at 128/16/128 fwd+bwd about 15 rounds, 30 steady calls per implementation,
        # where 0.4 s gave 3 rounds: on a noisy VM five runs then spanned 3.7-5.6x).
        sweep_T, budget, target_budget = 64, 0.4, 3.0
        targets = TARGETS[dtype]
        grid = [(sweep_T, B, H) for B in (8, 32) for H in (64, 128, 256, 512, 1024)]
        extra_T = [(T, 16, 128) for T in (32, 512)]
    points = list(dict.fromkeys(grid + extra_T + [s for s, _, _ in targets]))
    print(
        f"fused_bptt CPU benchmark, {args.dtype}: {len(points)} shapes x {MODES} x "
        f"{impls_for(dtype)}, {torch.get_num_threads()} threads",
        flush=True,
    )
    rows = []
    run_sweep(points, budget, rows, dtype, {s: target_budget for s, _, _ in targets})
    csv_path = os.path.join(args.out_dir, f"cpu_bench{suffix}.csv")
    write_csv(csv_path, rows)
    plots = plot(rows, sweep_T, args.out_dir, suffix)
    mem_shape = targets[2][0]
    models = make_models(mem_shape[2], dtype)
    mem = (mem_shape, {n: saved_for_backward(models[n], *mem_shape, dtype) for n in ("cpp", "nn")})
    gemm_rate = (gemm_before, sgemm_gflops(gemm_n), gemm_one)
    lowp_rate = sgemm_gflops(gemm_n, dtype=dtype) if dtype != torch.float32 else None
    print(f"wrote {csv_path} " + " ".join(plots))
    print_summary(
        rows,
        targets,
        args.quick,
        mem,
        gemm_rate,
        load_before,
        os.path.join(args.out_dir, f"cpu_summary{suffix}.txt"),
        dtype,
        lowp_rate,
    )
    if dtype != torch.float32:  # (the boundary rows compare float32 workarounds)
        return
    per_call = per_call_cost(args.quick)
    print(per_call, flush=True)
    varlen = run_varlen(args.quick, 0.02 if args.quick else 2.0)
    with open(os.path.join(args.out_dir, "cpu_summary.txt"), "a") as f:
        f.write(per_call + "\n")
        f.write("\nBoundaries (FusedRNN vs what users run today):\n" + "\n".join(varlen) + "\n")


if __name__ == "__main__":
    main()

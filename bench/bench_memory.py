"""Peak memory and time of full-sequence BPTT: plain (one graph over all T steps) against
fused_bptt.checkpointed_bptt (exact, O(sqrt(T)) activations), on FusedRNN + a linear readout.

Shape: B / I / H = 16 / 4 / 256, float32, one layer, loss = the MSE over all T steps
(reduction "sum" / (T * B), so the segments' losses add up to it).

Memory method (bench_util.PeakMemory): every point runs in a fresh Python process (so that no
allocator cache from an earlier point counts). The process builds the model and the data (x,
target), runs the method once on 500 steps (threads, lazy initialisation), then reads its
resident set size (VmRSS), resets the kernel's peak-RSS mark (writing 5 to
/proc/self/clear_refs) and runs one forward + backward of the method over all T steps; the
figure is VmHWM - that VmRSS: the peak resident memory of the process above the start,
everything included (tensors, autograd graph, allocator slack), the input and target data
excluded. Linux only.

Time: one process per T runs both methods alternately (plain, checkpointed, ...) for --rounds
rounds after a warm-up and reports the median time of each and their ratio.

Outputs under --out: memory.csv, memory_time.csv, memory.png, memory.txt.

    python bench/bench_memory.py                     # a few minutes, T up to 256,000
    python bench/bench_memory.py --max-T 1000000     # adds T = 10^6 for checkpointed (+3 min)
    python bench/bench_memory.py --threads 1         # on a busy machine: 2 OpenMP threads
                                                     # stall when the other core is taken
    python bench/bench_memory.py --quick          # seconds (the tests call it)
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util  # noqa: E402

fused_bptt = bench_util.import_fused_bptt("bench_memory")
from fused_bptt import FusedRNN, RNNWithHead, checkpointed_bptt  # noqa: E402

PLAIN_TS = [1000, 2000, 4000, 8000, 16000, 32000]
CHECKPOINTED_TS = PLAIN_TS + [64000, 128000, 256000, 1000000]
TIME_TS = [2000, 8000, 32000]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--inputs", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument(
        "--max-T",
        type=int,
        default=256000,
        help="largest T measured; 1000000 adds T = 10^6 for checkpointed (minutes)",
    )
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per T")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--worker", choices=["memory", "time"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    p.add_argument("--T", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.hidden, args.rounds = 4, 32, 1
        args.plain_ts, args.checkpointed_ts, args.time_ts = [400], [1600], [400]
    else:
        args.plain_ts = [t for t in PLAIN_TS if t <= args.max_T]
        args.checkpointed_ts = [t for t in CHECKPOINTED_TS if t <= args.max_T]
        args.time_ts = [t for t in TIME_TS if t <= args.max_T]
    return args


# ---- one measurement, in a worker process ------------------------------------------------------


def setup(args, length):
    torch.manual_seed(0)
    model = RNNWithHead(FusedRNN(args.inputs, args.hidden), nn.Linear(args.hidden, 1))
    x = torch.randn(length, args.batch, args.inputs)
    target = torch.randn(length, args.batch, 1)
    return model, x, target


def run(method, model, x, target):
    """One forward + backward over all of x; the loss is the mean over all steps."""
    count = target.numel()

    def loss_fn(pred, tgt):
        return F.mse_loss(pred, tgt, reduction="sum") / count

    model.zero_grad(set_to_none=True)
    if method == "plain":
        pred, _ = model(x, None)
        loss = loss_fn(pred, target)
        loss.backward()
        return loss.detach()
    return checkpointed_bptt(model, x, target, loss_fn)


def memory_worker(args):
    model, x, target = setup(args, args.T)
    run(args.method, model, x[:500], target[:500])
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with bench_util.PeakMemory() as peak:
        run(args.method, model, x, target)
    return {
        "method": args.method,
        "T": args.T,
        "peak_mib": peak.mib,
        "seconds": time.perf_counter() - t0,
        "data_mib": (x.nbytes + target.nbytes) / 2**20,
    }


def time_worker(args):
    model, x, target = setup(args, args.T)
    times = {"plain": [], "checkpointed": []}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for method in times:
            t0 = time.perf_counter()
            run(method, model, x, target)
            if round_index:
                times[method].append(time.perf_counter() - t0)
    plain, ckpt = (statistics.median(times[m]) for m in ("plain", "checkpointed"))
    ratios = [c / p for p, c in zip(times["plain"], times["checkpointed"])]
    return {
        "T": args.T,
        "plain_s": plain,
        "checkpointed_s": ckpt,
        "ratio": ckpt / plain,
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "rounds": args.rounds,
    }


# ---- the driver ----------------------------------------------------------------------------------


# A line of progress per result of each worker.
PROGRESS = {
    "memory": "memory {method:12s} T={T:8d}: peak {peak_mib:9.1f} MiB above the start "
    "({seconds:.2f} s)",
    "time": "time T={T}: plain {plain_s:.3f} s, checkpointed {checkpointed_s:.3f} s, "
    "ratio {ratio:.2f}",
}


def spawn(args, worker, method, length):
    """Runs one measurement in a fresh process and prints its line of progress."""
    result = bench_util.run_worker(
        __file__,
        [
            "--worker",
            worker,
            "--T",
            str(length),
            "--batch",
            str(args.batch),
            "--inputs",
            str(args.inputs),
            "--hidden",
            str(args.hidden),
            "--rounds",
            str(args.rounds),
            "--threads",
            str(args.threads),
        ]
        + (["--method", method] if method else []),
        fused_bptt.__file__,
    )
    print(PROGRESS[worker].format(**result), flush=True)
    return result


def plot(path, args, rows, timing):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, style in (("plain", "o-"), ("checkpointed", "s-")):
        points = [r for r in rows if r["method"] == method]
        mem_ax.plot(
            [r["T"] for r in points],
            [r["peak_mib"] for r in points],
            style,
            label=f"{method} full BPTT",
        )
    mem_ax.set_xscale("log")
    mem_ax.set_yscale("log")
    mem_ax.set_xlabel("T (time steps)")
    mem_ax.set_ylabel("peak RSS above the start (MiB)")
    mem_ax.set_title(
        f"B/I/H = {args.batch}/{args.inputs}/{args.hidden} float32, FusedRNN + Linear", fontsize=9
    )
    mem_ax.grid(True, which="both", alpha=0.3)
    mem_ax.legend()
    ts = [r["T"] for r in timing]
    time_ax.plot(ts, [r["plain_s"] for r in timing], "o-", label="plain")
    time_ax.plot(ts, [r["checkpointed_s"] for r in timing], "s-", label="checkpointed")
    time_ax.set_xscale("log")
    time_ax.set_yscale("log")
    time_ax.set_xticks(ts, [f"{t:,}" for t in ts])
    time_ax.minorticks_off()
    time_ax.set_xlabel("T (time steps)")
    time_ax.set_ylabel("forward + backward (s), median")
    time_ax.set_title("time (measured alternately in one process)", fontsize=9)
    time_ax.grid(True, which="both", alpha=0.3)
    time_ax.legend()
    bench_util.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    with bench_util.torch_threads(args.threads):
        return _main(args)


def _main(args):
    if args.worker:
        return bench_util.worker_result(
            (memory_worker if args.worker == "memory" else time_worker)(args)
        )
    if not bench_util.peak_memory_supported():
        raise SystemExit(
            "bench_memory: measures peak RSS through /proc/self/clear_refs and "
            "VmHWM, which this system does not have (Linux only)"
        )
    bench_util.require_cpp_backend("bench_memory")
    out = bench_util.output_folder(args.out)
    start = time.perf_counter()
    rows = [
        spawn(args, "memory", method, length)
        for method, lengths in (("plain", args.plain_ts), ("checkpointed", args.checkpointed_ts))
        for length in lengths
    ]
    timing = [spawn(args, "time", None, length) for length in args.time_ts]
    peak = {(r["method"], r["T"]): r["peak_mib"] for r in rows}
    lines = [
        f"fused_bptt bench_memory: B/I/H = {args.batch}/{args.inputs}/{args.hidden}, "
        f"float32, FusedRNN (cpp) + Linear, loss = MSE over all T steps; "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}",
        "memory: peak resident set size above the start of one forward + backward over T "
        "steps, in a fresh process per point (VmHWM after clear_refs, minus VmRSS before; "
        "the data x and target are allocated before the start and not counted; "
        "checkpointed uses the default segment round(sqrt(T)))",
        bench_util.format_table(rows, float_format=".3f"),
    ]
    short, long = (2000 if 2000 in args.plain_ts else args.plain_ts[0]), args.plain_ts[-1]
    if ("checkpointed", long) in peak:
        lines.append(
            f"plain grows {peak['plain', long] / peak['plain', short]:.1f}x from "
            f"T={short} to T={long}; checkpointed at T={long} is "
            f"{100 * peak['checkpointed', long] / peak['plain', long]:.1f}% of plain "
            f"at T={long}"
        )
    lines += [
        f"time: forward + backward, both methods alternately in one process per T, "
        f"median of {args.rounds} rounds after a warm-up; ratio = checkpointed / plain "
        f"(min and max over rounds); load average at the end {os.getloadavg()[0]:.2f} (other "
        f"processes on the cores distort the times)",
        bench_util.format_table(
            timing, ["T", "plain_s", "checkpointed_s", "ratio", "ratio_min", "ratio_max"], ".3f"
        ),
        f"bench took {time.perf_counter() - start:.0f} s",
    ]
    text = "\n\n".join(lines)
    print("\n" + text)
    bench_util.write_csv(out / "memory.csv", rows)
    bench_util.write_csv(out / "memory_time.csv", timing)
    (out / "memory.txt").write_text(text + "\n")
    plot(out / "memory.png", args, rows, timing)
    print(f"wrote memory.csv, memory_time.csv, memory.txt, memory.png to {out}")
    return rows, timing


if __name__ == "__main__":
    main()

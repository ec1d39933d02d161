"""Long-range demo: a dependency of L = 200 steps in streams of 20,000, learned three ways.

Task (delayed recall of the last cue): every P = 250 steps a cue, its sign s = +-1 on input 0
and a 1 on input 1 (both 0 elsewhere). The target is the sign of the most recent cue, scored
only at the steps L or more after it (lags L .. P - 1); the loss is the MSE there. So no scored
step lies within L steps of the information it needs.

Model: a one-layer tanh FusedRNN (no biases) and a linear readout, initialised the same for
every method: W_hh = 0.99 I (a slowly leaking memory; biases are left out because that memory
would integrate them), the input weights random except those of the sign input, which start at
zero. The memory can therefore hold a sign from the start, but writing the cue into it has to
be learned, and only a gradient that spans the L steps from a scored step back to its cue
reaches those weights. (With a random sign-input weight the readout alone could learn to read
what the untrained memory holds; zero makes the test about long-range credit assignment.)

Three ways to train it, each on fresh batches of B streams of N = 20,000 steps:
    stateful TBPTT, k = 32          one update per 32 steps; no gradient spans L: the sign
                                    input weights get exactly zero gradient;
    TBPTT(k1 = 32, k2 = 256)        one update per 32 new steps, backpropagating through the
                                    last 256 (StatefulTBPTT(..., backprop=256));
    checkpointed full BPTT          one update per batch: the exact gradient of the whole
                                    20,000-step streams (checkpointed_bptt, default segment).
Reported per method: held-out accuracy of sign(prediction) at the scored steps (64 streams run
statefully from zeros; chance 0.5) during and after training, the gradient norm before clipping
of every update, time per update, and the peak memory of an update (peak RSS above the start, in
a fresh process per method, as in bench_memory.py; plain full BPTT over the same streams is
measured too, for comparison, though not trained). One seed. Outputs under --out:
long_range.csv, long_range_curves.csv, long_range.png, long_range.txt.

    python bench/long_range.py             # about four minutes on 2 idle CPU cores
    python bench/long_range.py --quick     # seconds (the tests call it)
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util  # noqa: E402

fused_bptt = bench_util.import_fused_bptt("long_range")
from fused_bptt import (  # noqa: E402
    FusedRNN,
    RNNWithHead,
    StatefulTBPTT,
    checkpointed_bptt,
    train_tbptt,
)

METHODS = ("tbptt", "tbptt_k1_k2", "checkpointed")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lag", type=int, default=200, help="L: the first scored step after a cue")
    p.add_argument("--period", type=int, default=250, help="P > L: steps between cues")
    p.add_argument("--length", type=int, default=20000, help="N: steps per training stream")
    p.add_argument("--streams", type=int, default=16, help="B: streams per batch")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--k", type=int, default=32, help="k1: new steps per TBPTT update")
    p.add_argument(
        "--k2",
        type=int,
        default=256,
        help="k2: steps each TBPTT(k1, k2) update backpropagates through",
    )
    p.add_argument(
        "--tbptt-batches",
        type=int,
        default=10,
        help="stream batches for each TBPTT method (N / k updates each)",
    )
    p.add_argument(
        "--checkpointed-updates",
        type=int,
        default=150,
        help="updates (= stream batches) for checkpointed full BPTT",
    )
    p.add_argument("--lr-tbptt", type=float, default=1e-4, help="Adam, both TBPTT methods")
    p.add_argument("--lr-checkpointed", type=float, default=3e-4, help="Adam")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument(
        "--train-recurrent", action="store_true", help="train W_hh too (by default it stays 0.99 I)"
    )
    p.add_argument("--evals", type=int, default=10, help="held-out evaluations per method")
    p.add_argument("--eval-streams", type=int, default=64)
    p.add_argument("--eval-length", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); at these sizes a second thread "
        "costs more in OpenMP waits than it saves, and much more on a busy machine",
    )
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--memory-worker", choices=METHODS + ("plain",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lag, args.period, args.length, args.streams, args.hidden = 6, 8, 96, 4, 8
        args.k, args.k2, args.tbptt_batches, args.checkpointed_updates = 2, 8, 2, 4
        args.evals, args.eval_streams, args.eval_length = 2, 4, 64
    if not 0 < args.lag < args.period:
        p.error(f"--lag must lie in [1, --period), but got L={args.lag}, P={args.period}")
    if args.k2 % args.k or args.k2 < args.k:
        p.error(f"--k2 must be a multiple of --k, >= it, but got k={args.k}, k2={args.k2}")
    return args


def last_cue_task(num_streams, length, lag, period, generator):
    """x: [length, B, 2] (cue sign, cue marker), target: [length, B, 1], the sign of the last
    cue at the steps lag .. period - 1 after it, NaN (not scored) elsewhere."""
    phase = torch.randint(period, (num_streams,), generator=generator)
    steps = torch.arange(length).unsqueeze(1)
    since_cue = (steps - phase) % period
    is_cue = since_cue == 0
    sign = torch.randint(2, (length, num_streams), generator=generator).float() * 2 - 1
    cue_sign = torch.where(is_cue, sign, torch.zeros(()))
    last_cue = torch.cummax(torch.where(is_cue, steps, 0), 0).values
    scored = (since_cue >= lag) & (steps >= since_cue)  # a cue has been seen
    target = torch.where(scored, cue_sign.gather(0, last_cue), torch.full((), float("nan")))
    return torch.stack([cue_sign, is_cue.float()], -1), target.unsqueeze(-1)


def masked_mse(pred, target):
    """The MSE over the scored (non-NaN) steps; 0, still a function of pred, if there are none."""
    scored = ~torch.isnan(target)
    if not scored.any():
        return pred.sum() * 0
    return (pred[scored] - target[scored]).pow(2).mean()


def make_model(args):
    torch.manual_seed(args.seed)
    rnn = FusedRNN(2, args.hidden, bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.99 * torch.eye(args.hidden))
        rnn.weight_ih_l0[:, 0] = 0
    rnn.weight_hh_l0.requires_grad_(args.train_recurrent)
    return RNNWithHead(rnn, nn.Linear(args.hidden, 1))


def batches(args):
    generator = torch.Generator().manual_seed(args.seed + 1)
    while True:
        yield last_cue_task(args.streams, args.length, args.lag, args.period, generator)


@torch.no_grad()
def evaluate(model, args):
    """Held-out accuracy of sign(prediction) at the scored steps, run statefully from zeros."""
    generator = torch.Generator().manual_seed(12345)
    x, target = last_cue_task(args.eval_streams, args.eval_length, args.lag, args.period, generator)
    pred, _ = model(x, None)
    scored = ~torch.isnan(target)
    return (torch.sign(pred[scored]) == target[scored]).float().mean().item()


def checkpointed_update(model, opt, x, target, clip):
    """One update with the exact gradient of the whole streams: (loss, norm, clipped)."""
    count = int((~torch.isnan(target)).sum())

    def loss_fn(pred, tgt):  # segments add up to the mean over all scored steps
        scored = ~torch.isnan(tgt)
        return (pred[scored] - tgt[scored]).pow(2).sum() / count

    opt.zero_grad(set_to_none=True)
    loss = checkpointed_bptt(model, x, target, loss_fn)
    norm = float(nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.step()
    return loss.item(), norm, not clip >= norm + 1e-6


def train(args, method):
    """Trains one method; returns its summary row and its per-update curve."""
    model = make_model(args)
    lr = args.lr_checkpointed if method == "checkpointed" else args.lr_tbptt
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = batches(args)
    num_batches = args.checkpointed_updates if method == "checkpointed" else args.tbptt_batches
    eval_every = max(1, num_batches // args.evals)
    curve, evals, train_s = [], [], 0.0
    for batch in range(num_batches):
        x, target = next(data)
        start = time.perf_counter()
        if method == "checkpointed":
            loss, norm, clipped = checkpointed_update(model, opt, x, target, args.clip)
            log = [(loss, norm, clipped)]
        else:
            driver = StatefulTBPTT(
                x, target, args.k, backprop=args.k2 if method == "tbptt_k1_k2" else args.k
            )
            stats = train_tbptt(model, driver, masked_mse, opt, clip_grad_norm=args.clip)
            log = list(zip(stats, stats.grad_norms, stats.clipped))
        train_s += time.perf_counter() - start
        for loss, norm, clipped in log:
            # 4 significant digits: the curve CSV has one row per update.
            curve.append(
                {
                    "method": method,
                    "update": len(curve) + 1,
                    "loss": float(f"{loss:.4g}"),
                    "grad_norm": float(f"{norm:.4g}"),
                    "clipped": int(clipped),
                    "eval_acc": "",
                    "train_s": "",
                }
            )
        if (batch + 1) % eval_every == 0 or batch + 1 == num_batches:
            curve[-1]["eval_acc"], curve[-1]["train_s"] = evaluate(model, args), train_s
            evals.append(curve[-1]["eval_acc"])
            print(
                f"  {method}: batch {batch + 1}/{num_batches}, {len(curve)} updates, "
                f"{train_s:.0f} s, held-out accuracy {evals[-1]:.3f}",
                flush=True,
            )
    norms = [r["grad_norm"] for r in curve]
    return {
        "method": method,
        "lr": lr,
        "updates": len(curve),
        "stream_steps": num_batches * args.length * args.streams,
        "eval_acc": evals[-1],
        "best_eval_acc": max(evals),
        "ms_per_update": 1e3 * train_s / len(curve),
        "train_s": train_s,
        "median_grad_norm": sorted(norms)[len(norms) // 2],
        "max_grad_norm": max(norms),
        "clipped_frac": sum(r["clipped"] for r in curve) / len(curve),
    }, curve


# ---- peak memory of one update, in a fresh process per method ----------------------------------


def memory_worker(args, method):
    """Peak RSS above the start of one update of `method` on one batch (after a warm-up)."""
    model = make_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, target = next(batches(args))

    def update(x, target):
        if method == "checkpointed":
            checkpointed_update(model, opt, x, target, args.clip)
        elif method == "plain":  # not trained, only measured
            opt.zero_grad(set_to_none=True)
            pred, _ = model(x, None)
            masked_mse(pred, target).backward()
            opt.step()
        else:
            driver = StatefulTBPTT(
                x, target, args.k, backprop=args.k2 if method == "tbptt_k1_k2" else args.k
            )
            train_tbptt(model, driver, masked_mse, opt, clip_grad_norm=args.clip)

    warm = min(args.length, 4 * args.k2)
    update(x[:warm], target[:warm])
    with bench_util.PeakMemory() as peak:
        update(x, target)  # TBPTT: a whole stream batch, i.e. N / k updates; the peak is one's
    return {"method": method, "peak_mib": peak.mib}


def measure_memory(args, method):
    if not bench_util.peak_memory_supported():
        return float("nan")  # not Linux: not measured
    if args.quick:  # a smoke run: in this process, not a figure to report
        return memory_worker(args, method)["peak_mib"]
    return bench_util.run_worker(
        __file__, ["--memory-worker", method, *sys_args(args)], fused_bptt.__file__
    )["peak_mib"]


def sys_args(args):
    """The options that shape the model and the data, for a worker process."""
    names = ("lag", "period", "length", "streams", "hidden", "k", "k2", "clip", "seed", "threads")
    return [a for n in names for a in (f"--{n}", str(getattr(args, n)))] + (
        ["--train-recurrent"] if args.train_recurrent else []
    )


# ---- outputs -------------------------------------------------------------------------------------

LABELS = {
    "tbptt": "TBPTT k={k}",
    "tbptt_k1_k2": "TBPTT(k1={k}, k2={k2})",
    "checkpointed": "checkpointed full BPTT",
    "plain": "plain full BPTT",
}


def plot(path, args, rows, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    acc_ax, norm_ax, cost_ax = axes
    for i, r in enumerate(rows):
        if r["method"] == "plain":
            continue
        label = LABELS[r["method"]].format(k=args.k, k2=args.k2)
        curve = [c for c in curves if c["method"] == r["method"]]
        evals = [(c["train_s"], c["eval_acc"]) for c in curve if c["eval_acc"] != ""]
        acc_ax.plot(*zip(*evals), "o-", color=f"C{i}", label=label)
        # Against the fraction of the method's training: the update counts differ 100x.
        done = [c["update"] / len(curve) for c in curve]
        step = max(1, len(curve) // 2000)  # at most ~2000 points a line
        norm_ax.plot(
            done[::step],
            [c["grad_norm"] for c in curve][::step],
            ".",
            ms=2,
            color=f"C{i}",
            alpha=0.5,
            label=label,
        )
    acc_ax.axhline(0.5, color="gray", ls=":", label="chance")
    acc_ax.set_ylim(0.3, 1.05)
    acc_ax.set_xlabel("training time (s, evaluations excluded)")
    acc_ax.set_ylabel("held-out accuracy of sign")
    acc_ax.set_title(
        f"recall the last cue, scored {args.lag}..{args.period - 1} steps after it", fontsize=9
    )
    acc_ax.legend(fontsize=7)
    norm_ax.axhline(args.clip, color="gray", ls=":", label=f"clip at {args.clip:g}")
    norm_ax.set_yscale("log")
    norm_ax.set_xlabel("fraction of the method's training")
    norm_ax.set_ylabel("gradient norm before clipping")
    norm_ax.set_title("gradient norm of every update", fontsize=9)
    norm_ax.legend(fontsize=7, markerscale=4)
    names = [LABELS[r["method"]].format(k=args.k, k2=args.k2) for r in rows]
    cost_ax.barh(names, [r["peak_mib"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    for y, r in enumerate(rows):
        text = f" {r['peak_mib']:.2f} MiB" + (
            f", {r['ms_per_update']:.1f} ms/update" if r["method"] != "plain" else " (not trained)"
        )
        cost_ax.text(r["peak_mib"], y, text, va="center", fontsize=7)
    cost_ax.set_xscale("log")
    cost_ax.set_xlabel("peak memory of an update, MiB above the start (log)")
    cost_ax.set_title(
        f"B={args.streams} streams x N={args.length} steps, H={args.hidden}", fontsize=9
    )
    cost_ax.set_xlim(0.01, 30 * max(r["peak_mib"] for r in rows))
    bench_util.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    with bench_util.torch_threads(args.threads):
        return _main(args)


def _main(args):
    if args.memory_worker:
        return bench_util.worker_result(memory_worker(args, args.memory_worker))
    bench_util.require_cpp_backend("long_range")
    out = bench_util.output_folder(args.out)
    start = time.perf_counter()
    header = (
        f"fused_bptt long-range demo: recall the last cue, L={args.lag}, P={args.period}, "
        f"B={args.streams} streams of N={args.length} steps, FusedRNN H={args.hidden} "
        f"(tanh, no bias, W_hh = 0.99 I {'at init' if args.train_recurrent else 'fixed'}, "
        f"sign-input weights 0 at init) + Linear, Adam, "
        f"clip {args.clip:g}, seed {args.seed}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(header, flush=True)
    rows, curves = [], []
    for method in METHODS:
        print(f"{method}:", flush=True)
        row, curve = train(args, method)
        rows.append({**row, "peak_mib": measure_memory(args, method)})
        curves += curve
    rows.append(
        {
            "method": "plain",
            "lr": float("nan"),
            "updates": 0,
            "stream_steps": 0,
            "eval_acc": float("nan"),
            "best_eval_acc": float("nan"),
            "ms_per_update": float("nan"),
            "train_s": 0.0,
            "median_grad_norm": float("nan"),
            "max_grad_norm": float("nan"),
            "clipped_frac": float("nan"),
            "peak_mib": measure_memory(args, "plain"),
        }
    )
    text = "\n\n".join(
        [
            header,
            "eval_acc: held-out accuracy of sign(prediction) at the scored steps after training "
            "(chance 0.5); best_eval_acc: the best of the evaluations during training; "
            "ms_per_update: training time / updates (measured under whatever load the machine "
            "had); peak_mib: peak RSS above the start of one update, fresh process per method "
            "(TBPTT: the largest of a batch's updates); plain: one full BPTT update over the same "
            "streams, measured, not trained",
            bench_util.format_table(rows, float_format=".4g"),
            f"took {time.perf_counter() - start:.0f} s",
        ]
    )
    print("\n" + text)
    bench_util.write_csv(out / "long_range.csv", rows)
    bench_util.write_csv(out / "long_range_curves.csv", curves)
    (out / "long_range.txt").write_text(text + "\n")
    plot(out / "long_range.png", args, rows, curves)
    print(f"wrote long_range.csv, long_range_curves.csv, long_range.txt, long_range.png to {out}")
    return rows


if __name__ == "__main__":
    main()

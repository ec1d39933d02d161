"""Demo: what a chunk of k steps can and cannot teach a recurrent net.

With truncation length k no gradient connects two states more than k steps apart. Two tasks test
what that leaves learnable; each stream has a random phase.

Task 1, pulse -> phase: a pulse x_t = 1 every P steps, 0 otherwise; the target is
y_t = sin(2 pi j / P) at every step, j = steps since the last pulse (the lag). For k < P:
  - lags j < k: the pulse and the target lie in one chunk; learnable by either driver.
  - lags j >= k, stateless windows (zero state): a window that holds the target but not its
    pulse carries no information on the phase, so training can only teach the mean there.
  - lags j >= k, stateful chunks: the carried state holds the phase (forward information crosses
    the boundary, gradient does not). A sine is the output of a local rule (a rotation of a 2-d
    state, h_{t+1} = R h_t) that any chunk can teach; only the phase reset at the pulse needs
    the pulse inside the chunk. So the stateful driver may well learn it with k < P.
Task 2, delayed recall: every P steps a cue, its sign s = +1 or -1 at random on input 0 and a 1
on input 1 (marking the cue step), both 0 otherwise; the target is s exactly L steps later
(L < P), and only those target steps count (masked loss). The rule is "write s into the state
at the cue, hold it, read it out at L"; the write can only be taught by a gradient from the
target back to the cue, L steps. For k < L no chunk holds a cue and its target: stateless
windows see no cue before any target (chance); stateful chunks carry whatever the untrained
write left in the state, and can learn to hold and read it out, but never to write it (chance
or slightly above). For k > L both should learn it; the stateless windows (k < P + L) never
show a cue overwriting the memory of an earlier one, which the held-out streams do.

Fair evaluation: every trained model is run the same way, statefully over long held-out streams
from a zero state (no truncation at test time); the first 2P steps are not scored. Task 1 reports
the MSE overall and split by lag (j < k, j >= k; predicting 0 scores 0.5); task 2 the accuracy
of sign(prediction) at the target steps (chance: 0.5) and the MSE there (predicting 0: 1.0).
Each configuration of a task gets the same number of training time steps (small k gets
proportionally more updates), identical initial weights per seed, and runs for several seeds
(and, task 1, learning rates): the outcome of a single run can hinge on either.

Then the time per update of FusedRNN against torch.nn.RNN (task 1 data), same model, weights and
chunks, measured side by side in alternating blocks. Outputs under --out: demo.png (task 1:
held-out predictions of the median-seed run of each setting and the MSE per lag; task 2: the
accuracy of every run and held-out predictions), demo.csv and demo_recall.csv (every run),
demo_summary.csv and demo_recall_summary.csv (over seeds), demo_timing.csv, demo.txt (all tables).

The demo imports the installed fused_bptt (`pip install --no-build-isolation .`) and refuses to
run without its compiled kernels unless told `--backend reference`.

    python bench/demo.py                 # the full run, about three minutes on 2 idle CPU cores
    python bench/demo.py --threads 1     # the same on a busy machine: with 2 threads, OpenMP
                                         # waits stall these small steps when a core is taken
    python bench/demo.py --quick         # seconds: a smoke run (the tests call it)
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import (  # noqa: E402
    format_table,
    import_fused_bptt,
    output_folder,
    save_figure,
    torch_threads,
    write_csv,
)

fused_bptt = import_fused_bptt("demo")
from fused_bptt import (  # noqa: E402
    FusedRNN,
    RNNWithHead,
    StatefulTBPTT,
    StatelessTBPTT,
    available_backends,
    train_tbptt,
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--period", type=int, default=32, help="task 1: P, steps between pulses")
    p.add_argument("--ks", default="8,64", help="task 1: chunk lengths, comma separated")
    p.add_argument("--batch", type=int, default=32, help="task 1: streams / windows per update")
    p.add_argument(
        "--train-steps",
        type=int,
        default=64 * 600,
        help="task 1: training time steps per stream, the same for every configuration",
    )
    p.add_argument("--lrs", default="3e-3,1e-3", help="task 1: Adam learning rates")
    p.add_argument("--recall-lag", type=int, default=16, help="task 2: L, cue to target")
    p.add_argument("--recall-period", type=int, default=24, help="task 2: P > L, between cues")
    p.add_argument("--recall-ks", default="8,32", help="task 2: chunk lengths")
    p.add_argument("--recall-batch", type=int, default=64)
    p.add_argument("--recall-train-steps", type=int, default=48000)
    p.add_argument("--recall-lrs", default="3e-3")
    p.add_argument("--recall-eval-streams", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seeds", default="0,1,2", help="one training run per seed and setting")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-streams", type=int, default=128, help="task 1")
    p.add_argument("--eval-periods", type=int, default=16, help="held-out length in periods")
    p.add_argument("--timing-updates", type=int, default=20, help="updates per timed block")
    p.add_argument("--timing-blocks", type=int, default=5)
    p.add_argument("--backend", default="auto", help="FusedRNN backend")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.period, args.ks, args.hidden, args.batch = 8, "4,16", 16, 8
        args.train_steps, args.eval_streams, args.eval_periods = 16 * 6, 8, 6
        args.timing_updates, args.timing_blocks, args.lrs, args.seeds = 2, 1, "3e-3", "0"
        args.recall_lag, args.recall_period, args.recall_ks = 4, 6, "2,8"
        args.recall_batch, args.recall_train_steps, args.recall_eval_streams = 8, 8 * 6, 8
    for name in ("ks", "recall_ks", "seeds"):
        setattr(args, name, [int(v) for v in getattr(args, name).split(",")])
    for name in ("lrs", "recall_lrs"):
        setattr(args, name, [float(v) for v in getattr(args, name).split(",")])
    if not 0 < args.recall_lag < args.recall_period:
        p.error(
            f"--recall-lag must lie in [1, --recall-period), so that every target comes "
            f"before the next cue, but got L={args.recall_lag}, P={args.recall_period}"
        )
    return args


def pulse_task(num_streams, length, period, generator):
    """x, target: [length, num_streams, 1]; phase = steps since the last pulse (the lag)."""
    phase = torch.randint(period, (num_streams,), generator=generator)
    lag = (torch.arange(length).unsqueeze(1) - phase) % period
    x = (lag == 0).float().unsqueeze(-1)
    return x, torch.sin(2 * math.pi * lag.float() / period).unsqueeze(-1), lag


def recall_task(num_streams, length, period, lag, generator):
    """x: [length, num_streams, 2], target: [length, num_streams, 1]. Every `period` steps a
    cue: x[..., 0] = its sign s = +-1 and x[..., 1] = 1 (0 and 0 elsewhere); the target is s
    `lag` steps after its cue, NaN (no loss) elsewhere and where the cue would lie before the
    stream's start. Also returns the steps since the last cue."""
    phase = torch.randint(period, (num_streams,), generator=generator)
    since_cue = (torch.arange(length).unsqueeze(1) - phase) % period
    sign = torch.randint(2, (length, num_streams), generator=generator).float() * 2 - 1
    x = torch.where(since_cue == 0, sign, torch.zeros(()))
    delayed = torch.cat([torch.zeros(lag, num_streams), x[: length - lag]])
    is_target = (since_cue == lag) & (torch.arange(length).unsqueeze(1) >= lag)
    target = torch.where(is_target, delayed, torch.full((), float("nan")))
    return torch.stack([x, (since_cue == 0).float()], -1), target.unsqueeze(-1), since_cue


def masked_mse(pred, target):
    """MSE over the steps whose target is not NaN; a chunk without any scores 0 (no gradient)."""
    scored = ~torch.isnan(target)
    if not scored.any():
        return pred.sum() * 0  # still a function of the parameters, so backward() works
    return F.mse_loss(pred[scored], target[scored])


def score_pulse(pred, target, lag, k, period):
    """pred, target: [T, B, 1], lag: [T, B] -> MSE overall and for lags < k, >= k; MSE per lag."""
    err = (pred - target)[..., 0] ** 2
    short = lag < k
    return {
        "eval_mse": err.mean().item(),
        "eval_mse_lag_lt_k": err[short].mean().item() if short.any() else float("nan"),
        "eval_mse_lag_ge_k": err[~short].mean().item() if (~short).any() else float("nan"),
    }, torch.stack([err[lag == j].mean() for j in range(period)])


def score_recall(pred, target, since_cue, k, period):
    """pred, target: [T, B, 1], NaN = not scored -> accuracy of sign(pred) and MSE over the
    scored steps, and their number; no per-lag curve (only one lag is scored)."""
    scored = ~torch.isnan(target)
    pred, target = pred[scored], target[scored]
    return {
        "eval_acc": (torch.sign(pred) == target).float().mean().item(),
        "eval_mse": F.mse_loss(pred, target).item(),
        "targets": int(scored.sum()),
    }, None


class Task(NamedTuple):
    """A task's data, loss, scoring and training configuration; `metric` ranks the runs."""

    name: str
    inputs: int
    period: int
    data: Callable  # (num_streams, length, generator) -> x, target, aux [length, B]
    loss: Callable
    score: Callable  # (pred, target, aux, k, period) -> metrics, per-lag curve or None
    metric: str
    ks: List[int]
    lrs: List[float]
    batch: int
    train_steps: int
    eval_streams: int


def make_tasks(args):
    pulse = Task(
        "pulse",
        1,
        args.period,
        lambda n, t, g: pulse_task(n, t, args.period, g),
        F.mse_loss,
        score_pulse,
        "eval_mse",
        args.ks,
        args.lrs,
        args.batch,
        args.train_steps,
        args.eval_streams,
    )
    recall = Task(
        "recall",
        2,
        args.recall_period,
        lambda n, t, g: recall_task(n, t, args.recall_period, args.recall_lag, g),
        masked_mse,
        score_recall,
        "eval_acc",
        args.recall_ks,
        args.recall_lrs,
        args.recall_batch,
        args.recall_train_steps,
        args.recall_eval_streams,
    )
    return pulse, recall


def check_backend(args):
    """The backend FusedRNN will run here; exits if that is the slow reference by default."""
    available = available_backends()
    wanted = "cuda" if args.device.startswith("cuda") else "cpp"
    if args.backend not in ("auto", *available):
        raise SystemExit(
            f"demo: --backend {args.backend!r} is not available here; available "
            f"backends: {available} (or 'auto')"
        )
    used = wanted if args.backend == "auto" and wanted in available else args.backend
    if used == "auto":
        used = "reference"  # what backend="auto" runs when the kernels are missing
    if used not in ("reference", wanted):
        raise SystemExit(
            f"demo: --backend {used!r} does not run {args.device} tensors; use "
            f"{wanted!r}, 'auto' or 'reference'"
        )
    if used == "reference" and args.backend != "reference":
        raise SystemExit(
            f"demo: FusedRNN would run the slow pure-PyTorch reference backend on {args.device}: "
            f"fused_bptt imported from {Path(fused_bptt.__file__).parent} has the backends "
            f"{available}, but the demo needs {wanted}. Install the package with its "
            f"compiled kernels (pip install --no-build-isolation . in the checkout) and run the "
            f"demo as `python bench/demo.py`, or pass --backend reference to time the reference"
        )
    return used


def make_model(args, kind, seed, inputs):
    torch.manual_seed(seed)
    rnn = nn.RNN(inputs, args.hidden)  # the same initial weights for every model
    if kind == "fused":
        rnn = FusedRNN.from_rnn(rnn, backend=args.backend)
    return RNNWithHead(rnn, nn.Linear(args.hidden, 1)).to(args.device)


def make_driver(task, mode, k, generator, device):
    updates = max(1, task.train_steps // k)
    if mode == "stateful":
        x, target, _ = task.data(task.batch, updates * k, generator)
        return StatefulTBPTT(x.to(device), target.to(device), k)
    # Stateless: a pool of independent sequences, each a few periods longer than the window.
    x, target, _ = task.data(4 * task.batch, max(4 * task.period, 2 * k), generator)
    return StatelessTBPTT(
        list(x.to(device).unbind(1)),
        list(target.to(device).unbind(1)),
        k,
        task.batch,
        updates,
        generator=generator,
    )


def progress(label, total, every_s=5.0):
    """on_chunk callback: prints the running mean loss every few seconds."""
    state = {"t": time.perf_counter(), "losses": []}

    def on_chunk(index, loss):
        state["losses"].append(loss)
        now = time.perf_counter()
        if now - state["t"] > every_s or index + 1 == total:
            recent = state["losses"][-max(1, total // 20) :]
            print(
                f"  {label}: update {index + 1}/{total}  loss {sum(recent) / len(recent):.4f}",
                flush=True,
            )
            state["t"] = now

    return on_chunk


@torch.no_grad()
def evaluate(model, task, k, args):
    """Runs statefully from zeros over held-out streams; scores every step after the burn-in."""
    generator = torch.Generator().manual_seed(12345)  # the same held-out streams for all
    x, target, aux = task.data(task.eval_streams, args.eval_periods * task.period, generator)
    pred, _ = model(x.to(args.device), None)
    pred = pred.cpu()
    burn_in = 2 * task.period
    metrics, curve = task.score(pred[burn_in:], target[burn_in:], aux[burn_in:], k, task.period)
    return metrics, curve, (x[:, 0, 0], target[:, 0, 0], pred[:, 0, 0])  # stream 0


def train_all(args, task):
    """One training run per (lr, k, mode, seed); returns a row per run, and per (label, seed)
    the held-out curve (task 1: MSE per lag) and a held-out stream (input, target, prediction)."""
    rows, curves, samples = [], {}, {}
    for lr in task.lrs:
        for k in task.ks:
            for mode in ("stateless", "stateful"):
                for seed in args.seeds:
                    label = f"{mode} k={k} lr={lr:g}"
                    generator = torch.Generator().manual_seed(seed)
                    model = make_model(args, "fused", seed, task.inputs)
                    driver = make_driver(task, mode, k, generator, args.device)
                    opt = torch.optim.Adam(model.parameters(), lr=lr)
                    print(
                        f"{task.name} {label} seed={seed}: {len(driver)} updates of "
                        f"{task.batch} x {k} steps",
                        flush=True,
                    )
                    start = time.perf_counter()
                    losses = train_tbptt(
                        model,
                        driver,
                        task.loss,
                        opt,
                        clip_grad_norm=args.clip,
                        on_chunk=progress(f"{task.name} {label}", len(driver)),
                    )
                    seconds = time.perf_counter() - start
                    tail = losses[-max(1, len(losses) // 10) :]
                    metrics, curve, sample = evaluate(model, task, k, args)
                    rows.append(
                        {
                            "mode": mode,
                            "k": k,
                            "period": task.period,
                            "lr": lr,
                            "seed": seed,
                            "updates": len(losses),
                            "train_s": seconds,
                            "train_loss_last10pct": sum(tail) / len(tail),
                            **metrics,
                        }
                    )
                    print(f"  -> held-out {task.metric} {metrics[task.metric]:.4f}", flush=True)
                    curves[label, seed], samples[label, seed] = curve, sample
    return rows, curves, samples


def summarize(rows, metric, medians):
    """One row per (mode, k, lr): the median and the range of `metric` over seeds, and the
    median of each row key in `medians` ({summary column: row key})."""
    groups = {}
    for r in rows:
        groups.setdefault((r["mode"], r["k"], r["lr"]), []).append(r)
    summary = []
    for (mode, k, lr), runs in groups.items():
        values = [r[metric] for r in runs]
        median_run = sorted(runs, key=lambda r: r[metric])[(len(runs) - 1) // 2]
        summary.append(
            {
                "mode": mode,
                "k": k,
                "lr": lr,
                "seeds": len(runs),
                "median_seed": median_run["seed"],
                f"{metric}_median": statistics.median(values),
                f"{metric}_min": min(values),
                f"{metric}_max": max(values),
                **{
                    column: statistics.median(r[key] for r in runs)
                    for column, key in medians.items()
                },
            }
        )
    return summary


def time_updates(args, task):
    """ms per update, FusedRNN vs torch.nn.RNN, identical weights and chunks, in alternating
    blocks so that both sides see the same machine state; the median block is reported."""
    results = []
    for k in task.ks:
        generator = torch.Generator().manual_seed(args.seeds[0])
        x, target, _ = task.data(task.batch, k * args.timing_updates, generator)
        x, target = x.to(args.device), target.to(args.device)
        models = {
            kind: make_model(args, kind, args.seeds[0], task.inputs) for kind in ("torch", "fused")
        }
        opts = {
            kind: torch.optim.Adam(m.parameters(), lr=task.lrs[0]) for kind, m in models.items()
        }
        times = {kind: [] for kind in models}
        for block in range(args.timing_blocks + 1):  # block 0 is a warm-up
            for kind, model in models.items():
                driver = StatefulTBPTT(x, target, k)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                train_tbptt(model, driver, task.loss, opts[kind], clip_grad_norm=args.clip)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if block:
                    times[kind].append((time.perf_counter() - start) / len(driver) * 1e3)
        ms = {kind: statistics.median(t) for kind, t in times.items()}
        results.append(
            {
                "k": k,
                "batch": task.batch,
                "hidden": args.hidden,
                "torch_ms": ms["torch"],
                "fused_ms": ms["fused"],
                "speedup": ms["torch"] / ms["fused"],
            }
        )
        print(
            f"timing k={k}: nn.RNN {ms['torch']:.3f} ms/update, FusedRNN {ms['fused']:.3f} "
            f"ms/update, speedup {ms['torch'] / ms['fused']:.2f}x",
            flush=True,
        )
    return results


def plot(path, args, pulse, recall):
    """Task 1, one column per learning rate: a held-out stream per setting (its median-seed run),
    then the held-out MSE against the lag since the last pulse. Task 2, the last row: the
    held-out accuracy of every run, and a held-out stream with the median-seed predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, curves, samples = pulse
    columns = [[r for r in summary if r["lr"] == lr] for lr in args.lrs]
    rows = len(columns[0]) + 2
    fig = plt.figure(figsize=(7 * max(2, len(columns)), 2.1 * rows + 1.2))
    grid = fig.add_gridspec(rows, 2 * len(columns), height_ratios=[1] * (rows - 1) + [1.6])
    burn_in, span = 2 * args.period, 4 * args.period
    t = torch.arange(burn_in, burn_in + span)
    for col, settings in enumerate(columns):
        curve_ax = fig.add_subplot(grid[rows - 2, 2 * col : 2 * col + 2])
        for row, r in enumerate(settings):
            ax = fig.add_subplot(grid[row, 2 * col : 2 * col + 2])
            key = (f"{r['mode']} k={r['k']} lr={r['lr']:g}", r["median_seed"])
            x, target, pred = (s[burn_in : burn_in + span] for s in samples[key])
            ax.plot(t, target, "k-", lw=1, label="target")
            ax.plot(t, pred, "C1-", lw=1.5, label="prediction")
            ax.vlines(t[x > 0], -1.2, 1.2, colors="C2", lw=0.8, label="pulse")
            ax.set_title(
                f"pulse -> phase: {key[0]} seed={key[1]} (median of {r['seeds']}), "
                f"P={args.period}: held-out, stateful run",
                fontsize=8,
            )
            ax.set_ylim(-1.3, 1.3)
            if row == 0:
                ax.legend(loc="upper right", fontsize=7, ncol=3)
            curve_ax.plot(range(args.period), curves[key], marker=".", label=key[0])
        curve_ax.axhline(0.5, color="gray", ls=":", label="predict 0")
        curve_ax.set_yscale("log")
        curve_ax.set_xlabel("lag: steps since the last pulse")
        curve_ax.set_ylabel("held-out MSE")
        curve_ax.legend(fontsize=6, ncol=3, loc="lower center")
    plot_recall(
        fig.add_subplot(grid[rows - 1, : len(columns)]),
        fig.add_subplot(grid[rows - 1, len(columns) :]),
        args,
        *recall,
    )
    save_figure(fig, path)


def plot_recall(acc_ax, stream_ax, args, summary, rows, samples):
    labels = [f"{r['mode']} k={r['k']} lr={r['lr']:g}" for r in summary]
    for i, (_label, r) in enumerate(zip(labels, summary)):
        accs = [
            run["eval_acc"]
            for run in rows
            if (run["mode"], run["k"], run["lr"]) == (r["mode"], r["k"], r["lr"])
        ]
        acc_ax.plot([i] * len(accs), accs, "o", color=f"C{i}", alpha=0.6)
        acc_ax.plot([i - 0.25, i + 0.25], [r["eval_acc_median"]] * 2, "k-", lw=2)
    acc_ax.axhline(0.5, color="gray", ls=":", label="chance")
    acc_ax.set_xticks(range(len(labels)), labels, fontsize=7)
    acc_ax.set_ylim(0.3, 1.05)
    acc_ax.set_ylabel("held-out accuracy of sign")
    acc_ax.set_title(
        f"delayed recall, L={args.recall_lag}, P={args.recall_period}: every seed "
        f"(dots) and the median (bar)",
        fontsize=8,
    )
    acc_ax.legend(fontsize=7, loc="lower right")
    burn_in = 2 * args.recall_period
    span = min(8 * args.recall_period, (args.eval_periods - 2) * args.recall_period)
    t = torch.arange(burn_in, burn_in + span)
    # Only the target steps are scored, so only they are drawn: between them the output is free.
    for i, (label, r) in enumerate(zip(labels, summary)):
        x, target, pred = (s[burn_in : burn_in + span] for s in samples[label, r["median_seed"]])
        scored = ~torch.isnan(target)
        offset = 0.8 * (i - (len(labels) - 1) / 2)  # side by side, not on top of each other
        stream_ax.plot(
            t[scored] + offset,
            pred[scored].clamp(-1.5, 1.5),
            "D",
            color=f"C{i}",
            ms=4,
            label=f"{label} seed={r['median_seed']}",
        )
    stream_ax.vlines(t[x != 0], -1.5, 1.5, colors="gray", lw=0.6, label="cue")
    stream_ax.plot(t[x != 0], x[x != 0], "kx", label="cue sign")
    stream_ax.plot(t[scored], target[scored], "ko", mfc="none", ms=9, label="target")
    stream_ax.axhline(0, color="gray", lw=0.5)
    stream_ax.set_ylim(-2.5, 1.6)  # room for the legend below the points
    stream_ax.set_yticks([-1, 0, 1])
    stream_ax.set_xlabel("time step")
    stream_ax.set_title(
        "delayed recall: a held-out stream, median-seed predictions at the target "
        "steps (clipped to +-1.5)",
        fontsize=8,
    )
    stream_ax.legend(fontsize=6, ncol=4, loc="lower center")


def describe(args, used):
    """The header of the printout and of demo.txt: the configuration and what runs."""
    return (
        f"fused_bptt demo: hidden {args.hidden}, seeds {args.seeds}, device {args.device}, "
        f"{torch.get_num_threads()} threads; fused_bptt from "
        f"{Path(fused_bptt.__file__).parent}, backends {available_backends()}, FusedRNN "
        f"backend={args.backend!r} -> runs {used!r}\n"
        f"task 1 pulse -> phase: P={args.period}, k in {args.ks}, lr in {args.lrs}, batch "
        f"{args.batch}, {args.train_steps} training steps per stream\n"
        f"task 2 delayed recall: L={args.recall_lag}, P={args.recall_period}, k in "
        f"{args.recall_ks}, lr in {args.recall_lrs}, batch {args.recall_batch}, "
        f"{args.recall_train_steps} training steps per stream"
    )


def summarize_tasks(pulse_rows, recall_rows):
    """The over-seeds summaries of both tasks (summarize)."""
    pulse_summary = summarize(
        pulse_rows,
        "eval_mse",
        {
            "lag_lt_k_median": "eval_mse_lag_lt_k",
            "lag_ge_k_median": "eval_mse_lag_ge_k",
            "train_loss_median": "train_loss_last10pct",
        },
    )
    recall_summary = summarize(
        recall_rows,
        "eval_acc",
        {"eval_mse_median": "eval_mse", "train_loss_median": "train_loss_last10pct"},
    )
    return pulse_summary, recall_summary


def report(header, pulse_summary, recall_summary, pulse_rows, recall_rows, timing, seconds):
    """All the tables as one text: printed, and written to demo.txt."""
    return "\n\n".join(
        [
            header,
            "task 1, pulse -> phase: held-out MSE over seeds, run statefully from zeros after a "
            "burn-in of 2P (predict 0: 0.5)\n" + format_table(pulse_summary),
            "task 2, delayed recall: held-out accuracy of sign(prediction) at the target steps "
            "over seeds, run statefully from zeros after a burn-in of 2P (chance: 0.5; MSE of "
            "predicting 0: 1.0)\n" + format_table(recall_summary),
            "task 1, every run\n" + format_table(pulse_rows),
            "task 2, every run\n" + format_table(recall_rows),
            "time per update (forward + backward + clip + Adam), FusedRNN vs torch.nn.RNN, task 1 "
            "chunks, median of blocks\n" + format_table(timing),
            f"training, evaluation and timing took {seconds:.0f} s",
        ]
    )


def main(argv=None):
    """Trains, evaluates, times, writes the outputs; returns the per-run rows of each task."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args):
    out = output_folder(args.out)
    header = describe(args, check_backend(args))
    print(header, flush=True)
    pulse, recall = make_tasks(args)
    start = time.perf_counter()
    pulse_rows, pulse_curves, pulse_samples = train_all(args, pulse)
    recall_rows, _, recall_samples = train_all(args, recall)
    timing = time_updates(args, pulse)
    pulse_summary, recall_summary = summarize_tasks(pulse_rows, recall_rows)
    text = report(
        header,
        pulse_summary,
        recall_summary,
        pulse_rows,
        recall_rows,
        timing,
        time.perf_counter() - start,
    )
    print("\n" + text)
    write_csv(out / "demo.csv", pulse_rows)
    write_csv(out / "demo_summary.csv", pulse_summary)
    write_csv(out / "demo_recall.csv", recall_rows)
    write_csv(out / "demo_recall_summary.csv", recall_summary)
    write_csv(out / "demo_timing.csv", timing)
    (out / "demo.txt").write_text(text + "\n")
    plot(
        out / "demo.png",
        args,
        (pulse_summary, pulse_curves, pulse_samples),
        (recall_summary, recall_rows, recall_samples),
    )
    print(
        f"wrote demo.png, demo.csv, demo_summary.csv, demo_recall.csv, "
        f"demo_recall_summary.csv, demo_timing.csv, demo.txt to {out}"
    )
    return {"pulse": pulse_rows, "recall": recall_rows}


if __name__ == "__main__":
    main()

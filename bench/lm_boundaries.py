"""Demo: a byte-level language model trained statefully over concatenated documents, with and
without document boundaries.

Data (made here, no download): many short independent documents end to end in one byte stream,
so the right state at a document start is "nothing". Three kinds of documents:

  alphabet  a header of 4 distinct sorted letters out of a..j, then words written with those 4
            letters only, then the header repeated:   "bdgj:gb jjd b dgjb=bdgj\\n"
            Given the header, a body letter costs 2 bits and the echoed letters 0 bits; the state
            left by the previous document holds another set of 4 letters, which the model must
            learn to forget when the new header comes (the new document's own letters are
            needed from its first body letter on).
  unmarked  the same documents with spaces for ':', '=' and the newline:
            "bdgj gb jjd b dgjb bdgj aceh ...": nothing but the boundary stream says for sure
            where a document starts (as with episodes whose first observation looks like any).
  text      plain-text-like: a title naming a person, then a few sentences about them, where the
            name and the pronoun (she / he) come back:   "Title: Mara\\nMara saw the old dog.
            Then she ..." (a name or a pronoun costs little given the title, much without).

Model: Embedding(256, E) -> FusedRNN(E, H) -> Linear(H, 256), trained with StatefulTBPTT +
train_tbptt over B contiguous streams, chunk length k, from the same initial weights on the same
stream, twice:
  (a) trained with boundaries: StatefulTBPTT(boundaries=...) zeroes the state where a document
      starts, inside a chunk too, and no gradient crosses it;
  (b) trained without: the state runs on from one document into the next.
Both models are then run over held-out documents (a fresh stream, statefully from zeros, no
truncation at test time) both ways: with resets at the document starts and without. The table
separates "trained with" from "evaluated with". Bits per byte (cross-entropy in bits, lower is
better) overall, on the first --first bytes of each document (where a leaked state matters
most), and on the bytes that depend on the header (alphabet, unmarked: body and echo letters;
text: the name and the pronoun after the title). Bytes of a stream before its first full document
are not scored.

Outputs under --out: lm_boundaries.csv (the table), lm_boundaries_curves.csv (training loss per
update; held-out figures every --eval-every updates), lm_boundaries.png (learning curves),
lm_boundaries.txt (the printed summary).

    python bench/lm_boundaries.py              # a few minutes on 2 CPU cores
    python bench/lm_boundaries.py --threads 2  # torch threads (default 1: see --threads)
    python bench/lm_boundaries.py --quick      # seconds: a smoke run (the tests call it)
"""

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_util  # noqa: E402
from bench_util import format_table, write_csv  # noqa: E402

fused_bptt = bench_util.import_fused_bptt("lm_boundaries")  # its public API only

VARIANTS = ("alphabet", "unmarked", "text")
LN2 = math.log(2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated: {VARIANTS}")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--k", type=int, default=64, help="chunk length (TBPTT)")
    p.add_argument("--streams", type=int, default=32, help="B, streams per update")
    p.add_argument("--updates", type=int, default=1500, help="training updates per run")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0, help="initial weights and training data")
    p.add_argument("--first", type=int, default=8, help="'first bytes': positions 0..first-1")
    p.add_argument("--eval-bytes", type=int, default=32768, help="held-out stream length")
    p.add_argument("--eval-streams", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=150, help="updates between held-out evals")
    p.add_argument("--backend", default="auto", help="FusedRNN backend")
    # One thread by default: at these sizes a step is microseconds of arithmetic, and with two
    # threads OpenMP's waits stall every step whenever another process holds a core.
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.embed, args.k, args.streams, args.updates = 16, 8, 16, 4, 6
        args.eval_bytes, args.eval_streams, args.eval_every = 1024, 4, 3
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        raise SystemExit(f"lm_boundaries: --variants must name some of {VARIANTS}, got {unknown}")
    return args


# ---- documents -------------------------------------------------------------------------------
# Each generator returns one document as a list of (text piece, depends-on-header) pairs; the
# flag marks the bytes whose distribution the header decides (scored separately).

LETTERS = "abcdefghij"


def alphabet_document(rng, marked=True):
    """marked=False: the same document with spaces for its delimiters ':', '=' and '\\n'."""
    colon, equals, newline = (":", "=", "\n") if marked else (" ", " ", " ")
    letters = "".join(sorted(rng.sample(LETTERS, 4)))
    pieces = [(letters + colon, False)]
    for i in range(rng.randint(3, 8)):
        if i:
            pieces.append((" ", False))
        pieces.append(("".join(rng.choices(letters, k=rng.randint(1, 5))), True))
    return pieces + [(equals, False), (letters, True), (newline, False)]


NAMES = {  # distinct first letters: the name's first byte decides the rest
    "Mara": "she",
    "Tom": "he",
    "Lena": "she",
    "Boris": "he",
    "Anna": "she",
    "Otto": "he",
    "Ida": "she",
    "Karl": "he",
    "Rita": "she",
    "Paul": "he",
    "Zoe": "she",
    "Jens": "he",
}
VERBS = ("saw", "found", "took", "lost", "painted", "sold", "met", "fed", "left", "wanted")
ADJECTIVES = ("old", "red", "small", "quiet", "strange", "new", "heavy", "bright")
NOUNS = ("dog", "boat", "book", "garden", "letter", "lamp", "horse", "window", "friend")


def text_document(rng):
    name = rng.choice(list(NAMES))
    pieces = [("Title: ", False), (name, False), ("\n", False)]
    for i in range(rng.randint(2, 5)):
        # The subject: the name or the pronoun (both decided by the title), capitalised at the
        # start of a sentence; "Then" sometimes comes first, to vary where they fall.
        then = i > 0 and rng.random() < 0.4
        if i:
            pieces.append((" ", False))
        if then:
            pieces.append(("Then ", False))
        subject = name if rng.random() < 0.5 else NAMES[name]
        if not then and subject == NAMES[name]:
            subject = subject.capitalize()
        adjective = rng.choice(ADJECTIVES) + " " if rng.random() < 0.5 else ""
        pieces += [
            (subject, True),
            (f" {rng.choice(VERBS)} the {adjective}{rng.choice(NOUNS)}.", False),
        ]
    return pieces + [("\n", False)]


def make_stream(variant, num_bytes, seed):
    """Documents end to end until num_bytes: bytes uint8->long [N], starts bool [N] (a document
    starts here), position [N] (index inside its document), header_dependent bool [N]."""
    # unmarked draws the very documents of alphabet (one seed), only its delimiters differ
    rng = random.Random(f"{'text' if variant == 'text' else 'alphabet'}-{seed}")
    document = {
        "alphabet": alphabet_document,
        "unmarked": lambda rng: alphabet_document(rng, marked=False),
        "text": text_document,
    }[variant]
    data, position, dependent = bytearray(), [], []
    while len(data) < num_bytes:
        at = 0
        for text, flag in document(rng):
            piece = text.encode()
            data += piece
            position.extend(range(at, at + len(piece)))
            dependent.extend([flag] * len(piece))
            at += len(piece)
    n = num_bytes
    position = torch.tensor(position[:n])
    stream = torch.frombuffer(data[:n], dtype=torch.uint8).long()
    return stream, position == 0, position, torch.tensor(dependent[:n])


# ---- model, training, evaluation -------------------------------------------------------------


class ByteLM(nn.Module):
    """Embedding -> FusedRNN -> Linear to 256 logits; forward takes the chunk's resets."""

    def __init__(self, embed, hidden, backend):
        super().__init__()
        self.embed = nn.Embedding(256, embed)
        self.rnn = fused_bptt.FusedRNN(embed, hidden, backend=backend)
        self.out = nn.Linear(hidden, 256)

    def forward(self, x, h=None, resets=None):
        y, h_n = self.rnn(self.embed(x), h, resets=resets)
        return self.out(y), h_n


def cross_entropy(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def check_backend(args):
    """The backend FusedRNN runs; exits rather than run the slow reference unless asked."""
    available = fused_bptt.available_backends()
    if args.backend not in ("auto", *available):
        raise SystemExit(
            f"lm_boundaries: --backend {args.backend!r} is not available here; "
            f"available: {available} (or 'auto')"
        )
    used = "cpp" if args.backend == "auto" and "cpp" in available else args.backend
    if used == "auto":
        raise SystemExit(
            f"lm_boundaries: fused_bptt from {Path(fused_bptt.__file__).parent} has no compiled "
            f"CPU kernels (backends {available}); install it with pip install "
            f"--no-build-isolation . in the checkout, or pass --backend reference (slow)"
        )
    return used


class HeldOut:
    """A held-out stream cut into streams, with what each target byte is."""

    def __init__(self, variant, args):
        stream, starts, position, dependent = make_stream(variant, args.eval_bytes, args.seed + 1)
        cut = lambda t: fused_bptt.batchify(t, args.eval_streams)  # noqa: E731
        self.x, self.target, self.resets = cut(stream[:-1]), cut(stream[1:]), cut(starts[:-1])
        # Targets before a stream's first document start belong to a document cut in two by
        # batchify, which both evaluations start from zeros: not scored.
        scored = torch.cumsum(cut(starts[1:]).long(), 0) > 0
        position, dependent = cut(position[1:]), cut(dependent[1:])
        self.masks = {
            "all": scored,
            "first": scored & (position < args.first),
            "header_dep": scored & dependent,
        }

    @torch.no_grad()
    def bits(self, model, with_resets):
        """Bits per byte of each mask, the model run once over the whole held-out stream."""
        logits, _ = model(self.x, None, resets=self.resets if with_resets else None)
        bits = F.cross_entropy(logits.permute(0, 2, 1), self.target, reduction="none") / LN2
        return {name: float(bits[mask].mean()) for name, mask in self.masks.items()}


def train_run(variant, trained_with, args, train_data, held_out):
    """One training run; returns the model and its curve rows (every update's training loss,
    held-out bits both ways every eval_every updates)."""
    stream, starts = train_data
    torch.manual_seed(args.seed)  # the same initial weights for both runs
    model = ByteLM(args.embed, args.hidden, args.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    driver = fused_bptt.StatefulTBPTT(
        stream[:-1],
        stream[1:],
        args.k,
        num_streams=args.streams,
        drop_last=True,
        boundaries=starts[:-1] if trained_with else None,
    )
    label = f"{variant}, trained {'with' if trained_with else 'without'} boundaries"
    curve, clock = [], {"t": time.perf_counter()}

    def on_chunk(index, loss):
        row = {"variant": variant, "trained_with": trained_with, "update": index + 1}
        row["train_bpb"] = loss / LN2
        if (index + 1) % args.eval_every == 0 or index + 1 == len(driver):
            for with_resets in (True, False):
                bits = held_out.bits(model, with_resets)
                for name, value in bits.items():
                    row[f"eval_{'with' if with_resets else 'without'}_{name}"] = value
        curve.append(row)
        now = time.perf_counter()
        if now - clock["t"] > 5 or index + 1 == len(driver):
            recent = [r["train_bpb"] for r in curve[-max(1, len(driver) // 20) :]]
            print(
                f"  {label}: update {index + 1}/{len(driver)}  train "
                f"{sum(recent) / len(recent):.3f} bits/byte",
                flush=True,
            )
            clock["t"] = now

    log = fused_bptt.train_tbptt(
        model, driver, cross_entropy, optimizer, clip_grad_norm=args.clip, on_chunk=on_chunk
    )
    return model, curve, log


def run_variant(variant, args):
    updates_bytes = args.updates * args.k * args.streams + 1
    stream, starts, _, _ = make_stream(variant, updates_bytes, args.seed)
    held_out = HeldOut(variant, args)
    print(
        f"{variant}: {int(starts.sum())} training documents ({len(stream)} bytes), held out "
        f"{int(held_out.resets.sum())} documents; e.g. {bytes(stream[:60].tolist())!r}",
        flush=True,
    )
    rows, curves = [], []
    for trained_with in (True, False):
        model, curve, log = train_run(variant, trained_with, args, (stream, starts), held_out)
        curves += curve
        tail = log[-max(1, len(log) // 10) :]
        # Halfway through training: how fast each got there, not only where it ended.
        midway = next(r for r in curve if "eval_with_all" in r and r["update"] >= len(log) / 2)
        for evaluated_with in (True, False):
            bits = held_out.bits(model, evaluated_with)
            evaluated = "with" if evaluated_with else "without"
            rows.append(
                {
                    "variant": variant,
                    "trained": "with" if trained_with else "without",
                    "evaluated": evaluated,
                    "bpb_all": bits["all"],
                    f"bpb_first{args.first}": bits["first"],
                    "bpb_header_dep": bits["header_dep"],
                    "midway_update": midway["update"],
                    "midway_bpb_all": midway[f"eval_{evaluated}_all"],
                    "midway_bpb_header_dep": midway[f"eval_{evaluated}_header_dep"],
                    "train_bpb_last10pct": sum(tail) / len(tail) / LN2,
                }
            )
    return rows, curves


def plot(path, args, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("train_bpb", "training loss (bits/byte, running mean)"),
        ("first", f"held out: first {args.first} bytes of each document"),
        ("header_dep", "held out: the bytes the header decides"),
    )
    fig, axes = plt.subplots(
        len(args.variants), 3, figsize=(15, 4 * len(args.variants)), squeeze=False
    )
    for row_axes, variant in zip(axes, args.variants):
        for ax, (metric, title) in zip(row_axes, panels):
            for trained_with, color in ((True, "tab:blue"), (False, "tab:red")):
                rows = [
                    r
                    for r in curves
                    if r["variant"] == variant and r["trained_with"] == trained_with
                ]
                trained = f"trained {'with' if trained_with else 'without'}"
                if metric == "train_bpb":
                    values = [r["train_bpb"] for r in rows]
                    window = max(1, len(values) // 30)
                    smooth = [
                        sum(values[max(0, i - window + 1) : i + 1]) / min(window, i + 1)
                        for i in range(len(values))
                    ]
                    ax.plot([r["update"] for r in rows], smooth, color=color, label=trained)
                    continue
                for evaluated_with, style in ((True, "-"), (False, "--")):
                    key = f"eval_{'with' if evaluated_with else 'without'}_{metric}"
                    points = [(r["update"], r[key]) for r in rows if key in r]
                    ax.plot(
                        *zip(*points),
                        style,
                        marker=".",
                        color=color,
                        label=f"{trained}, evaluated {'with' if evaluated_with else 'without'}",
                    )
            ax.set_title(f"{variant}: {title}", fontsize=9)
            ax.set_xlabel("update")
            ax.set_ylabel("bits per byte")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(
        f"byte-level LM, FusedRNN H={args.hidden}, k={args.k}, B={args.streams}: "
        f"document boundaries in training (blue) or not (red); at evaluation (solid) or not "
        f"(dashed)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    """Trains both ways per variant, evaluates both ways, writes the outputs; returns the rows."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used = check_backend(args)
    with bench_util.torch_threads(args.threads):
        return run(args, used, out)


def run(args, used, out):
    header = (
        f"lm_boundaries: byte-level LM, Embedding({args.embed}) -> FusedRNN(H={args.hidden}, "
        f"backend {used}) -> Linear(256); StatefulTBPTT k={args.k}, B={args.streams}, "
        f"{args.updates} updates, Adam lr {args.lr}, clip {args.clip}, seed {args.seed}, "
        f"{torch.get_num_threads()} threads; fused_bptt from {Path(fused_bptt.__file__).parent}"
    )
    print(header, flush=True)
    start = time.perf_counter()
    rows, curves = [], []
    for variant in args.variants:
        variant_rows, variant_curves = run_variant(variant, args)
        rows += variant_rows
        curves += variant_curves
    text = "\n\n".join(
        [
            header,
            f"held-out bits per byte (a stream of {args.eval_bytes} bytes cut into "
            f"{args.eval_streams} streams, run from zeros without truncation); "
            f"first{args.first}: positions 0..{args.first - 1} of each document; header_dep: "
            f"the bytes the header decides (alphabet, unmarked: body and echo letters, ideal 2 "
            f"bits for a body letter and 0 for an echo letter; text: the name and the pronoun "
            f"after the title); midway: the same, held out, halfway through training\n"
            + format_table(rows),
            f"training and evaluation took {time.perf_counter() - start:.0f} s",
        ]
    )
    print("\n" + text)
    write_csv(out / "lm_boundaries.csv", rows)
    # Rows with and without held-out figures share one header: missing cells stay empty.
    keys = list(dict.fromkeys(k for r in curves for k in r))
    write_csv(out / "lm_boundaries_curves.csv", [{k: r.get(k, "") for k in keys} for r in curves])
    (out / "lm_boundaries.txt").write_text(text + "\n")
    plot(out / "lm_boundaries.png", args, curves)
    print(
        f"wrote lm_boundaries.csv, lm_boundaries_curves.csv, lm_boundaries.png, "
        f"lm_boundaries.txt to {out}"
    )
    return rows


if __name__ == "__main__":
    main()

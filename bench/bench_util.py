"""What the bench scripts share: the import of fused_bptt and the check for its compiled kernels,
CSV and text tables, and peak memory measured in a fresh process.

Peak memory: the process's peak resident set size (VmHWM) after the kernel's peak mark has been
reset to the current size (writing 5 to /proc/self/clear_refs, Linux only), minus that size:
everything the process touched (tensors, autograd graph, allocator slack), nothing it held
before. Measured in a fresh process per figure, so no allocator cache of an earlier one counts.
"""

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")
INSTALL = "pip install --no-build-isolation . in the checkout"


def import_fused_bptt(script):
    """The installed fused_bptt (the scripts measure what users install, not the checkout); exits
    naming the install command when it cannot be imported."""
    try:
        import fused_bptt
    except ImportError as error:
        raise SystemExit(
            f"{script}: cannot import fused_bptt ({error}); the bench scripts run the installed "
            f"package: {INSTALL}"
        ) from None
    return fused_bptt


def require_cpp_backend(script):
    """Exits unless FusedRNN runs the compiled CPU kernels here: a figure of the pure-PyTorch
    reference backend would pass for the kernels'."""
    backends = import_fused_bptt(script).available_backends()
    if "cpp" not in backends:
        raise SystemExit(
            f"{script}: FusedRNN would run the slow reference backend (backends here: "
            f"{backends}); install the package with its compiled kernels: {INSTALL}"
        )


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows, keys=None, float_format=".4f"):
    """rows (dicts) as right-aligned columns under a header, floats in float_format."""
    keys = keys or list(rows[0])
    cells = [
        [format(r[k], float_format) if isinstance(r[k], float) else str(r[k]) for k in keys]
        for r in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    return "\n".join(
        ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
        + ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    )


def save_figure(fig, path, dpi=100):
    """Lays out, writes and closes a matplotlib figure (a script makes several: an open figure
    would keep its memory)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _kib(field):
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


class PeakMemory:
    """with PeakMemory() as peak: ...  then peak.mib: the peak RSS above the start, MiB."""

    def __enter__(self):
        self.start = _kib("VmRSS")
        CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        return self

    def __exit__(self, *exc):
        self.mib = (_kib("VmHWM") - self.start) / 1024


def peak_memory_supported():
    return CLEAR_REFS.exists()


@contextlib.contextmanager
def torch_threads(threads):
    """--threads for the length of a main(): torch's thread count, 0 for torch's default (on a
    busy machine 1 is steadier: OpenMP threads stall the short steps when a core is taken). The
    count is put back afterwards: the mains are also called in-process (the tests)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def output_folder(path):
    """--out as a Path, the folder made if missing."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def worker_result(result):
    """A worker process's result: printed as JSON on its last line (what run_worker reads), and
    returned (a worker called in-process, as the smoke tests do)."""
    print(json.dumps(result))
    return result


def run_worker(script, arguments, package_file):
    """Runs `python script *arguments` in a fresh process that imports the same fused_bptt as
    this one (package_file: fused_bptt.__file__); returns the JSON its last line prints."""
    package_root = str(Path(package_file).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    }
    command = [sys.executable, str(script), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"worker {' '.join(command[1:])} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])

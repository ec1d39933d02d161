"""What the bench scripts share: CSV and text tables, and peak memory measured in a fresh process.

Peak memory: the process's peak resident set size (VmHWM) after the kernel's peak mark has been
reset to the current size (writing 5 to /proc/self/clear_refs, Linux only), minus that size:
everything the process touched (tensors, autograd graph, allocator slack), nothing it held
before. Measured in a fresh process per figure, so no allocator cache of an earlier one counts.
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

CLEAR_REFS = Path("/proc/self/clear_refs")


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

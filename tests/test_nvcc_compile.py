"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 against the installed torch headers,
with no warning, and ptxas reports no register spills for any kernel.

Runs wherever nvcc is (no GPU needed); skipped only where it is absent. The CPU torch wheel lacks
the generated c10/cuda/impl/cuda_cmake_macros.h, hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE. One nvcc
call per source builds both architectures (the host side, most of the time, is compiled once):
about a minute on 2 cores.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ["80", "90"]
# Every kernel template instance each architecture must contain (mangled-name fragments).
KERNELS = ["rnn_forward_persistent_kernelIf", "rnn_forward_persistent_kernelId",
           "rnn_backward_persistent_kernelIf", "rnn_backward_persistent_kernelId",
           "rnn_backward_step_kernelIf", "rnn_backward_step_kernelId"]


def nvcc_path():
    home = cpp_extension.CUDA_HOME
    found = os.path.join(home, "bin", "nvcc") if home else None
    return found if found and os.path.exists(found) else shutil.which("nvcc")


NVCC = nvcc_path()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")]


def nvcc_command(source, out):
    includes = [a for p in cpp_extension.include_paths() for a in ("-isystem", p)]
    return [NVCC, "-c", source, "-o", out, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
            *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS], "-Xptxas", "-v",
            "-Werror", "all-warnings", "-Xcompiler", "-fPIC",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            f"-I{os.path.join(ROOT, 'csrc')}", *includes,
            "-isystem", sysconfig.get_paths()["include"]]


def parse_ptxas(log, arch):
    """{kernel name: (registers, spill store bytes, spill load bytes)} for sm_`arch` from `ptxas -v`."""
    kernels = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current = m.group(1) if m.group(2) == arch else None
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            kernels[current] = [None, int(m.group(1)), int(m.group(2))]
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current in kernels:
            kernels[current][0] = int(m.group(1))
    return {k: tuple(v) for k, v in kernels.items()}


@pytest.fixture(scope="module")
def compiled():
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    out_dir = tempfile.mkdtemp(prefix="fused_bptt_nvcc_")
    try:
        results = {}
        for src in CUDA_SOURCES:
            out = os.path.join(out_dir, os.path.basename(src) + ".o")
            done = subprocess.run(nvcc_command(src, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=900)
            results[src] = (done.returncode, done.stdout)
        return results
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def test_compiles_without_warnings(compiled):
    for src, (rc, log) in compiled.items():
        assert rc == 0, f"nvcc failed for {src}:\n{log}"
        warnings = [l for l in log.splitlines() if "warning" in l.lower()]
        assert not warnings, f"{src} has warnings:\n" + "\n".join(warnings)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(compiled, arch):
    kernels = {}
    for src, (rc, log) in compiled.items():
        assert rc == 0, log
        kernels.update(parse_ptxas(log, arch))
    for fragment in KERNELS:
        assert any(fragment in name for name in kernels), f"sm_{arch}: no kernel {fragment} in:\n{kernels}"
    spilling = {k: v for k, v in kernels.items() if v[1] or v[2]}
    assert not spilling, f"sm_{arch}: kernels spill (registers, store bytes, load bytes): {spilling}"
    sys.stdout.write(f"\nsm_{arch} registers: " +
                     ", ".join(f"{f}={v[0]}" for f in KERNELS for k, v in kernels.items() if f in k) + "\n")

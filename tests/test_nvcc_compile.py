"""Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 against the installed torch headers,
with no warning; ptxas reports no register spills and no stack frame for any kernel; and the
machine code of the persistent kernels has the properties the latency fixes are for (sass.py).

Runs wherever nvcc is (no GPU needed); skipped only where it is absent. The machine-code checks
also need nvdisasm (`pip install nvidia-cuda-nvdisasm`: the CUDA toolkit here has no cuobjdump)
and skip with that message without it. The CPU torch wheel lacks the generated
c10/cuda/impl/cuda_cmake_macros.h, hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE. One nvcc call per
source builds both architectures (the host side, most of the time, is compiled once): about a
minute on 2 cores.
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

import sass_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ["80", "90"]
# Every kernel template instance each architecture must contain (mangled-name fragments).
KERNELS = [
    "rnn_forward_persistent_kernelIf",
    "rnn_forward_persistent_kernelId",
    "rnn_backward_persistent_kernelIf",
    "rnn_backward_persistent_kernelId",
    "rnn_backward_step_kernelIf",
    "rnn_backward_step_kernelId",
    "rnn_forward_step_kernelIf",
    "rnn_forward_step_kernelId",
]


def nvcc_path():
    home = cpp_extension.CUDA_HOME
    found = os.path.join(home, "bin", "nvcc") if home else None
    return found if found and os.path.exists(found) else shutil.which("nvcc")


NVCC = nvcc_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)"),
]


def nvcc_command(source, out):
    includes = [a for p in cpp_extension.include_paths() for a in ("-isystem", p)]
    return [
        NVCC,
        "-c",
        source,
        "-o",
        out,
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS],
        "-Xptxas",
        "-v",
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-fPIC",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-I{os.path.join(ROOT, 'csrc')}",
        *includes,
        "-isystem",
        sysconfig.get_paths()["include"],
    ]


def parse_ptxas(log, arch):
    """{kernel name: (registers, stack frame bytes, spill store bytes, spill load bytes)} for
    sm_`arch` from `ptxas -v`."""
    kernels = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current = m.group(1) if m.group(2) == arch else None
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m and current:
            kernels[current] = [None, int(m.group(1)), int(m.group(2)), int(m.group(3))]
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current in kernels:
            kernels[current][0] = int(m.group(1))
    return {k: tuple(v) for k, v in kernels.items()}


@pytest.fixture(scope="module")
def build_dir():
    path = tempfile.mkdtemp(prefix="fused_bptt_nvcc_")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def compiled(build_dir):
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    results = {}
    for src in CUDA_SOURCES:
        out = os.path.join(build_dir, os.path.basename(src) + ".o")
        # --keep leaves the cubin of each architecture in build_dir, for the machine-code checks.
        cmd = nvcc_command(src, out) + ["--keep", f"--keep-dir={build_dir}"]
        done = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
        )
        results[src] = (done.returncode, done.stdout)
    return results


def test_compiles_without_warnings(compiled):
    for src, (rc, log) in compiled.items():
        assert rc == 0, f"nvcc failed for {src}:\n{log}"
        warnings = [l for l in log.splitlines() if "warning" in l.lower()]
        assert not warnings, f"{src} has warnings:\n" + "\n".join(warnings)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_register_spills(compiled, arch):
    kernels = {}
    for rc, log in compiled.values():
        assert rc == 0, log
        kernels.update(parse_ptxas(log, arch))
    for fragment in KERNELS:
        assert any(fragment in name for name in kernels), (
            f"sm_{arch}: no kernel {fragment} in:\n{kernels}"
        )
    # A stack frame without spills would be a register array indexed at run time (the per-output
    # registers of the persistent kernels must stay registers).
    spilling = {k: v for k, v in kernels.items() if v[1] or v[2] or v[3]}
    assert not spilling, (
        f"sm_{arch}: kernels with a stack frame or spills (registers, stack, "
        f"spill store bytes, spill load bytes): {spilling}"
    )
    registers = ", ".join(f"{f}={v[0]}" for f in KERNELS for k, v in kernels.items() if f in k)
    sys.stdout.write(f"\nsm_{arch} registers: {registers}\n")


# ---- Machine code of the persistent kernels (the expert review's latency fixes 1-3) ----------

# The kernels' constants (csrc/cuda/block_matvec.cuh) the checks below are derived from.
K_TILE, K_ROWS, K_UNROLL = 4, 2, 4


@pytest.fixture(scope="module")
def machine_code(compiled, build_dir):
    """{arch: {kernel name: sass_checks.Kernel}} of every cubin nvcc left in build_dir."""
    nvdisasm = sass_checks.nvdisasm_path()
    if nvdisasm is None:
        pytest.skip(
            "nvdisasm not found, so the machine-code checks cannot run: install it with "
            "`pip install nvidia-cuda-nvdisasm` (this CUDA toolkit has no cuobjdump)"
        )
    for src, (rc, log) in compiled.items():
        assert rc == 0, f"nvcc failed for {src}:\n{log}"
    code = {}
    for cubin in sorted(glob.glob(os.path.join(build_dir, "*.cubin"))):
        arch, kernels = sass_checks.disassemble(nvdisasm, cubin)
        code.setdefault(arch, {}).update(kernels)
    return code


def persistent_kernels(machine_code, arch):
    assert arch in machine_code, f"no cubin for sm_{arch}: {sorted(machine_code)}"
    kernels = [k for name, k in machine_code[arch].items() if "persistent_kernel" in name]
    assert len(kernels) == 4, [k.name for k in kernels]  # forward, backward x float, double
    return kernels


def assert_no_problems(problems):
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("arch", ARCHS)
def test_staging_keeps_loads_in_flight(machine_code, arch):
    """Fix 1: aligned rows are staged by asynchronous 16-byte copies with no wait inside the
    loop; unaligned rows by at least 4 independent __ldcg loads before the first shared store."""
    problems = []
    for kernel in persistent_kernels(machine_code, arch):
        problems += sass_checks.async_staging_problems(kernel)
        problems += sass_checks.scalar_staging_problems(kernel, min_loads=4)
    assert_no_problems(problems)


@pytest.mark.parametrize("arch", ARCHS)
def test_matvec_loop_is_unrolled(machine_code, arch):
    """Fix 2: the matrix-vector loop runs K_UNROLL iterations per trip (K_ROWS x K_TILE FMAs
    each, K_ROWS inputs and one W tile loaded per iteration), the loads of at least two of them
    issued before the first FMA."""
    problems = []
    for kernel in persistent_kernels(machine_code, arch):
        problems += sass_checks.matvec_problems(
            kernel,
            min_fma=K_UNROLL * K_ROWS * K_TILE,
            min_loads=K_UNROLL * (K_ROWS + 1),
            min_loads_first=2 * (K_ROWS + 1),
        )
    assert_no_problems(problems)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_inputs_are_loaded_before_the_grid_barrier(machine_code, arch):
    """Fix 3: the projection (forward), grad_y and y (backward) are loaded before the grid
    barrier's wait; in the backward, h_{t-1} for the weight gradient is loaded between its
    arrive and its wait."""
    problems = []
    for kernel in persistent_kernels(machine_code, arch):
        if "forward" in kernel.name:
            problems += sass_checks.prefetch_problems(kernel, min_loads=1)
        else:
            problems += sass_checks.prefetch_problems(kernel, min_loads=2)
            problems += sass_checks.overlap_problems(kernel, min_loads=1)
    assert_no_problems(problems)

"""The C++ sources compile for a CPU that is not x86 (aarch64: Graviton, Apple silicon under
Linux): the AVX code is x86-only and the baseline step kernel is portable. Checked with a cross
compiler's syntax pass against this torch's headers; skipped where none is installed
(apt-get install g++-12-aarch64-linux-gnu). The portable kernel itself runs here through
FUSED_BPTT_CPU_ISA=sse2 (tests/test_cpu_kernel.py)."""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parent.parent
CROSS = next(
    (c for c in ("aarch64-linux-gnu-g++-12", "aarch64-linux-gnu-g++") if shutil.which(c)), None
)
SOURCES = sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (g++-12-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_for_aarch64(source):
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    command = [
        CROSS,
        "-std=c++20",
        "-fsyntax-only",
        "-fopenmp",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Werror",
        f"-I{ROOT / 'csrc'}",
        *includes,
        f"-I{sysconfig.get_paths()['include']}",
        "-DFUSED_BPTT_BUILD_INFO_CHARS=102",
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

"""The CUDA backend run on the CPU: csrc/cuda/rnn_launch.h and rnn_kernels.cuh compiled with g++
against the SIMT emulation (csrc/cuda/simt_emu.h), compared with fused_bptt.reference.

Two builds, both from the unchanged kernel source:
- tests/emu/rnn_emu.cpp, a torch extension registering torch.ops.fused_bptt_emu.* (its own namespace,
  so it coexists with fused_bptt._C); the emulated device (SMs, shared memory, co-resident blocks,
  threads per block, forced path) is set per test so small shapes reach the multi-block, partial-block
  and fallback paths, and last_launch() tells which path ran.
- tests/emu/tsan_main.cpp, no torch, built with -fsanitize=thread: the kernels must be race-free, a
  deliberately racy kernel must be reported, and the emulator must abort on misuse.

What the emulation cannot check (memory ordering, occupancy, timing, fast-math) is listed at the top
of csrc/cuda/simt_emu.h; tests/test_cuda.py checks those kernels on a real GPU.
"""
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from fused_bptt import reference
from conftest import assert_close, make_layer_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(ROOT, "tests", "emu")
BUILD_ROOT = os.environ.get("FUSED_BPTT_EMU_BUILD",
                            os.path.join(tempfile.gettempdir(), f"fused_bptt_emu_build_torch{torch.__version__}"))
# A deadlocked emulated launch aborts after this many seconds instead of hanging the test run.
os.environ.setdefault("SIMT_EMU_TIMEOUT_S", "60")

PERSISTENT, PER_STEP = True, False
KIB48 = 48 * 1024
# name: ((T, B, I, H), (num_sms, max_smem_per_block, max_coresident_blocks, threads, path), path expected)
# path: 0 auto, 1 persistent forced, 2 per-step forced.
CASES = {
    # T = 1: no grid barrier in the forward, one in the backward.
    "T1": ((1, 3, 2, 7), (3, KIB48, 4, 32, 0), PERSISTENT),
    # H = 10 in slices of 4, 4 and 2 units (3 blocks); 8 lanes per work item.
    "short_last_slice": ((3, 5, 4, 10), (4, KIB48, 4, 64, 0), PERSISTENT),
    # B = 33 (not a multiple of 32), H = 37 (not a multiple of the slice), several warps per block.
    "B33_H37": ((4, 33, 3, 37), (4, KIB48, 4, 128, 0), PERSISTENT),
    # One block owns every unit.
    "one_block": ((3, 2, 3, 9), (1, KIB48, 1, 64, 0), PERSISTENT),
    # Two wide slices (J = 35: 9 column tiles, the last one partial), 2 lanes per work item.
    "wide_slices": ((3, 2, 3, 70), (2, KIB48, 4, 64, 0), PERSISTENT),
    # B = 1: 16 and 32 lanes per work item (32 lanes on a dot of length 4, in one block: most lanes
    # add nothing).
    "lanes16": ((3, 1, 5, 32), (2, KIB48, 4, 64, 0), PERSISTENT),
    "lanes32": ((3, 1, 2, 4), (4, KIB48, 4, 64, 0), PERSISTENT),
    # Shared memory for 2 staged rows of h_{t-1} (forward) and 1 of dz_{t+1} (backward) out of B = 7.
    "row_tiles": ((4, 7, 3, 10), (4, 1520, 4, 64, 0), PERSISTENT),
    # Fallbacks: grid not co-resident; slice not in shared memory; per-step forced.
    "not_coresident": ((4, 33, 3, 37), (4, KIB48, 2, 128, 0), PER_STEP),
    "smem_too_small": ((3, 5, 4, 10), (4, 128, 4, 64, 0), PER_STEP),
    "per_step_forced": ((5, 4, 3, 12), (4, KIB48, 4, 64, 2), PER_STEP),
}


def _build_emulated_ops():
    from torch.utils import cpp_extension

    build_dir = os.path.join(BUILD_ROOT, "ops")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name="fused_bptt_emu", sources=[os.path.join(EMU, "rnn_emu.cpp"),
                                                       os.path.join(CSRC, "checks.cpp")],
                       extra_include_paths=[CSRC], extra_cflags=["-std=c++20", "-O2", "-Wall"],
                       build_directory=build_dir, is_python_module=False, verbose=False)
    return torch.ops.fused_bptt_emu


@pytest.fixture(scope="module")
def emu():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the emulated CUDA ops")
    return _build_emulated_ops()


def run_case(emu, case, dtype, relu, bias):
    (T, B, I, H), device, expected_path = CASES[case]
    emu.set_device(*device)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, dtype, bias=bias, seed=T * 100 + H)
    grad_y = make_layer_inputs(T, B, H, H, dtype, seed=7)[0]
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    forward_launch = list(emu.last_launch())
    grads = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, relu)
    backward_launch = list(emu.last_launch())

    # The oracle in float64 from the same (rounded) inputs.
    d = [t.double() if t is not None else None for t in (x, h0, w_ih, w_hh, b_ih, b_hh, grad_y)]
    y_ref = reference.rnn_forward(*d[:6], relu=relu)
    grads_ref = reference.rnn_backward(d[6], d[0], d[1], d[2], d[3], y.double(), relu=relu)
    return y, y_ref, grads, grads_ref, forward_launch, backward_launch, expected_path


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_matches_reference_float64(emu, case, relu, bias):
    y, y_ref, grads, grads_ref, fwd, bwd, persistent = run_case(emu, case, torch.float64, relu, bias)
    assert bool(fwd[0]) == persistent and bool(bwd[0]) == persistent, (
        f"{case}: expected the {'persistent' if persistent else 'per-step'} path, "
        f"ran forward {fwd}, backward {bwd} ([persistent, grid, J, group, b_tile, smem])")
    assert_close(y, y_ref, name="y")
    for name, g, r in zip(["dx", "dh0", "dW_ih", "dW_hh", "db"], grads, grads_ref):
        assert_close(g, r, name=name)


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("case", ["short_last_slice", "B33_H37", "wide_slices", "row_tiles", "not_coresident"])
def test_emulated_matches_reference_float32(emu, case, relu):
    y, y_ref, grads, grads_ref, *_ = run_case(emu, case, torch.float32, relu, True)
    assert y.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert_close(y, y_ref, dtype=torch.float32, name="y")
    for name, g, r in zip(["dx", "dh0", "dW_ih", "dW_hh", "db"], grads, grads_ref):
        assert_close(g, r, dtype=torch.float32, name=name)


def test_emulated_launch_plans(emu):
    """The launch plans the tests above rely on: [persistent, grid, J, group, b_tile]."""
    expected = {"short_last_slice": ([1, 3, 4, 8, 5], [1, 3, 4, 8, 5]),
                "B33_H37": ([1, 4, 10, 1, 33], [1, 4, 10, 1, 33]),
                "lanes16": ([1, 2, 16, 16, 1], [1, 2, 16, 16, 1]),
                "lanes32": ([1, 1, 4, 32, 1], [1, 1, 4, 32, 1]),
                "row_tiles": ([1, 3, 4, 32, 2], [1, 3, 4, 32, 1])}
    for case, (want_fwd, want_bwd) in expected.items():
        *_, fwd, bwd, _ = run_case(emu, case, torch.float64, False, True)
        assert (fwd[:5], bwd[:5]) == (want_fwd, want_bwd), case


def test_emulated_backward_is_deterministic(emu):
    emu.set_device(4, KIB48, 4, 64, 1)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, 5, 3, 10, torch.float32)
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    grad_y = torch.randn_like(y)
    first = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
    second = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_emulated_non_contiguous_inputs(emu):
    emu.set_device(4, KIB48, 4, 64, 0)
    T, B, I, H = 3, 4, 5, 6
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, torch.float64)
    # Strided views made by slicing wider tensors, and a transposed weight.
    x_nc = torch.zeros(T, B, 2 * I, dtype=torch.float64)[:, :, ::2].copy_(x)
    w_hh_nc = w_hh.t().contiguous().t()
    grad_y = torch.zeros(T, B, 2 * H, dtype=torch.float64)[:, :, 1::2].normal_()
    assert not x_nc.is_contiguous() and not w_hh_nc.is_contiguous() and not grad_y.is_contiguous()
    y = emu.rnn_forward(x_nc, h0, w_ih, w_hh_nc, b_ih, b_hh, False)
    assert_close(y, reference.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh), name="y")
    grads = emu.rnn_backward(grad_y, x_nc, h0, w_ih, w_hh_nc, y, False)
    grads_ref = reference.rnn_backward(grad_y.contiguous(), x, h0, w_ih, w_hh, y)
    for name, g, r in zip(["dx", "dh0", "dW_ih", "dW_hh", "db"], grads, grads_ref):
        assert_close(g, r, name=name)


def test_emulated_errors(emu):
    emu.set_device(4, 128, 4, 64, 1)  # persistent forced, but the slice does not fit in 128 bytes
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(2, 3, 4, 10, torch.float64)
    with pytest.raises(RuntimeError, match="persistent CUDA kernel was forced"):
        emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    emu.set_device(4, KIB48, 4, 64, 0)
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[10, 10\]"):
        emu.rnn_forward(x, h0, w_ih, w_hh[:, :9], b_ih, b_hh, False)
    with pytest.raises(RuntimeError, match="path must be 0"):
        emu.set_device(4, KIB48, 4, 64, 3)


def test_emulated_empty_batch(emu):
    emu.set_device(4, KIB48, 4, 64, 0)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(3, 0, 2, 5, torch.float64)
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    assert y.shape == (3, 0, 5)
    dx, dh0, dw_ih, dw_hh, db = emu.rnn_backward(torch.zeros_like(y), x, h0, w_ih, w_hh, y, False)
    assert dx.shape == x.shape and dh0.shape == h0.shape
    assert not dw_ih.any() and not dw_hh.any() and not db.any()


# ---- ThreadSanitizer on the kernels, without torch ------------------------------------------------

@pytest.fixture(scope="module")
def tsan_binary():
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the ThreadSanitizer build")
    out_dir = os.path.join(BUILD_ROOT, "tsan")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "tsan_main")
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-Wall", "-Wextra", "-Werror",
           f"-I{CSRC}", os.path.join(EMU, "tsan_main.cpp"), "-o", exe]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"TSan build failed:\n{' '.join(cmd)}\n{done.stderr}"
    return exe


def run_tsan(exe, mode):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66", SIMT_EMU_TIMEOUT_S="60")
    done = subprocess.run([exe, mode], capture_output=True, text=True, timeout=180, env=env)
    out = done.stdout + done.stderr
    if "unexpected memory mapping" in out and shutil.which("setarch"):
        # Kernels with high mmap ASLR entropy break TSan's shadow memory: run without ASLR.
        done = subprocess.run(["setarch", os.uname().machine, "-R", exe, mode], capture_output=True,
                              text=True, timeout=180, env=env)
        out = done.stdout + done.stderr
    return done.returncode, out


def test_tsan_kernels_race_free_and_correct(tsan_binary):
    rc, out = run_tsan(tsan_binary, "rnn")
    assert "ThreadSanitizer" not in out, out
    assert rc == 0, f"kernels disagree with the naive loops (rc={rc}):\n{out}"
    assert out.count("max |") == 6, out


def test_tsan_emulator_warp_ops_and_atomics(tsan_binary):
    rc, out = run_tsan(tsan_binary, "warp_ops")
    assert "ThreadSanitizer" not in out, out
    assert rc == 0 and "warp ops ok" in out, f"rc={rc}\n{out}"


def test_tsan_flags_a_racy_kernel(tsan_binary):
    """Negative control: without it, a silent TSan would pass the test above."""
    rc, out = run_tsan(tsan_binary, "race")
    assert "WARNING: ThreadSanitizer: data race" in out, out
    assert "racy_kernel" in out and "tsan_main.cpp" in out, out
    assert rc == 66, out


@pytest.mark.parametrize("mode, message", [
    ("partial_warp", "not exactly the warp's live lanes"),
    ("grid_sync", "grid_sync() outside a cooperative launch"),
])
def test_emulator_aborts_on_misuse(tsan_binary, mode, message):
    rc, out = run_tsan(tsan_binary, mode)
    assert rc != 0 and message in out, f"rc={rc}\n{out}"

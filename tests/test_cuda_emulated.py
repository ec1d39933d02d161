"""The CUDA backend run on the CPU: csrc/cuda/rnn_launch.h and the kernels compiled with g++
against the SIMT emulation (tests/emu/simt_emu.h), compared with fused_bptt.reference.

Two builds, both from the unchanged kernel source:
- tests/emu/rnn_emu.cpp, a torch extension with CPU kernels for torch.ops.fused_bptt_emu.* (its
  own namespace, so it coexists with fused_bptt._C; the schemas are the real ops', taken from
  fused_bptt._C). The emulated device (SMs, shared memory, co-resident blocks, threads per block,
  forced path, refused cooperative launches) is set per test so small shapes reach the
  multi-block, batch-group, partial-block and fallback paths, and last_launch() tells which path
  and plan ran.
- tests/emu/tsan_main.cpp, no torch, built with -fsanitize=thread: the kernels must be race-free,
  a deliberately racy kernel must be reported, and the emulator must abort on misuse.

What the emulation cannot check (memory ordering, occupancy, timing, fast-math) is listed at the
top of tests/emu/simt_emu.h; tests/test_cuda.py checks those kernels on a real GPU.
"""

import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest
import torch

from boundary_cases import BOUND_KINDS, compare_bounded, make_bounds
from conftest import GRAD_NAMES, assert_close, compare_to_reference, make_layer_inputs
from fused_bptt import _ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(ROOT, "tests", "emu")
# One build directory per checkout: two checkouts sharing one would rebuild over each other.
_CHECKOUT = hashlib.sha1(ROOT.encode()).hexdigest()[:8]
BUILD_ROOT = os.environ.get(
    "FUSED_BPTT_EMU_BUILD",
    os.path.join(tempfile.gettempdir(), f"fused_bptt_emu_{_CHECKOUT}_torch{torch.__version__}"),
)
# The kernels' `#pragma unroll` is CUDA's; GCC before 13 cannot be told to ignore it from source.
EMU_WARNINGS = ["-Wno-unknown-pragmas"]
# A deadlocked emulated launch aborts after this many seconds instead of hanging the test run.
os.environ.setdefault("SIMT_EMU_TIMEOUT_S", "60")

PERSISTENT, PER_STEP = True, False
KIB48 = 48 * 1024


def device(sms, smem=KIB48, coresident=4, threads=64, path="auto", refuse=False):
    """The emulated device: set_device's arguments."""
    return (sms, smem, coresident, threads, path, refuse)


# name: ((T, B, I, H), device, path expected)
CASES = {
    # T = 1: no grid barrier in the forward, one in the backward.
    "T1": ((1, 3, 2, 7), device(3, threads=32), PERSISTENT),
    # H = 10 in slices of 4, 4 and 2 units (3 blocks); 8 lanes per work item.
    "short_last_slice": ((3, 5, 4, 10), device(4), PERSISTENT),
    # B = 33 in 2 groups of 17 and 16 rows x 2 slices of 20 and 17 units; H = 37 is odd (scalar
    # staging); several warps per block.
    "batch_groups": ((4, 33, 3, 37), device(4, threads=128), PERSISTENT),
    # B = 64 in 4 groups of 16 x 2 slices (8 and 4 units): 8 blocks.
    "batch_groups4": ((2, 64, 3, 12), device(8, coresident=8), PERSISTENT),
    # B = 33 but a shared memory too small for the backward's batch split: one group, staged 10
    # rows at a time (the forward still splits).
    "no_split_bwd": ((3, 33, 3, 37), device(4, smem=16000, threads=128), PERSISTENT),
    # One block owns every unit.
    "one_block": ((3, 2, 3, 9), device(1, coresident=1), PERSISTENT),
    # Two wide slices (J = 36: 9 column tiles, the last one partial), 2 lanes per work item.
    "wide_slices": ((3, 2, 3, 70), device(2), PERSISTENT),
    # B = 1: 16 and 32 lanes per work item (32 lanes on a dot of length 4, in one block: most
    # lanes add nothing).
    "lanes16": ((3, 1, 5, 32), device(2), PERSISTENT),
    "lanes32": ((3, 1, 2, 4), device(4), PERSISTENT),
    # Shared memory for 3 staged rows of h_{t-1} (forward) and 1 of dz_{t+1} (backward) of B = 7.
    "row_tiles": ((4, 7, 3, 10), device(4, smem=1200), PERSISTENT),
    # 10 column tiles and 32 threads: one work item per lane allows 6 rows per staged tile.
    "items_limit": ((2, 20, 3, 40), device(1, coresident=1, threads=32), PERSISTENT),
    # The ways into the per-step path: grid not co-resident; slice not in shared memory;
    # per-step forced; the cooperative launch refused (as under MPS limits).
    "not_coresident": ((4, 33, 3, 37), device(4, coresident=2, threads=128), PER_STEP),
    "smem_too_small": ((3, 5, 4, 10), device(4, smem=128), PER_STEP),
    "per_step_forced": ((5, 4, 3, 12), device(4, path="per_step"), PER_STEP),
    "refused": ((3, 5, 4, 10), device(4, refuse=True), PER_STEP),
}
# last_launch(): [persistent, refused, grid, J, slices, rows, b_tile, group, smem]
LAUNCH_FIELDS = ["persistent", "refused", "grid", "J", "slices", "rows", "b_tile", "group", "smem"]

_fragment = None  # keeps the schema definitions of fused_bptt_emu alive


def _build_emulated_ops():
    from torch.utils import cpp_extension

    global _fragment
    build_dir = os.path.join(BUILD_ROOT, "ops")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="fused_bptt_emu",
        sources=[os.path.join(EMU, "rnn_emu.cpp"), os.path.join(CSRC, "checks.cpp")],
        extra_include_paths=[CSRC],
        extra_cflags=["-std=c++20", "-O2", "-Wall"] + EMU_WARNINGS,
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    if _fragment is None:
        # The real ops' schemas, renamed into fused_bptt_emu: the emulated ops take exactly the
        # arguments fused_bptt._C's do.
        _fragment = torch.library.Library("fused_bptt_emu", "FRAGMENT")
        for op in ("rnn_forward", "rnn_backward"):
            schema = str(getattr(torch.ops.fused_bptt, op).default._schema)
            _fragment.define(schema.split("::", 1)[1])
    return torch.ops.fused_bptt_emu


@pytest.fixture(scope="module")
def emu():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the emulated CUDA ops")
    if not _ops.loaded():
        pytest.skip(
            f"fused_bptt._C, whose op schemas the emulated ops take, did not load: "
            f"{_ops.LOAD_ERROR}"
        )
    return _build_emulated_ops()


def launches(emu, case, dtype, relu, bias, grad_h_n=False):
    """Runs `case` against the reference; returns last_launch() of the forward and the backward."""
    (T, B, I, H), dev, _ = CASES[case]
    emu.set_device(*dev)
    inputs = make_layer_inputs(T, B, I, H, dtype, bias=bias, seed=T * 100 + H)
    records = []

    def forward(*args):
        y = emu.rnn_forward(*args)
        records.append(list(emu.last_launch()))
        return y

    def backward(*args):
        grads = emu.rnn_backward(*args)
        records.append(list(emu.last_launch()))
        return grads

    compare_to_reference(forward, backward, inputs, relu, grad_h_n=grad_h_n, label=case)
    return records


def assert_path(case, records):
    persistent = CASES[case][2]
    for direction, rec in zip(["forward", "backward"], records):
        assert bool(rec[0]) == persistent, (
            f"{case} {direction}: expected the {'persistent' if persistent else 'per-step'} "
            f"path, ran {dict(zip(LAUNCH_FIELDS, rec))}"
        )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_matches_reference_float64(emu, case, relu, bias):
    assert_path(case, launches(emu, case, torch.float64, relu, bias))


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize(
    "case",
    ["short_last_slice", "batch_groups", "wide_slices", "row_tiles", "not_coresident", "refused"],
)
def test_emulated_matches_reference_float32(emu, case, relu):
    assert_path(case, launches(emu, case, torch.float32, relu, True))


@pytest.mark.parametrize(
    "case", ["T1", "short_last_slice", "batch_groups", "row_tiles", "per_step_forced", "refused"]
)
def test_emulated_grad_h_n(emu, case):
    """grad_h_n joins grad_y[T-1] inside the kernels (persistent and per-step)."""
    assert_path(case, launches(emu, case, torch.float64, False, True, grad_h_n=True))


def test_emulated_launch_plans(emu):
    """The plans the cases above rely on: forward and backward
    [persistent, refused, grid, J, slices, rows, b_tile, group, smem]."""
    expected = {
        "short_last_slice": [[1, 0, 3, 4, 3, 5, 5, 16, 1760], [1, 0, 3, 4, 3, 5, 5, 16, 2272]],
        "batch_groups": [[1, 0, 4, 20, 2, 17, 17, 2, 15168], [1, 0, 4, 20, 2, 17, 17, 2, 23968]],
        "batch_groups4": [[1, 0, 8, 8, 2, 16, 16, 4, 5760], [1, 0, 8, 8, 2, 16, 16, 4, 7616]],
        "no_split_bwd": [[1, 0, 4, 20, 2, 17, 17, 2, 15168], [1, 0, 4, 12, 4, 33, 10, 8, 15808]],
        "wide_slices": [[1, 0, 2, 36, 2, 2, 2, 4, 21760], [1, 0, 2, 36, 2, 2, 2, 4, 42784]],
        "lanes16": [[1, 0, 2, 16, 2, 1, 1, 16, 5408], [1, 0, 2, 16, 2, 1, 1, 16, 9760]],
        "lanes32": [[1, 0, 1, 4, 1, 1, 1, 32, 416], [1, 0, 1, 4, 1, 1, 1, 32, 608]],
        "row_tiles": [[1, 0, 3, 4, 3, 7, 3, 32, 1184], [1, 0, 3, 4, 3, 7, 1, 32, 1184]],
        "items_limit": [[1, 0, 1, 40, 1, 20, 6, 1, 17344], [1, 0, 1, 40, 1, 20, 6, 1, 36864]],
        "refused": [[0, 1, 3, 4, 3, 5, 5, 16, 1760], [0, 1, 3, 4, 3, 5, 5, 16, 2272]],
    }
    got = {case: launches(emu, case, torch.float64, False, True) for case in expected}
    assert got == expected
    # J (units per block) is a multiple of 4 in every plan: no FMA is spent on padding columns but
    # in a short last slice.
    for case in CASES:
        for record in launches(emu, case, torch.float64, False, True):
            assert record[3] % 4 == 0, (case, dict(zip(LAUNCH_FIELDS, record)))


def test_emulated_backward_is_deterministic(emu):
    for dev, B in [(device(4, path="persistent"), 5), (device(4, threads=128), 33)]:
        emu.set_device(*dev)
        x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, B, 3, 10, torch.float32)
        y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
        grad_y = torch.randn_like(y)
        first = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
        second = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
        for name, a, b in zip(GRAD_NAMES, first, second):
            assert torch.equal(a, b), f"B={B}: {name} differs between two identical calls"


@pytest.mark.parametrize("path", ["persistent", "per_step"])
def test_emulated_relu_backward_passes_nan_like_autograd(emu, path):
    """relu's backward is a select, as autograd's: where y <= 0 the gradient is 0 even if it is
    NaN, and where y is NaN the gradient passes on (a multiply by [y > 0] gets both wrong)."""
    emu.set_device(*device(4, path=path))
    T, B, I, H = 3, 4, 3, 10
    x, h0, w_ih, w_hh, _, _ = make_layer_inputs(T, B, I, H, torch.float64)
    y = emu.rnn_forward(x, h0, w_ih, w_hh, None, None, True)
    grad_y = torch.randn_like(y)
    y = y.clone()
    y[T - 1, 0, :3] = float("nan")  # last step only: y[T-1] is no h_{t-1}, dW_hh stays finite
    negative = (y <= 0).nonzero()
    assert len(negative) >= 2
    for t, b, j in negative[:: max(1, len(negative) // 4)].tolist():
        grad_y[t, b, j] = float("nan")  # dropped where y <= 0
    grads = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, True)
    assert emu.last_launch()[0] == (path == "persistent")
    grads_ref = reference.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, relu=True)
    for name, g, r in zip(GRAD_NAMES, grads, grads_ref):
        assert torch.isfinite(r).all(), name
        assert_close(g, r, name=name)


def test_emulated_non_contiguous_inputs(emu):
    emu.set_device(*device(4))
    T, B, I, H = 3, 4, 5, 6
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, torch.float64)
    # Strided views made by slicing wider tensors, and a transposed weight.
    x_nc = torch.zeros(T, B, 2 * I, dtype=torch.float64)[:, :, ::2].copy_(x)
    w_hh_nc = w_hh.t().contiguous().t()
    grad_y = torch.zeros(T, B, 2 * H, dtype=torch.float64)[:, :, 1::2].normal_()
    ghn = torch.zeros(B, 2 * H, dtype=torch.float64)[:, ::2].normal_()
    # h0 one element into its storage: contiguous, but its rows are not 16-byte aligned, so the
    # kernel stages them with scalar loads.
    h0_off = torch.zeros(B * H + 1, dtype=torch.float64)[1:].view(B, H).copy_(h0)
    assert h0_off.data_ptr() % 16 != 0
    assert not x_nc.is_contiguous() and not w_hh_nc.is_contiguous()
    assert not grad_y.is_contiguous() and not ghn.is_contiguous()
    y = emu.rnn_forward(x_nc, h0_off, w_ih, w_hh_nc, b_ih, b_hh, False)
    assert emu.last_launch()[0] == 1
    assert_close(y, reference.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh), name="y")
    grads = emu.rnn_backward(grad_y, x_nc, h0_off, w_ih, w_hh_nc, y, False, ghn)
    grads_ref = reference.rnn_backward(
        grad_y.contiguous(), x, h0, w_ih, w_hh, y, grad_h_n=ghn.contiguous()
    )
    for name, g, r in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(g, r, name=name)


def test_emulated_errors(emu):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(2, 3, 4, 10, torch.float64)
    # Persistent forced, but the slice does not fit in 128 bytes / the launch is refused.
    emu.set_device(*device(4, smem=128, path="persistent"))
    with pytest.raises(RuntimeError, match="persistent CUDA kernel was forced but cannot run"):
        emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    emu.set_device(*device(4, path="persistent", refuse=True))
    with pytest.raises(RuntimeError, match="forced but the device refused its cooperative"):
        emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    emu.set_device(*device(4))
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[10, 10\]"):
        emu.rnn_forward(x, h0, w_ih, w_hh[:, :9], b_ih, b_hh, False)
    with pytest.raises(RuntimeError, match="path must be auto, persistent or per_step"):
        emu.set_device(*device(4, path="fast"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_emulated_empty_batch(emu, dtype):
    """B = 0: the float and the bf16/fp16 launchers return zero gradients of the right shapes
    (BackwardInputs in rnn_launch.h) without a kernel launch."""
    emu.set_device(*device(4))
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(3, 0, 2, 5, dtype)
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    assert y.shape == (3, 0, 5)
    dx, dh0, dw_ih, dw_hh, db = emu.rnn_backward(torch.zeros_like(y), x, h0, w_ih, w_hh, y, False)
    assert dx.shape == x.shape and dh0.shape == h0.shape and db.shape == (5,)
    assert not dw_ih.any() and not dw_hh.any() and not db.any()
    assert all(g.dtype == dtype for g in (dx, dh0, dw_ih, dw_hh, db))


# ---- Sequence boundaries: resets [T, B] and lengths [B] (fused_bptt.h) -------------------------


# The paths boundaries must run through: T = 1, several blocks, batch groups, staged row tiles
# (prefetches inside block_matvec), and the per-step path forced, refused and not co-resident.
BOUND_PATHS = [
    "T1",
    "short_last_slice",
    "batch_groups",
    "row_tiles",
    "per_step_forced",
    "refused",
    "not_coresident",
]


def run_bounded(emu, case, kind, relu, dtype=torch.float64):
    """The emulated ops with resets/lengths against the reference (boundary_cases); returns the
    launch records of the forward and the backward."""
    (T, B, I, H), dev, _ = CASES[case]
    emu.set_device(*dev)
    records = []

    def recorded(op):
        def run(*args):
            out = op(*args)
            records.append(list(emu.last_launch()))
            return out

        return run

    inputs = make_layer_inputs(T, B, I, H, dtype, seed=T * 100 + H)
    resets, lengths = make_bounds(kind, T, B, seed=B + H)
    compare_bounded(
        recorded(emu.rnn_forward),
        recorded(emu.rnn_backward),
        inputs,
        relu,
        resets,
        lengths,
        label=f"{case} {kind}",
    )
    return records


@pytest.mark.parametrize("kind", BOUND_KINDS)
@pytest.mark.parametrize("case", BOUND_PATHS)
def test_emulated_boundaries_match_reference(emu, case, kind):
    assert_path(case, run_bounded(emu, case, kind, relu=False))


@pytest.mark.parametrize("case", ["short_last_slice", "batch_groups", "per_step_forced"])
def test_emulated_boundaries_relu_and_float32(emu, case):
    assert_path(case, run_bounded(emu, case, "both", relu=True))
    assert_path(case, run_bounded(emu, case, "both", relu=False, dtype=torch.float32))


@pytest.mark.parametrize("path", ["persistent", "per_step"])
def test_emulated_reset_drops_a_non_finite_state(emu, path):
    """A reset state is a constant 0, as in the reference: an inf in h0 or y[t-1] of a reset row
    reaches neither y nor any gradient (a multiply by 0 would make NaN)."""
    emu.set_device(*device(4, path=path))
    T, B, I, H = 3, 4, 3, 10
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, torch.float64)
    h0[1, 2] = float("inf")
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[0, 1] = True
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False, resets, None)
    assert torch.isfinite(y).all()
    grads = emu.rnn_backward(torch.ones_like(y), x, h0, w_ih, w_hh, y, False, None, resets, None)
    grads_ref = reference.rnn_backward(
        torch.ones_like(y), x, h0, w_ih, w_hh, y, False, None, resets
    )
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        # dW_hh left out: the reference's dz_rec^T h_prev (as the per-step path's GEMM) has
        # 0 * inf = NaN where h0 holds the inf.
        if name != "dW_hh":
            assert torch.isfinite(got).all(), name
            assert_close(got, want, name=name)


def test_emulated_boundary_errors_read_as_on_the_cpu(emu):
    """resets/lengths are validated by the checks the CPU op shares (csrc/checks.cpp): the same
    message, word for word."""
    emu.set_device(*device(4))
    T, B = 3, 4
    args = make_layer_inputs(T, B, 2, 5, torch.float64)
    bad = {
        "resets shape": (torch.zeros(T, B + 1, dtype=torch.bool), None),
        "resets dtype": (torch.zeros(T, B), None),
        "lengths shape": (None, torch.full((B, 1), T)),
        "lengths dtype": (None, torch.full((B,), T, dtype=torch.int32)),
        "lengths 0": (None, torch.tensor([T, 0, 1, 1])),
        "lengths > T": (None, torch.tensor([T, T + 1, 1, 1])),
    }
    for what, (resets, lengths) in bad.items():
        with pytest.raises(RuntimeError) as cpu:
            torch.ops.fused_bptt.rnn_forward(*args, False, resets, lengths)
        with pytest.raises(RuntimeError) as emulated:
            emu.rnn_forward(*args, False, resets, lengths)
        assert "resets" in str(cpu.value) or "lengths" in str(cpu.value), (what, cpu.value)
        assert str(emulated.value).splitlines()[0] == str(cpu.value).splitlines()[0], what


# ---- ThreadSanitizer on the kernels, without torch ------------------------------------------


def build_tsan(name):
    """Builds tests/emu/<name>.cpp with g++ -fsanitize=thread (no torch); returns the binary."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the ThreadSanitizer build")
    out_dir = os.path.join(BUILD_ROOT, "tsan")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, name)
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-Wall", "-Wextra", "-Werror"]
    cmd += [*EMU_WARNINGS, f"-I{CSRC}", os.path.join(EMU, f"{name}.cpp"), "-o", exe]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"TSan build failed:\n{' '.join(cmd)}\n{done.stderr}"
    return exe


@pytest.fixture(scope="module")
def tsan_binary():
    return build_tsan("tsan_main")


def run_tsan(exe, mode):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66", SIMT_EMU_TIMEOUT_S="60")
    done = subprocess.run([exe, mode], capture_output=True, text=True, timeout=180, env=env)
    out = done.stdout + done.stderr
    if "unexpected memory mapping" in out and shutil.which("setarch"):
        # Kernels with high mmap ASLR entropy break TSan's shadow memory: run without ASLR.
        done = subprocess.run(
            ["setarch", os.uname().machine, "-R", exe, mode],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        out = done.stdout + done.stderr
    return done.returncode, out


def test_tsan_kernels_race_free_and_correct(tsan_binary):
    rc, out = run_tsan(tsan_binary, "rnn")
    assert "ThreadSanitizer" not in out, out
    assert rc == 0, f"kernels disagree with the naive loops (rc={rc}):\n{out}"
    assert out.count("max |") == 18, out


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


@pytest.mark.parametrize(
    "mode, message",
    [
        ("partial_warp", "not exactly the warp's live lanes"),
        ("grid_sync", "grid barrier outside a cooperative launch"),
        ("early_exit", "returned from the kernel while others wait at a grid barrier"),
        ("misaligned", "misaligned vector access"),
    ],
)
def test_emulator_aborts_on_misuse(tsan_binary, mode, message):
    rc, out = run_tsan(tsan_binary, mode)
    assert rc != 0 and message in out, f"rc={rc}\n{out}"

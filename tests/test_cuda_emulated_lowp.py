"""The bfloat16/float16 CUDA kernels (csrc/cuda/rnn_kernels_lowp.cuh, host side
csrc/cuda/rnn_launch_lowp.h) run on the CPU through the SIMT emulation, with the tensor-core
instruction emulated by tests/emu/mma_emu.h (each lane holds exactly its registers per the PTX ISA;
the instruction exchanges them across the warp).

- The emulated mma on its own: random A and B, every lane's fragment registers (as the kernels'
  loaders fill them) checked against the ISA's layout table written out below, and D against a
  plain matmul.
- The ops against the float64 reference: normwise bounds of tests/test_lowp.py on small shapes
  that reach every part of a plan (several blocks, a short last block, several row tiles, H not a
  multiple of 8 or 16, B not a multiple of 16), on the persistent path, the per-step path and a
  device without bf16/fp16 mma; resets and lengths; the issue's criterion (error <= 1.5x
  nn.RNN's own error in the dtype, measured as bench/accuracy_lowp.py does) at the issue's
  shapes; determinism; opcheck; the errors of a forced path that cannot run.

Builds: the emulated ops of tests/test_cuda_emulated.py (same extension, same build directory).
"""

import pytest
import torch
from test_cuda_emulated import device, emu  # noqa: F401  (emu: the module-scoped fixture)
from test_lowp import (
    BOUNDS,
    NAMES,
    accuracy,
    assert_at_most_1_5x_nn_rnn,
    relative_errors,
    run_reference,
)

from conftest import LOW_PRECISION_DTYPES, make_layer_inputs

dtype_ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


# ---- the emulated mma.sync.aligned.m16n8k16 on its own -----------------------------------------
# The PTX ISA's fragment layout for mma.m16n8k16 with .f16/.bf16 A and B and .f32 C/D, as
# (register, half, row, column) of each element a lane holds; groupID g = lane >> 2,
# threadID_in_group q = lane % 4.


def a_layout(lane):
    g, q = lane >> 2, lane % 4
    rows = [g if (i < 2 or 4 <= i < 6) else g + 8 for i in range(8)]
    cols = [2 * q + (i & 1) + (8 if i >= 4 else 0) for i in range(8)]
    return [(i // 2, i % 2, rows[i], cols[i]) for i in range(8)]


def b_layout(lane):
    g, q = lane >> 2, lane % 4
    return [(i // 2, i % 2, 2 * q + (i & 1) + (8 if i >= 2 else 0), g) for i in range(4)]


def c_layout(lane):
    g, q = lane >> 2, lane % 4
    return [(i, g + (8 if i >= 2 else 0), 2 * q + (i & 1)) for i in range(4)]


def bits(t):
    """The 16-bit patterns of a bfloat16/float16 tensor, as Python ints."""
    return (t.view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("ld", [16, 24, 40])
def test_emulated_mma_fragments_and_product(emu, dtype, ld):  # noqa: F811
    g = torch.Generator().manual_seed(ld)
    a = torch.randn(16, 16, generator=g).to(dtype)
    bt = torch.randn(8, 16, generator=g).to(dtype)  # B = bt^T: B[k][n] = bt[n][k]
    c = torch.randn(16, 8, generator=g)
    regs, d = emu.mma_tile(a, bt, c, ld)
    a_bits, b_bits = bits(a), bits(bt.t())
    regs = (regs.to(torch.int64) & 0xFFFFFFFF).tolist()
    for lane in range(32):
        for reg, half, row, col in a_layout(lane):
            got = (regs[lane][reg] >> (16 * half)) & 0xFFFF
            assert got == a_bits[row][col], f"lane {lane}: a{2 * reg + half} != A[{row}][{col}]"
        for reg, half, row, col in b_layout(lane):
            got = (regs[lane][4 + reg] >> (16 * half)) & 0xFFFF
            assert got == b_bits[row][col], f"lane {lane}: b{2 * reg + half} != B[{row}][{col}]"
    # Products of two 16-bit numbers are exact in float32: D is C + A B rounded to float32.
    want = (a.double() @ bt.double().t() + c.double()).float()
    torch.testing.assert_close(d, want, rtol=2e-7, atol=1e-6)
    # Every lane's accumulator registers hold its elements of D (c_layout): a value moved to the
    # wrong lane or register would break the product above; here each element is present once.
    assert sorted((r, col) for lane in range(32) for _, r, col in c_layout(lane)) == [
        (r, col) for r in range(16) for col in range(8)
    ]


# ---- the ops against float64 -------------------------------------------------------------------

# name: ((T, B, I, H), device, path expected)
CASES = {
    # One block, one 16-row tile, H = 5 (11 zero columns in the reduction, 3 padding units).
    "one_block": ((3, 2, 3, 5), device(1, coresident=1, threads=32), True),
    # H = 40 in blocks of 16, 16, 8 units; B = 19: two 16-row tiles in one staging.
    "blocks": ((4, 19, 6, 40), device(3, threads=64), True),
    # Shared memory for one 16-row tile at a time: B = 35 staged in 3 tiles.
    "row_tiles": ((3, 35, 4, 24), device(2, smem=3000, threads=64), True),
    # H = 33 (a 1-unit last block), 4 warps for 6 tiles.
    "short_last_block": ((5, 9, 7, 33), device(4, threads=128), True),
    # The ways into the per-step path.
    "per_step_forced": ((4, 6, 5, 20), device(2, path="per_step"), False),
    "not_coresident": ((4, 6, 5, 20), device(4, coresident=2), False),
    "refused": ((4, 6, 5, 20), device(2, refuse=True), False),
}


def run_emulated(emu, inputs, relu, grad_h_n=True, resets=None, lengths=None, seed=1):  # noqa: F811
    """(y, dx, dh0, dW_ih, dW_hh, db), grad_y, grad_h_n and the forward's and backward's
    last_launch() records."""
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu, resets, lengths)
    fwd = list(emu.last_launch())
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.dtype)
    ghn = torch.randn(y.shape[1:], generator=g).to(y.dtype) if grad_h_n else None
    grads = emu.rnn_backward(gy, x, h0, w_ih, w_hh, y, relu, ghn, resets, lengths)
    return (y, *grads), gy, ghn, (fwd, list(emu.last_launch()))


@pytest.fixture
def mma_device(emu):  # noqa: F811
    """Restores the emulated device's mma after a test that takes it away."""
    yield
    emu.set_mma(True)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_lowp_matches_float64(emu, dtype, relu, case):  # noqa: F811
    shape, dev, persistent = CASES[case]
    emu.set_device(*dev)
    inputs = make_layer_inputs(*shape, dtype, seed=sum(shape))
    got, gy, ghn, records = run_emulated(emu, inputs, relu)
    for rec in records:
        assert bool(rec[0]) == persistent, f"{case}: expected persistent={persistent}, ran {rec}"
    for name, t in zip(NAMES, got):
        assert t.dtype == dtype and t.shape == run_shape(name, shape), name
    errs = relative_errors(got, run_reference(inputs, got[0], relu, gy, ghn))
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= BOUNDS[dtype]}
    assert not bad, f"{case} relu={relu}: errors above {BOUNDS[dtype]:.1e}: {bad}"


def run_shape(name, shape):
    T, B, I, H = shape
    return {
        "y": (T, B, H),
        "dx": (T, B, I),
        "dh0": (B, H),
        "dW_ih": (H, I),
        "dW_hh": (H, H),
        "db": (H,),
    }[name]


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
def test_emulated_lowp_without_mma_takes_the_per_step_path(emu, mma_device, dtype):  # noqa: F811
    """A GPU below sm_80 has no bf16/fp16 mma: auto takes the per-step path, a forced persistent
    path is an error that says why."""
    emu.set_mma(False)
    emu.set_device(*device(3, threads=64))
    inputs = make_layer_inputs(4, 19, 6, 40, dtype, seed=3)
    got, gy, ghn, records = run_emulated(emu, inputs, False)
    assert not records[0][0] and not records[1][0]
    errs = relative_errors(got, run_reference(inputs, got[0], False, gy, ghn))
    assert max(errs.values()) <= BOUNDS[dtype], errs
    emu.set_device(*device(3, threads=64, path="persistent"))
    with pytest.raises(RuntimeError, match="need compute capability 8.0 or newer"):
        emu.rnn_forward(*inputs, False)


def test_emulated_lowp_forced_persistent_that_cannot_fit(emu):  # noqa: F811
    emu.set_device(*device(2, smem=512, path="persistent"))
    inputs = make_layer_inputs(3, 4, 5, 24, torch.bfloat16)
    with pytest.raises(RuntimeError, match="persistent CUDA kernel was forced but cannot run"):
        emu.rnn_forward(*inputs, False)
    emu.set_device(*device(2, path="persistent", refuse=True))
    with pytest.raises(RuntimeError, match="forced but the device refused its cooperative"):
        emu.rnn_forward(*inputs, False)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("path", ["auto", "per_step"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_emulated_lowp_resets_and_lengths(emu, dtype, path, relu):  # noqa: F811
    """Against the float64 per-step loop of test_varlen.py: normwise within the dtype's bound,
    steps past a row's length exactly zero, dz of those steps zero whatever grad_y holds."""
    from test_varlen import loop_layer, random_bounds

    T, B, I, H = 7, 18, 5, 24
    emu.set_device(*device(3, threads=64, path=path))
    inputs = make_layer_inputs(T, B, I, H, dtype, seed=11)
    resets, lengths = random_bounds(T, B, seed=5, p=0.25)
    lengths[0] = T  # one full-length row, so grad_h_n also joins at t = T-1
    got, gy, ghn, records = run_emulated(emu, inputs, relu, resets=resets, lengths=lengths)
    assert bool(records[0][0]) == (path == "auto")
    y = got[0]
    padded = torch.arange(T)[:, None] >= lengths[None, :]
    assert (y[padded] == 0).all()
    ref_in = [t.double().requires_grad_() for t in inputs]
    y_ref, h_ref = loop_layer(*ref_in, relu, resets, lengths)
    # The loss of the ops' backward: (y * gy).sum() + (h_n * ghn).sum(), h_n each row's last y.
    loss = (y_ref * gy.double()).sum() + (h_ref * ghn.double()).sum()
    grads = torch.autograd.grad(loss, ref_in)
    want = [y_ref, *grads[:4], grads[4]]  # db: the gradient of b_ih (equal to b_hh's)
    errs = relative_errors(got, want)
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= BOUNDS[dtype]}
    assert not bad, f"errors above {BOUNDS[dtype]:.1e}: {bad}"


@pytest.mark.parametrize("path", ["auto", "per_step"])
def test_emulated_lowp_relu_backward_passes_nan_like_autograd(emu, path):  # noqa: F811
    """relu's backward is a select, as autograd's: 0 where y <= 0 even for a NaN gradient, the
    gradient passed on where y is NaN; exactly the float32 rule on the bf16 numbers."""
    from fused_bptt import reference

    emu.set_device(*device(2, threads=64, path=path))
    T, B, I, H = 3, 4, 3, 16
    x, h0, w_ih, w_hh, _, _ = make_layer_inputs(T, B, I, H, torch.bfloat16, seed=4)
    y = emu.rnn_forward(x, h0, w_ih, w_hh, None, None, True).clone()
    assert bool(emu.last_launch()[0]) == (path == "auto")
    grad_y = torch.randn(y.shape).to(y)
    y[T - 1, 0, :3] = float("nan")  # the last step only: dW_hh stays finite
    negative = (y <= 0).nonzero(as_tuple=True)
    assert len(negative[0]) >= 2
    grad_y[negative] = float("nan")
    dx, dh0, dw_ih, dw_hh, db = emu.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, True)
    want = reference.rnn_backward(*[t.double() for t in (grad_y, x, h0, w_ih, w_hh, y)], True)
    for name, got, ref in zip(NAMES[1:], (dx, dh0, dw_ih, dw_hh, db), want):
        assert torch.isfinite(ref).all() and torch.isfinite(got).all(), name
        err = (got.double() - ref).norm() / ref.norm()
        assert err <= BOUNDS[torch.bfloat16], (name, err.item())


# ---- the criterion: error <= 1.5x nn.RNN's, against float64 ----------------------------

# The issue's shapes T/B/H, run by the emulation on 8 emulated SMs of one warp each with an H100's
# 227 KiB of shared memory per block (H = 512 needs 83 KiB on 8 SMs). Every emulated mma is three
# warp exchanges of 32 CPU threads, so 32/8/512 is shrunk to T = 8 here (the full shape, run by
# hand, met the criterion in 84 s per dtype on 2 shared cores); 64/16/128 took 7-29 s, 200/4/64
# 6 s.
CRITERION_DEVICE = device(8, smem=227 * 1024, coresident=8, threads=32)
CRITERION_SHAPES = [
    pytest.param((64, 16, 128), id="64/16/128", marks=pytest.mark.slow),
    pytest.param((8, 8, 512), id="8/8/512", marks=pytest.mark.slow),
    pytest.param((200, 4, 64), id="200/4/64"),
]


def criterion_errors(emu, dtype, shape, relu=False):  # noqa: F811
    """The emulated ops' errors and nn.RNN's ({quantity: error}) against the float64 reference,
    on the problem bench/accuracy_lowp.py makes."""
    rnn, x, h0, gy, ghn = accuracy.make_problem(dtype, *shape, relu=relu)
    want = accuracy.run_impl("reference", rnn, x, h0, gy, ghn, relu=relu)
    nn_errs = accuracy.errors(accuracy.run_impl("nn", rnn, x, h0, gy, ghn, relu=relu), want)
    w_ih, w_hh, b_ih, b_hh = [p.detach() for p in rnn.parameters()]
    y = emu.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    assert emu.last_launch()[0], "the criterion is measured on the persistent mma kernels"
    dx, dh0, dw_ih, dw_hh, db = emu.rnn_backward(gy, x, h0, w_ih, w_hh, y, relu, ghn)
    got = [t.double() for t in (y, dx, dh0, dw_ih, dw_hh, db, db)]
    return accuracy.errors(got, want), nn_errs


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", CRITERION_SHAPES)
def test_emulated_lowp_error_at_most_1_5x_nn_rnn(emu, dtype, shape):  # noqa: F811
    emu.set_device(*CRITERION_DEVICE)
    errs, nn_errs = criterion_errors(emu, dtype, shape)
    assert_at_most_1_5x_nn_rnn(errs, nn_errs, f"emulated CUDA, {dtype} {shape}")


# ---- op properties -----------------------------------------------------------------------------


def test_emulated_lowp_is_deterministic(emu):  # noqa: F811
    """Two calls on the same inputs give the same bits, forward and backward."""
    emu.set_device(*device(3, threads=64))
    inputs = make_layer_inputs(5, 19, 6, 40, torch.bfloat16, seed=2)
    first, _, _, _ = run_emulated(emu, inputs, False)
    second, _, _, _ = run_emulated(emu, inputs, False)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
def test_emulated_lowp_opcheck(emu, dtype):  # noqa: F811
    """torch.library.opcheck on the emulated ops, with the real ops' fake kernels registered for
    them: schema (no input mutated, outputs fresh), fake tensors and dispatch in the dtype."""
    from fused_bptt import _ops

    for op, fake in (
        ("rnn_forward", _ops._rnn_forward_fake),
        ("rnn_backward", _ops._rnn_backward_fake),
    ):
        qualname = f"fused_bptt_emu::{op}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            continue
        torch.library.register_fake(qualname)(fake)
    emu.set_device(*device(2, threads=64))
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, 3, 5, 12, dtype)
    fwd = (x, h0, w_ih, w_hh, b_ih, b_hh, False)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(emu.rnn_forward.default, fwd, test_utils=utils)
    y = emu.rnn_forward(*fwd)
    ghn = torch.randn(3, 12).to(dtype)
    torch.library.opcheck(
        emu.rnn_backward.default,
        (torch.randn_like(y), x, h0, w_ih, w_hh, y, True, ghn),
        test_utils=utils,
    )


# ---- ThreadSanitizer on the bf16 kernels, without torch --------------------------------------


def test_tsan_lowp_kernels_race_free_and_correct():
    """tests/emu/tsan_lowp_main.cpp under -fsanitize=thread: the forward and backward mma kernels
    (resets, lengths, the staging buffer reused within a step) race-free and equal to naive loops
    within a bf16 rounding. test_cuda_emulated.py's negative control shows TSan reports races."""
    from test_cuda_emulated import build_tsan, run_tsan

    exe = build_tsan("tsan_lowp_main")
    rc, out = run_tsan(exe, "lowp")
    assert "ThreadSanitizer" not in out, out
    assert rc == 0 and out.count("max rel") == 2, f"rc={rc}\n{out}"

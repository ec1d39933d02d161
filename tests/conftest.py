"""Devices, dtypes, backends, the tolerance table and the op-against-reference harness shared by
the tests."""

import pytest
import torch

import fused_bptt
from fused_bptt import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]

# Compared against the float64 reference computed from the same (rounded) inputs.
# float32: the error of a T-step recurrence grows with T, H and the magnitude of the gradients;
# these bounds hold for the sizes in the tests (T <= 40, H <= 70) with inputs of unit scale.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
}


def assert_close(actual, expected, dtype=None, name=""):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}"
    )


def compiled_backends():
    """The compiled backends available here (never 'reference')."""
    return [b for b in fused_bptt.available_backends() if b != "reference"]


def device_of(backend):
    return {"cuda": "cuda", "cpp": "cpu", "reference": "cpu"}[backend]


# What an rnn_backward op returns, in order (csrc/fused_bptt.h).
GRAD_NAMES = ("dx", "dh0", "dW_ih", "dW_hh", "db")
# The gradients of a layer's inputs through autograd (rnn_layer, rnn_tanh), in order: the op's db
# is the gradient of both biases.
LAYER_GRAD_NAMES = ("dx", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")


class CPU:
    """What the tests of the CPU kernels (test_cpu_kernel.py, test_lowp.py) sweep."""

    # (T, B, I, H): T = 1 and B = 1, I != H, and H around the vector widths (4/8/16 lanes, column
    # strips of 1..4 vectors) so that full tiles, every strip width and scalar tail columns all
    # run: e.g. float on AVX2 (8 lanes) runs H = 33 as strips of 2 + 2 vectors and a column, 57 as
    # 3 + 3 + 1 vectors and a column, 70 as 3 + 3 + 2 and 6 columns.
    shapes = [
        (1, 1, 1, 1),
        (1, 3, 5, 17),
        (4, 1, 3, 65),
        (6, 5, 17, 3),
        (3, 6, 65, 17),
        (5, 4, 8, 33),
        (3, 6, 5, 57),
        (3, 9, 4, 70),
    ]
    # Big enough (T * B * H * H >= 2^18, B = 2 register tiles) for the recurrence to split its
    # batch rows over two threads; H = 130 > 128 also runs the k-chunked tiles.
    parallel_shape = (5, 8, 7, 130)
    # The switches the ops read on every call: FUSED_BPTT_CPU_GEMM, every GEMM path;
    # FUSED_BPTT_CPU_ISA, the instruction sets this CPU can run, widest first (torch names its own
    # dispatch level).
    gemm_modes = ["auto", "aten", "blas"]
    isas = {"AVX512": ["avx512", "avx2", "sse2"], "AVX2": ["avx2", "sse2"]}.get(
        torch.backends.cpu.get_cpu_capability(), ["sse2"]
    )


def _cpu_float64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def assert_all_close(names, got, want, like, label=""):
    """got[i] against want[i] (the float64 oracle, on the CPU): each must have like's dtype and
    device and want's shape, and agree within the tolerance of like's dtype."""
    assert len(names) == len(got) == len(want), (names, len(got), len(want))
    for name, a, b in zip(names, got, want):
        where = f"{label} {name}".strip()
        assert a.dtype == like.dtype and a.device == like.device, (
            f"{where}: {a.dtype} on {a.device}, expected {like.dtype} on {like.device}"
        )
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert_close(a.cpu(), b, dtype=like.dtype, name=where)


def compare_to_reference(
    forward, backward, inputs, relu, grad_h_n=False, grad_seed=1, grad_y=None, label=""
):
    """One layer through a pair of ops against fused_bptt.reference in float64.

    forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu) -> y and
    backward(grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n) -> the op's gradients (GRAD_NAMES) run
    on `inputs` (make_layer_inputs; any device, any strides). grad_y: the given tensor (any
    layout), else drawn from `grad_seed`; grad_h_n: a tensor, True (drawn), or False (none). A
    backward may instead return the six gradients of a layer run through autograd
    (LAYER_GRAD_NAMES: db_ih and db_hh each against the oracle's db; None for an absent bias). The
    oracle runs on the CPU in float64 from the very same (rounded) numbers, its backward from the
    op's own y; every output must have the inputs' dtype, device and the oracle's shape, and
    agree within the tolerance of the inputs' dtype (assert_all_close). Returns (y, grads).
    """
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    y = forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    g = torch.Generator().manual_seed(grad_seed)
    if grad_y is None:
        grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    if grad_h_n is True:
        grad_h_n = torch.randn(h0.shape, generator=g, dtype=torch.float64).to(y)
    ghn = None if grad_h_n is False else grad_h_n
    grads = backward(grad_y, x, h0, w_ih, w_hh, y, relu, ghn)
    up = [_cpu_float64(t) for t in inputs]
    y_ref = reference.rnn_forward(*up, relu=relu)
    grads_ref = reference.rnn_backward(
        _cpu_float64(grad_y), *up[:4], _cpu_float64(y), relu=relu, grad_h_n=_cpu_float64(ghn)
    )
    names, got, want = ("y",) + GRAD_NAMES, [y, *grads], [y_ref, *grads_ref]
    if len(grads) == len(LAYER_GRAD_NAMES):
        names, want = ("y",) + LAYER_GRAD_NAMES, want + [grads_ref[-1]]
        for i, bias in ((-2, b_ih), (-1, b_hh)):
            assert (got[i] is None) == (bias is None), (
                f"{label} {names[i]}: {'None' if got[i] is None else 'a tensor'} for a layer "
                f"{'without' if bias is None else 'with'} that bias"
            )
        present = [i for i, t in enumerate(got) if t is not None]
        names, got, want = [[seq[i] for i in present] for seq in (names, got, want)]
    assert_all_close(names, got, want, like=x, label=label)
    return y, grads


def make_layer_inputs(T, B, I, H, dtype, device="cpu", bias=True, seed=0, scale=1.0):
    """Random x, h0, weights of one layer, unit-scale activations (weights ~ U(-1/sqrt(H), .))."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s).to(
            dtype=dtype, device=device
        )

    k = 1.0 / H**0.5
    x = rand(T, B, I, s=scale)
    h0 = rand(B, H, s=0.5)
    w_ih, w_hh = rand(H, I, s=k), rand(H, H, s=k)
    b_ih, b_hh = (rand(H, s=k), rand(H, s=k)) if bias else (None, None)
    return x, h0, w_ih, w_hh, b_ih, b_hh


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


# bfloat16 / float16 (CPU kernels): float32 arithmetic, results rounded to the dtype (a relative
# step of 2^-8 / 2^-11), errors growing a little over the steps. Elementwise bounds for outputs of
# unit scale; tests/test_lowp.py holds whole tensors to normwise bounds and to nn.RNN's own error.
TOLERANCES[torch.bfloat16] = dict(rtol=1.6e-2, atol=1.6e-2)
TOLERANCES[torch.float16] = dict(rtol=2e-3, atol=2e-3)
LOW_PRECISION_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def restore_threads():
    """torch's thread count as it was before each test, afterwards: for the tests that set it,
    and for those that run a bench script's main() in-process (demo, long_range and bench_memory
    set --threads and leave it; long_range's default of 1 once left every later test on one
    thread, where the two-thread paths never ran)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

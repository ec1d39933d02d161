"""The C++ CPU kernels (csrc/cpu) on their own: every code path against the float64 reference,
thread-count independence, bitwise determinism and edge shapes.

Paths, chosen through environment variables the ops read on every call:
    FUSED_BPTT_CPU_GEMM = auto | aten | blas
        aten: big GEMMs through ATen, recurrence by the hand-written kernel (a torch without BLAS)
        blas: every step through the BLAS GEMM + the fused elementwise pass (the large-H path)
    FUSED_BPTT_CPU_ISA = avx512 | avx2 | sse2 caps the instruction set of the step kernel.
    FUSED_BPTT_CPU_INPUT = auto | gemm | kernel: the forward's x_t W_ih^T as one GEMM before the
        loop, or inside the step kernel (auto: the kernel where it was measured faster)
    FUSED_BPTT_CPU_OVERLAP = auto | on | off: the recurrence on one thread while the others run
        the GEMMs chunk by chunk, or threads splitting the rows (auto: overlapped where measured
        faster, small batches)
    FUSED_BPTT_CPU_HANDOFF = auto | half: with the forward overlapped, the thread that runs out of
        chunks to project takes over half of the row tiles from the next step (half: the
        recurrence waits at step T/2 for it, so that the handover happens there)
    FUSED_BPTT_CPU_PRODUCTS = auto | concurrent | serial: the backward's GEMMs after the
        recurrence each on one thread, side by side, or one after the other on all threads (auto:
        side by side on two threads)
    FUSED_BPTT_CPU_EARLY_DX = on | off: with the products side by side, a thread that finishes
        its rows of the backward's recurrence first starts on dx over the steps every row has
        finished
"""

import pytest
import torch

from conftest import CPU, GRAD_NAMES, assert_close, compare_to_reference, make_layer_inputs
from fused_bptt import _ops, reference

pytestmark = pytest.mark.skipif(
    not _ops.has_kernel("CPU"), reason="fused_bptt._C with CPU kernels is not built"
)

ops = torch.ops.fused_bptt if _ops.loaded() else None


def check_against_reference(shape, dtype, relu, bias=True, grad_h_n=False):
    """The compiled ops against the float64 reference (conftest.compare_to_reference)."""
    inputs = make_layer_inputs(*shape, dtype, bias=bias)
    return compare_to_reference(
        ops.rnn_forward,
        ops.rnn_backward,
        inputs,
        relu,
        grad_h_n=grad_h_n,
        label=f"{shape} relu={relu}",
    )


@pytest.mark.parametrize("mode", CPU.gemm_modes)
@pytest.mark.parametrize("shape", CPU.shapes, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_matches_reference(monkeypatch, mode, shape, relu, dtype):
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    check_against_reference(shape, dtype, relu, grad_h_n=True)


@pytest.mark.parametrize("isa", CPU.isas)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_every_instruction_set(monkeypatch, isa, relu, dtype):
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    for shape in [(4, 5, 3, 70), (3, 6, 5, 57), CPU.parallel_shape]:
        check_against_reference(shape, dtype, relu, bias=True)


@pytest.mark.parametrize("isa", CPU.isas)
def test_auto_step_path_on_both_sides_of_its_size_limits(monkeypatch, isa, dtype):
    """auto takes the step kernel up to a weight size that depends on the instruction set (1 MiB
    with AVX-512, 16 MiB with AVX2/SSE2: rnn_cpu.h) and one BLAS call per step beyond it; H just
    past each limit, in whichever path it lands on this machine."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", "auto")
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    size = torch.empty((), dtype=dtype).element_size()
    for limit in (1 << 20, 16 << 20):  # bytes of W_hh
        H = int((limit // size) ** 0.5) + 1
        check_against_reference((2, 3, 2, H), dtype, relu=False, grad_h_n=True)


@pytest.mark.parametrize("isa", CPU.isas)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_input_projection_gemm_or_kernel(monkeypatch, isa, relu, dtype):
    """x_t W_ih^T as a GEMM before the loop or inside the step kernel, on every instruction set:
    whole and partial tiles, one row, I > H, K-chunked tiles (H > 128), threads over rows."""
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    results = {}
    for where in ("gemm", "kernel"):
        monkeypatch.setenv("FUSED_BPTT_CPU_INPUT", where)
        for shape in [(4, 5, 3, 70), (3, 1, 2, 17), (3, 9, 300, 64), CPU.parallel_shape]:
            results[where, shape] = check_against_reference(shape, dtype, relu)
    for shape in {s for _, s in results}:  # the two paths agree with each other too
        y_gemm, y_kernel = results["gemm", shape][0], results["kernel", shape][0]
        assert_close(y_kernel, y_gemm, dtype=dtype, name=f"{shape} y kernel vs gemm")


def test_input_projection_auto_is_one_of_the_two(monkeypatch):
    """auto picks one of the two paths: its result is bitwise that of gemm or of kernel."""
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(32, 8, 64, 64, torch.float32)
    out = {}
    for where in ("auto", "gemm", "kernel"):
        monkeypatch.setenv("FUSED_BPTT_CPU_INPUT", where)
        out[where] = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    assert torch.equal(out["auto"], out["gemm"]) or torch.equal(out["auto"], out["kernel"])
    assert not torch.equal(out["gemm"], out["kernel"])  # two different sums: the switch works


def check_path_against_baseline(monkeypatch, variable, value, baseline, shape, dtype, relu):
    """With `variable` = value, the ops on one thread and on two against the float64 reference;
    then against the ops with `variable` = baseline (on two threads) to rounding: a path that
    splits or reorders GEMMs may round differently, never by more."""
    monkeypatch.setenv(variable, value)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(check_against_reference(shape, dtype, relu, grad_h_n=True))
    monkeypatch.setenv(variable, baseline)
    y_base, grads_base = check_against_reference(shape, dtype, relu, grad_h_n=True)
    for y, grads in results:
        assert_close(y, y_base, dtype=dtype, name=f"y {value} vs {baseline}")
        for name, a, b in zip(GRAD_NAMES, grads, grads_base):
            assert_close(a, b, dtype=dtype, name=f"{name} {value} vs {baseline}")


def assert_backward_deterministic(shape):
    """Six backward calls on the same inputs (under the switches the caller set): the same bits."""
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(*shape, torch.float32)
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    assert torch.equal(y, ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False))
    grad_y = torch.randn_like(y)
    first = ops.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
    for _ in range(5):
        again = ops.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
        for name, a, b in zip(GRAD_NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between two identical backward calls"


# One row tile, two (a partial one), several; one or many chunks; chunks of >= 128 rows (dW_ih
# in per-chunk partial sums); T not a multiple of the chunk; H > 128 (K-chunked tiles).
OVERLAP_SHAPES = [(1, 1, 3, 5), (37, 1, 4, 9), (29, 6, 5, 17), (64, 16, 7, 33), (9, 3, 4, 150)]


@pytest.mark.parametrize("overlap", ["on", "off"])
@pytest.mark.parametrize("shape", OVERLAP_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_overlapped_recurrence(monkeypatch, restore_threads, overlap, shape, relu, dtype):
    """The recurrence on one thread overlapped with the chunked GEMMs (and its serial order on a
    single thread, where the recurrence computes the chunks it needs itself) against the float64
    reference, and against the split rows to rounding (the GEMMs around the recurrence run in
    chunks of steps, whose blocking may round differently)."""
    check_path_against_baseline(
        monkeypatch, "FUSED_BPTT_CPU_OVERLAP", overlap, "off", shape, dtype, relu
    )


@pytest.mark.parametrize("shape", [(64, 16, 7, 33), (40, 2, 5, 8)], ids=str)
def test_overlapped_backward_is_deterministic(monkeypatch, shape):
    """The chunks run on whichever thread takes them, but each output and each partial sum of
    dW_ih has one fixed order: two calls give the same bits."""
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "on")
    assert_backward_deterministic(shape)


# Two row tiles (rows 4 and 5 move), three (one moves, with the partial tile), four; chunks of one
# step or of several, T/2 inside a chunk or at its start; H > 128 (K-chunked tiles).
HANDOFF_SHAPES = [(29, 6, 5, 17), (33, 9, 4, 150), (64, 16, 7, 33), (7, 13, 3, 6)]


@pytest.mark.parametrize("shape", HANDOFF_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_forward_handoff(monkeypatch, restore_threads, shape, relu, dtype):
    """The overlapped forward with the upper half of the row tiles handed to the helper thread at
    step T/2 against the float64 reference, and y bitwise that of the same chunks on one thread
    (no helper, no handover): the handover moves rows between threads, never changes the
    operations of an element. (Against the split rows y may differ in the last bit: a BLAS may
    round a GEMM over a chunk of the steps differently from one over all of them.)"""
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "on")
    monkeypatch.setenv("FUSED_BPTT_CPU_HANDOFF", "half")
    torch.set_num_threads(1)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(*shape, dtype)
    y_alone = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    torch.set_num_threads(2)
    check_against_reference(shape, dtype, relu, grad_h_n=True)
    for _ in range(3):
        y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
        assert torch.equal(y, y_alone), f"{shape}: the handover changed y"


def test_overlap_auto_is_one_of_the_two(monkeypatch, restore_threads):
    """auto's backward overlaps a batch of one row tile on two threads and splits the rows of a
    batch of four tiles or more: its bits are those of on, or of off, as the rule says. (The
    backward's choice shows in dW_ih, summed chunk by chunk when overlapped. The forward's does not
    show: its one GEMM, whole or in chunks of steps, gives y the same bits with the BLAS measured;
    both of its paths are checked in test_overlapped_recurrence.)"""
    torch.set_num_threads(2)
    for shape, overlapped in [((256, 4, 64, 64), True), ((64, 16, 64, 64), False)]:
        x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(*shape, torch.float32)
        grad_y = torch.randn(shape[0], shape[1], shape[3])
        out = {}
        for mode in ("auto", "on", "off"):
            monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", mode)
            y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
            out[mode] = (y, *ops.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False))
        assert not torch.equal(out["on"][3], out["off"][3]), f"{shape}: dW_ih cannot tell them"
        want = out["on" if overlapped else "off"]
        for name, a, b in zip(("y",) + GRAD_NAMES, out["auto"], want):
            assert torch.equal(a, b), f"{shape} {name}: auto is not {overlapped=}"


# T = 1 and T = 3 (some of dx's quarters are empty), odd T (quarters of unequal size), H = 1, a
# partial row tile, H > 128 (K-chunked tiles). Resets: tests/test_varlen.py,
# test_cpu_kernel_paths.
PRODUCTS_SHAPES = [(1, 3, 4, 5), (3, 4, 5, 6), (7, 5, 3, 1), (9, 6, 5, 17), (16, 8, 7, 150)]


@pytest.mark.parametrize("products", ["concurrent", "serial"])
@pytest.mark.parametrize("shape", PRODUCTS_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_concurrent_products(monkeypatch, restore_threads, products, shape, relu, dtype):
    """The backward's GEMMs side by side (and, on one thread, one after the other in the same
    split) against the float64 reference, and against the serial products to rounding
    (bfloat16/float16: tests/test_lowp.py, test_concurrent_products)."""
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    check_path_against_baseline(
        monkeypatch, "FUSED_BPTT_CPU_PRODUCTS", products, "serial", shape, dtype, relu
    )


def test_concurrent_products_are_deterministic(monkeypatch, restore_threads):
    """Whichever thread takes a GEMM, each output is one GEMM of fixed operands: the same bits
    call after call."""
    torch.set_num_threads(2)
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "concurrent")
    assert_backward_deterministic((33, 16, 24, 40))


# Rows split unevenly between two threads (one tile of four rows against one row; two tiles
# against one): the thread with fewer rows finishes early and takes dx over finished steps.
EARLY_DX_SHAPES = [(64, 5, 6, 80), (48, 9, 7, 70)]


@pytest.mark.parametrize("early", ["on", "off"])
@pytest.mark.parametrize("shape", EARLY_DX_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_early_dx(monkeypatch, restore_threads, early, shape, relu, dtype):
    """dx taken during the backward's recurrence by the thread that finishes first, the rest after
    it, against the float64 reference and against dx after the recurrence to rounding (resets and
    lengths: tests/test_varlen.py, test_cpu_kernel_paths)."""
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "concurrent")
    check_path_against_baseline(
        monkeypatch, "FUSED_BPTT_CPU_EARLY_DX", early, "off", shape, dtype, relu
    )


@pytest.mark.parametrize("early", ["on", "off"])
def test_early_dx_empty_batch(monkeypatch, restore_threads, early):
    """B = 0 on two threads with the products side by side: empty gradients, zero weight
    gradients (the early dx once divided by B here and crashed the process)."""
    torch.set_num_threads(2)
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "concurrent")
    monkeypatch.setenv("FUSED_BPTT_CPU_EARLY_DX", early)
    T, I, H = 6, 5, 70
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, 0, I, H, torch.float32)
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    dx, dh0, dw_ih, dw_hh, db = ops.rnn_backward(torch.ones(T, 0, H), x, h0, w_ih, w_hh, y, False)
    assert dx.shape == (T, 0, I) and dh0.shape == (0, H)
    for name, g in (("dW_ih", dw_ih), ("dW_hh", dw_hh), ("db", db)):
        assert torch.equal(g, torch.zeros_like(g)), name


def test_early_dx_is_deterministic(monkeypatch, restore_threads):
    """Where the early blocks of dx end depends on the threads' timing, but each row of dx is the
    same dot products whichever GEMM computes it: the same bits call after call."""
    torch.set_num_threads(2)
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "concurrent")
    for shape in EARLY_DX_SHAPES:
        assert_backward_deterministic(shape)


def test_products_auto_is_one_of_the_two(monkeypatch, restore_threads):
    """auto runs the products side by side on two threads and one after the other on one: its
    bits are those of concurrent, or of serial, as the rule says."""
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    shape = (64, 16, 48, 64)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(*shape, torch.float32)
    grad_y = torch.randn(shape[0], shape[1], shape[3])
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    for threads, concurrent in [(2, True), (1, False)]:
        torch.set_num_threads(threads)
        out = {}
        for mode in ("auto", "concurrent", "serial"):
            monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", mode)
            out[mode] = ops.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
        want = out["concurrent" if concurrent else "serial"]
        for name, a, b in zip(GRAD_NAMES, out["auto"], want):
            assert torch.equal(a, b), f"{threads} threads, {name}: auto is not {concurrent=}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_one_value_grad_y_read_as_one_row(dtype):
    """The gradient of y.sum() (a scalar expanded to [T, B, H], strides 0) and other expanded
    gradients give the bits of the same gradient made dense."""
    T, B, I, H = 6, 9, 5, 70
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, dtype)
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    grad_h_n = torch.ones((), dtype=dtype).expand(B, H)
    for grad_y in [
        torch.full((), 0.7, dtype=dtype).expand(T, B, H),
        torch.randn(H).to(dtype).expand(T, B, H),
        torch.randn(B, 1).to(dtype).expand(B, H).expand(T, B, H),
    ]:
        got = ops.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False, grad_h_n)
        want = ops.rnn_backward(
            grad_y.contiguous(), x, h0, w_ih, w_hh, y, False, grad_h_n.contiguous()
        )
        for name, a, b in zip(GRAD_NAMES, got, want):
            assert torch.equal(a, b), f"{name}, grad_y strides {grad_y.stride()}"
    empty = ops.rnn_forward(x[:, :0], h0[:0], w_ih, w_hh, b_ih, b_hh, False)
    grads = ops.rnn_backward(
        torch.ones((), dtype=dtype).expand(T, 0, H), x[:, :0], h0[:0], w_ih, w_hh, empty, False
    )
    assert grads[0].shape == (T, 0, I) and torch.equal(grads[2], torch.zeros_like(w_ih))


def test_without_bias(dtype):
    check_against_reference((4, 3, 6, 17), dtype, relu=False, bias=False)


def test_one_bias_only():
    x, h0, w_ih, w_hh, b_ih, _ = make_layer_inputs(3, 2, 4, 5, torch.float64)
    y = ops.rnn_forward(x, h0, w_ih, w_hh, None, b_ih, False)
    assert_close(y, reference.rnn_forward(x, h0, w_ih, w_hh, None, b_ih, False), name="y")


def test_non_contiguous_inputs():
    """Strided views (sliced from wider tensors, transposed) give the contiguous results."""
    T, B, I, H = 4, 3, 5, 17
    inputs = make_layer_inputs(T, B, I, H, torch.float64)
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    x_s = torch.zeros(T, B, 2 * I, dtype=x.dtype)[:, :, ::2].copy_(x)
    w_hh_t = w_hh.t().contiguous().t()
    b_s = torch.zeros(2 * H, dtype=x.dtype)[1::2].copy_(b_ih)
    y = ops.rnn_forward(x_s, h0, w_ih, w_hh_t, b_s, b_hh, False)
    assert not x_s.is_contiguous() and not w_hh_t.is_contiguous()
    assert_close(y, ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False), name="y")
    grad_y = torch.randn(T, B, H, dtype=x.dtype).transpose(0, 1).contiguous().transpose(0, 1)
    got = ops.rnn_backward(grad_y, x_s, h0, w_ih, w_hh_t, y, False)
    want = ops.rnn_backward(grad_y.contiguous(), x, h0, w_ih, w_hh, y, False)
    for name, a, b in zip(GRAD_NAMES, got, want):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("mode", CPU.gemm_modes)
def test_same_result_for_any_thread_count(monkeypatch, restore_threads, mode):
    """One thread or two: float64 results agree to rounding (the recurrence itself bitwise)."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, grads = check_against_reference(CPU.parallel_shape, torch.float64, relu=False)
        results.append((y, *grads))
    for name, a, b in zip(("y",) + GRAD_NAMES, *results):
        torch.testing.assert_close(
            a, b, rtol=1e-13, atol=1e-13, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("mode", CPU.gemm_modes)
def test_backward_is_deterministic(monkeypatch, mode):
    """Backward calls on the same inputs give the same bits."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    assert_backward_deterministic(CPU.parallel_shape)


def test_tanh_saturates_and_relu_propagates_nan():
    """Large pre-activations give exactly +-1 (the float32 tanh is an approximation); relu(NaN)
    is NaN as in torch.relu."""
    x = torch.tensor([[[40.0]], [[-40.0]]])
    h0, w = torch.zeros(1, 1), torch.ones(1, 1)
    y = ops.rnn_forward(x, h0, w, torch.zeros(1, 1), None, None, False)
    assert y.flatten().tolist() == [1.0, -1.0]
    y = ops.rnn_forward(torch.full((1, 1, 1), float("nan")), h0, w, w, None, None, True)
    assert torch.isnan(y).all()


def test_rejects_unknown_switch_values(monkeypatch):
    x, h0, w_ih, w_hh, _, _ = make_layer_inputs(2, 2, 3, 4, torch.float32, bias=False)
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", "mkl")
    with pytest.raises(RuntimeError, match="FUSED_BPTT_CPU_GEMM must be one of auto, aten, blas"):
        ops.rnn_forward(x, h0, w_ih, w_hh, None, None, False)
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", "auto")
    monkeypatch.setenv("FUSED_BPTT_CPU_INPUT", "fused")
    with pytest.raises(
        RuntimeError, match="FUSED_BPTT_CPU_INPUT must be one of auto, gemm, kernel"
    ):
        ops.rnn_forward(x, h0, w_ih, w_hh, None, None, False)
    monkeypatch.delenv("FUSED_BPTT_CPU_INPUT")
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "yes")
    with pytest.raises(RuntimeError, match="FUSED_BPTT_CPU_OVERLAP must be one of auto, on, off"):
        ops.rnn_forward(x, h0, w_ih, w_hh, None, None, False)
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "on")
    monkeypatch.setenv("FUSED_BPTT_CPU_HANDOFF", "now")
    with pytest.raises(RuntimeError, match="FUSED_BPTT_CPU_HANDOFF must be one of auto, half"):
        ops.rnn_forward(x, h0, w_ih, w_hh, None, None, False)
    monkeypatch.delenv("FUSED_BPTT_CPU_HANDOFF")
    monkeypatch.delenv("FUSED_BPTT_CPU_OVERLAP")
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "parallel")
    with pytest.raises(
        RuntimeError, match="FUSED_BPTT_CPU_PRODUCTS must be one of auto, concurrent, serial"
    ):
        y = torch.zeros(2, 2, 4)
        ops.rnn_backward(y, x, h0, w_ih, w_hh, y, False)
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "concurrent")
    monkeypatch.setenv("FUSED_BPTT_CPU_EARLY_DX", "late")
    with pytest.raises(RuntimeError, match="FUSED_BPTT_CPU_EARLY_DX must be one of on, off"):
        y = torch.zeros(2, 2, 4)
        ops.rnn_backward(y, x, h0, w_ih, w_hh, y, False)
    monkeypatch.delenv("FUSED_BPTT_CPU_EARLY_DX")
    monkeypatch.delenv("FUSED_BPTT_CPU_PRODUCTS")
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", "avx9000")
    with pytest.raises(
        RuntimeError, match="FUSED_BPTT_CPU_ISA must be one of auto, avx512, avx2, sse2"
    ):
        ops.rnn_forward(x, h0, w_ih, w_hh, None, None, False)

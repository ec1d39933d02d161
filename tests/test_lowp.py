"""The CPU kernels in bfloat16 and float16: against float64, against torch.nn.RNN's own error in the
same dtype (the criterion: FusedRNN's error <= 1.5x nn.RNN's, for y and every gradient), on every
step-kernel variant and GEMM path; opcheck, determinism, bad dtypes, autocast.

Variants, forced through the environment switches the ops read on every call:
    FUSED_BPTT_CPU_ISA = avx512 | avx2 | sse2   (the step kernel, operands widened to float32)
    FUSED_BPTT_CPU_GEMM = auto | aten | blas     (auto: MKL's fp16 GEMM, and bf16 with AMX, else
                                                 float32 GEMMs on widened operands; aten: ATen's
                                                 low-precision matmul; blas: MKL's bf16/fp16 GEMM,
                                                 at every step too)
The errors are measured by bench/accuracy_lowp.py, the script that makes the README's table.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import fused_bptt
from conftest import (
    CPU,
    GRAD_NAMES,
    LAYER_GRAD_NAMES,
    LOW_PRECISION_DTYPES,
    assert_close,
    make_layer_inputs,
)
from fused_bptt import _ops, reference

pytestmark = pytest.mark.skipif(
    not _ops.has_kernel("CPU"), reason="fused_bptt._C with CPU kernels is not built"
)

ops = torch.ops.fused_bptt if _ops.loaded() else None


def _load_accuracy_script():
    path = Path(__file__).resolve().parent.parent / "bench" / "accuracy_lowp.py"
    spec = importlib.util.spec_from_file_location("fused_bptt_accuracy_lowp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = _load_accuracy_script()


NAMES = ("y",) + GRAD_NAMES
# Normwise bounds against float64 for the small shapes: a few roundings to the dtype.
BOUNDS = {torch.bfloat16: 1.2e-2, torch.float16: 1.5e-3}
SHAPES = CPU.shapes + [CPU.parallel_shape]  # and H = 130 > 128: the k-chunked tiles
dtype_ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


def max_relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def norm_relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def relative_errors(got, want, names=NAMES):
    """y: max-abs relative to max |y|; gradients: relative 2-norm (as bench/accuracy_lowp.py)."""
    return {
        name: (max_relative_error if name == "y" else norm_relative_error)(a, b)
        for name, a, b in zip(names, got, want)
    }


def run_ops(inputs, relu, with_grad_h_n=True, seed=1):
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g).to(y.dtype)
    ghn = torch.randn(y.shape[1:], generator=g).to(y.dtype) if with_grad_h_n else None
    return (y, *ops.rnn_backward(gy, x, h0, w_ih, w_hh, y, relu, ghn)), gy, ghn


def run_reference(inputs, y_op, relu, gy, ghn):
    """The forward in float64 from the same (rounded) inputs; the backward in float64 from the
    op's own y, so that each op is held to its own error (with relu, a y rounded to 0 where the
    float64 one is a little above would otherwise switch a gradient on or off)."""
    up = [None if t is None else t.double() for t in inputs]
    y = reference.rnn_forward(*up, relu)
    ghn = None if ghn is None else ghn.double()
    return (y, *reference.rnn_backward(gy.double(), *up[:4], y_op.double(), relu, ghn))


def check_against_reference(shape, dtype, relu, bias=True):
    inputs = make_layer_inputs(*shape, dtype, bias=bias, seed=sum(shape))
    got, gy, ghn = run_ops(inputs, relu)
    for name, a in zip(NAMES, got):
        assert a.dtype == dtype, name
    errs = relative_errors(got, run_reference(inputs, got[0], relu, gy, ghn))
    bad = {k: v for k, v in errs.items() if not v <= BOUNDS[dtype]}
    assert not bad, f"{shape} relu={relu}: errors above {BOUNDS[dtype]:.1e}: {bad}"


# Every instruction set with the default GEMMs, every GEMM path with the widest instruction set.
PATHS = [(isa, "auto") for isa in CPU.isas] + [(CPU.isas[0], mode) for mode in CPU.gemm_modes[1:]]


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("isa,mode", PATHS, ids=lambda v: v)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_matches_float64_on_every_path(monkeypatch, dtype, isa, mode, relu):
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    for shape in SHAPES:
        check_against_reference(shape, dtype, relu)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
def test_without_bias_and_without_grad_h_n(dtype):
    check_against_reference((4, 3, 6, 17), dtype, relu=False, bias=False)
    inputs = make_layer_inputs(4, 3, 6, 17, dtype)
    got, gy, _ = run_ops(inputs, relu=False, with_grad_h_n=False)
    errs = relative_errors(got, run_reference(inputs, got[0], False, gy, None))
    assert max(errs.values()) <= BOUNDS[dtype], errs


def _cpu_has(flag):
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def _float32_gemms(dtype):
    """Whether the default GEMM path runs float32 GEMMs on widened operands (cpu_gemm.h): always
    for float16, for bfloat16 where MKL's bf16 GEMM has no AMX."""
    return dtype == torch.float16 or not _cpu_has("amx_bf16")


def _exact_grid(shape, g, dtype, step=2.0**-6, top=8):
    """Random multiples of `step` in [-top, top] * step: products and sums of a few of them are
    exact in float32, so a GEMM over them gives the same bits in any summation order."""
    return (torch.randint(-top, top + 1, shape, generator=g) * step).to(dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("isa", CPU.isas)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_state_is_rounded_once_per_step(monkeypatch, dtype, isa, relu):
    """The design, bit for bit: each step computes in float32 and rounds y_t (the carried state)
    to the dtype once. A T-step call equals T one-step calls of the float32 op, each on the
    previous y_t rounded to the dtype, with the result rounded the same way torch rounds. (The
    input projection is made exact, so the two GEMM shapes cannot round differently.)"""
    if not _float32_gemms(dtype):
        pytest.skip("MKL's bf16 GEMM (AMX) runs here: its sums round in their own order")
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    # the float32 op as the low-precision kernels run it: the input projection before the loop
    monkeypatch.setenv("FUSED_BPTT_CPU_INPUT", "gemm")
    T, B, I, H = 6, 5, 4, 70
    g = torch.Generator().manual_seed(7)
    x, w_ih = _exact_grid((T, B, I), g, dtype), _exact_grid((H, I), g, dtype)
    _, h0, _, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, dtype, seed=8)
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    f = lambda t: t.float()  # noqa: E731
    h = h0
    for t in range(T):
        h = ops.rnn_forward(f(x[t : t + 1]), f(h), f(w_ih), f(w_hh), f(b_ih), f(b_hh), relu)[0].to(
            dtype
        )
        assert torch.equal(y[t], h), f"step {t}"


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("isa", CPU.isas)
def test_one_step_backward_is_the_float32_one_rounded(monkeypatch, dtype, isa):
    """With T = 1 the backward is float32 arithmetic on the dtype's numbers, each gradient
    rounded once: the float32 op's gradients, rounded to the dtype, bit for bit."""
    if not _float32_gemms(dtype):
        pytest.skip("MKL's bf16 GEMM (AMX) runs here: its sums round in their own order")
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(1, 6, 9, 37, dtype, seed=9)
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    g = torch.Generator().manual_seed(10)
    gy, ghn = (
        torch.randn(1, 6, 37, generator=g).to(dtype),
        torch.randn(6, 37, generator=g).to(dtype),
    )
    got = ops.rnn_backward(gy, x, h0, w_ih, w_hh, y, False, ghn)
    want = ops.rnn_backward(*[t.float() for t in (gy, x, h0, w_ih, w_hh, y)], False, ghn.float())
    for name, a, b in zip(NAMES[1:], got, want):
        assert torch.equal(a, b.to(dtype)), name


def test_saturation_and_nan(monkeypatch):
    """tanh of large pre-activations is exactly +-1 and relu passes a NaN on, in every dtype and
    on every instruction set (the rounding keeps both)."""
    for isa in CPU.isas:
        monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
        for dtype in LOW_PRECISION_DTYPES:
            x = torch.tensor([[[40.0]], [[-40.0]]], dtype=dtype)
            h0, w = torch.zeros(1, 1, dtype=dtype), torch.ones(1, 1, dtype=dtype)
            y = ops.rnn_forward(x, h0, w, torch.zeros(1, 1, dtype=dtype), None, None, False)
            assert y.flatten().tolist() == [1.0, -1.0], (isa, dtype)
            nan = torch.full((1, 1, 1), float("nan"), dtype=dtype)
            assert torch.isnan(ops.rnn_forward(nan, h0, w, w, None, None, True)).all(), (isa, dtype)


# ---- the criterion of the issue: FusedRNN's error <= 1.5x nn.RNN's, against float64 ---------

_PROBLEMS = {}


def _problem(dtype, shape, relu):
    """The problem, its float64 reference and nn.RNN's errors (the same whatever the fused
    variant): computed once per dtype, shape and activation."""
    key = (dtype, shape, relu)
    if key not in _PROBLEMS:
        problem = accuracy.make_problem(dtype, *shape, relu=relu)
        want = accuracy.run_impl("reference", *problem, relu=relu)
        nn_errs = accuracy.errors(accuracy.run_impl("nn", *problem, relu=relu), want)
        _PROBLEMS[key] = problem, want, nn_errs
    return _PROBLEMS[key]


def assert_at_most_1_5x_nn_rnn(errs, nn_errs, what):
    """The criterion on each quantity of accuracy.QUANTITIES; `what` names the case in the
    failure."""
    bad = {
        q: f"{errs[q]:.2e} vs nn.RNN {nn_errs[q]:.2e}"
        for q in accuracy.QUANTITIES
        if not errs[q] <= 1.5 * nn_errs[q]
    }
    assert not bad, f"{what}: error above 1.5x nn.RNN's: {bad}"


def check_criterion(dtype, shape, relu=False):
    problem, want, nn_errs = _problem(dtype, shape, relu)
    fused = accuracy.errors(accuracy.run_impl("fused", *problem, relu=relu), want)
    assert_at_most_1_5x_nn_rnn(fused, nn_errs, f"FusedRNN, {dtype} {shape}")


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", accuracy.SHAPES, ids=lambda s: "/".join(map(str, s)))
@pytest.mark.parametrize("isa", CPU.isas)
def test_error_at_most_1_5x_nn_rnn_on_every_instruction_set(monkeypatch, dtype, shape, isa):
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    check_criterion(dtype, shape)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("mode", ["aten", "blas"])
def test_error_at_most_1_5x_nn_rnn_on_every_gemm_path(monkeypatch, dtype, mode):
    """aten: ATen's low-precision matmul, whose products are rounded to the dtype; blas: the
    recurrence through MKL's GEMM at every step."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    check_criterion(dtype, (64, 16, 128))


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
def test_error_at_most_1_5x_nn_rnn_relu(dtype):
    check_criterion(dtype, (64, 16, 128), relu=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("isa,mode", PATHS, ids=lambda v: v)
@pytest.mark.parametrize("shape", [(6, 9, 3, 7), (5, 11, 5, 133)], ids=str)
def test_resets_and_lengths(monkeypatch, dtype, isa, mode, shape):
    """Sequence boundaries on every path, against the float64 per-step loop of test_varlen.py:
    normwise within the dtype's bound; padded steps exactly zero, h_n each row's last state."""
    monkeypatch.setenv("FUSED_BPTT_CPU_ISA", isa)
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    check_resets_and_lengths(dtype, shape)


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("products", ["concurrent", "serial"])
def test_concurrent_products(monkeypatch, restore_threads, dtype, products):
    """The backward's float32 GEMMs side by side, one thread each (operands widened before the
    threads start), or one after the other, on one thread and on two: against the float64
    reference, with and without resets and lengths."""
    monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
    monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", products)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for shape in [(1, 3, 4, 5), (9, 6, 5, 17), (16, 8, 7, 150)]:
            check_against_reference(shape, dtype, relu=False)
        check_resets_and_lengths(dtype, (6, 9, 3, 7))


def check_resets_and_lengths(dtype, shape):
    from test_varlen import grads_of, loop_layer, random_bounds

    T, B, I, H = shape
    args = [t.requires_grad_() for t in make_layer_inputs(T, B, I, H, dtype, seed=B)]
    resets, lengths = random_bounds(T, B, seed=T, p=0.2)
    y, h_n = fused_bptt.rnn_tanh(*args, resets=resets, lengths=lengths, backend="cpp")
    ref_in = [t.detach().double().requires_grad_() for t in args]
    y_ref, h_ref = loop_layer(*ref_in, False, resets, lengths)
    padded = torch.arange(T)[:, None] >= lengths[None, :]
    assert (y[padded] == 0).all()
    assert torch.equal(h_n, y[lengths - 1, torch.arange(B)])
    names = ("y",) + LAYER_GRAD_NAMES
    errs = relative_errors(
        [y, *grads_of((y, h_n), args)],
        [y_ref, *grads_of((y_ref.to(dtype), h_ref.to(dtype)), ref_in)],
        names,
    )
    bad = {k: v for k, v in errs.items() if not v <= BOUNDS[dtype]}
    assert not bad, f"errors above {BOUNDS[dtype]:.1e}: {bad}"


# ---- op properties ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(dtype, bias):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(5, 3, 4, 6, dtype, bias=bias)
    fwd_args = (x, h0, w_ih, w_hh, b_ih, b_hh, False)
    torch.library.opcheck(torch.ops.fused_bptt.rnn_forward.default, fwd_args)
    y = torch.ops.fused_bptt.rnn_forward(*fwd_args)
    grad_h_n = torch.randn(3, 6).to(dtype)
    torch.library.opcheck(
        torch.ops.fused_bptt.rnn_backward.default,
        (torch.randn_like(y), x, h0, w_ih, w_hh, y, True, grad_h_n),
    )


@pytest.mark.parametrize("mode", CPU.gemm_modes)
def test_bf16_is_deterministic(monkeypatch, mode):
    """Two calls on the same inputs give the same bits, forward and backward."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    inputs = make_layer_inputs(6, 8, 7, 130, torch.bfloat16)
    first, _, _ = run_ops(inputs, relu=False)
    second, _, _ = run_ops(inputs, relu=False)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("mode", CPU.gemm_modes)
def test_strided_inputs_and_gradients(monkeypatch, dtype, mode):
    """Strided x and weights, and grad_y as autograd hands it over (transposed, expanded, rows
    sliced out of a wider tensor), give the bits of the contiguous call."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
    T, B, I, H = 5, 6, 3, 7
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, dtype, seed=4)
    x_s = torch.zeros(T, B, 2 * I, dtype=dtype)[:, :, ::2].copy_(x)
    w_hh_t = w_hh.t().contiguous().t()
    y = ops.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    assert torch.equal(ops.rnn_forward(x_s, h0, w_ih, w_hh_t, b_ih, b_hh, False), y)
    g = torch.randn(T, 2 * B, H).to(dtype)
    grads = {
        "transposed": torch.randn(B, T, H).to(dtype).transpose(0, 1),
        "expanded": torch.ones(1, 1, 1, dtype=dtype).expand(T, B, H),
        "sliced rows": g[:, ::2],
    }
    grad_h_n = torch.randn(B, H).to(dtype)
    for name, gy in grads.items():
        for gh in (None, grad_h_n):
            got = ops.rnn_backward(gy, x_s, h0, w_ih, w_hh_t, y, False, gh)
            want = ops.rnn_backward(gy.contiguous(), x, h0, w_ih, w_hh, y, False, gh)
            for what, a, b in zip(NAMES[1:], got, want):
                assert torch.equal(a, b), f"{name}, grad_h_n={gh is not None}: {what}"


def test_bad_dtypes_name_the_supported_ones():
    x, h0, w_ih, w_hh, _, _ = make_layer_inputs(3, 2, 4, 5, torch.float32)
    for dtype in (torch.float8_e4m3fn, torch.int32):
        args = [t.to(dtype) for t in (x, h0, w_ih, w_hh)]
        with pytest.raises(
            RuntimeError, match="x must be float32, float64, bfloat16 or float16, but got"
        ):
            ops.rnn_forward(*args, None, None, False)
        for backend in ("auto", "cpp", "reference"):
            with pytest.raises(
                TypeError,
                match=f"x has dtype {dtype}, which no backend runs; "
                "the kernels take float32, float64, bfloat16",
            ):
                fused_bptt.rnn_tanh(*args, backend=backend)
    rnn = fused_bptt.FusedRNN(4, 5).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="which no backend runs"):
        rnn(x.to(torch.float8_e4m3fn))
    with pytest.raises(RuntimeError, match="h0 must have dtype BFloat16"):
        ops.rnn_forward(
            x.bfloat16(), h0.half(), w_ih.bfloat16(), w_hh.bfloat16(), None, None, False
        )


# ---- FusedRNN and autocast -------------------------------------------------------------------


def _ran_fused_ops(fn):
    """fn()'s result, and whether the compiled forward and backward ops ran (and the reference
    did not: its per-step matmuls would show as aten::mm calls beyond the op's own)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = {e.name for e in prof.events()}
    return out, {"fused_bptt::rnn_forward", "fused_bptt::rnn_backward"} <= names


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
def test_fused_rnn_in_low_precision_runs_the_kernels(dtype):
    torch.manual_seed(0)
    fused = fused_bptt.FusedRNN(5, 8, num_layers=2).to(dtype)
    x = torch.randn(6, 3, 5).to(dtype)

    def step():
        y, h_n = fused(x)
        (y.float().sum() + h_n.float().sum()).backward()
        return y, h_n

    (y, h_n), ran = _ran_fused_ops(step)
    assert ran and y.dtype == h_n.dtype == dtype
    assert all(p.grad.dtype == dtype for p in fused.parameters())


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=dtype_ids)
@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, bidirectional=True, batch_first=True, nonlinearity="relu")],
    ids=["1 layer", "2 layers bidirectional relu"],
)
def test_autocast_runs_the_fused_kernels_with_nn_rnn_policy(dtype, config):
    """Under torch.autocast("cpu"): the output dtype of nn.RNN, its values within the dtype's
    rounding, float32 parameter gradients close to nn.RNN's, and the compiled ops ran."""
    torch.manual_seed(0)
    fused = fused_bptt.FusedRNN(4, 16, **config)
    ref = torch.nn.RNN(4, 16, **config)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(7, 3, 4)

    def fwd_bwd(model):
        with torch.autocast("cpu", dtype=dtype):
            y, h_n = model(x)
        (y.float().square().sum() + h_n.float().sum()).backward()
        return y, h_n

    (y, h_n), ran = _ran_fused_ops(lambda: fwd_bwd(fused))
    assert ran, "autocast ran the reference instead of the fused kernels"
    y_ref, h_ref = fwd_bwd(ref)
    assert y.dtype == y_ref.dtype == dtype and h_n.dtype == h_ref.dtype == dtype
    assert_close(y, y_ref.float(), dtype, "y")
    assert_close(h_n, h_ref.float(), dtype, "h_n")
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32, name
        err = (torch.linalg.vector_norm(p.grad - q.grad) / torch.linalg.vector_norm(q.grad)).item()
        # Two low-precision results, each with its own error (nn.RNN's about 1e-2 in bf16).
        assert err <= {torch.bfloat16: 5e-2, torch.float16: 6e-3}[dtype], (name, err)

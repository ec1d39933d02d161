"""Variable lengths and state resets: the op and FusedRNN against per-step loops and nn.RNN.

The per-step loops here are written independently of fused_bptt.reference: one nn.RNN step at a
time, zeroing the state where a reset says so and keeping it past a row's length.
"""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_bptt
from conftest import assert_close, make_layer_inputs
from fused_bptt import FusedRNN

BACKENDS = [b for b in fused_bptt.available_backends() if b != "cuda"]
F64 = torch.float64


def loop_layer(x, h0, w_ih, w_hh, b_ih, b_hh, relu, resets=None, lengths=None):
    """One layer, one step at a time, from the definitions (not from fused_bptt)."""
    act = torch.relu if relu else torch.tanh
    h, ys = h0, []
    for t in range(x.shape[0]):
        h_in = h if resets is None else h * (~resets[t]).unsqueeze(-1).to(h.dtype)
        z = x[t] @ w_ih.t() + h_in @ w_hh.t()
        if b_ih is not None:
            z = z + b_ih + b_hh
        h_new = act(z)
        if lengths is None:
            h = h_new
            ys.append(h_new)
        else:
            on = (lengths > t).unsqueeze(-1).to(h.dtype)
            h = on * h_new + (1 - on) * h
            ys.append(on * h_new)
    return torch.stack(ys), h


def random_bounds(T, B, seed, p=0.3, with_resets=True, with_lengths=True):
    g = torch.Generator().manual_seed(seed)
    resets = (torch.rand(T, B, generator=g) < p) if with_resets else None
    lengths = torch.randint(1, T + 1, (B,), generator=g) if with_lengths else None
    return resets, lengths


def grads_of(outputs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outputs]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(
        loss, [i for i in inputs if i is not None], allow_unused=True, retain_graph=True
    )


OP_CASES = [  # T, B, I, H, resets, lengths, special
    (1, 3, 2, 5, True, True, None),
    (6, 5, 3, 7, True, False, None),
    (6, 5, 3, 7, False, True, None),
    (9, 7, 4, 9, True, True, None),
    (5, 3, 2, 5, True, False, "t0"),  # a reset at t = 0 on every row
    (5, 3, 2, 5, True, True, "all"),  # every row reset at once, mid-sequence
    (7, 9, 3, 13, True, True, "full"),  # every length is T
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: f"T{c[0]}B{c[1]}H{c[3]}-{c[6]}")
@pytest.mark.parametrize("grad_h_n", [False, True], ids=["gy", "gy+ghn"])
def test_op_against_loop(backend, relu, case, grad_h_n):
    T, B, I, H, with_r, with_l, special = case
    args = [
        t.requires_grad_() if t is not None else t
        for t in make_layer_inputs(T, B, I, H, F64, seed=T * B)
    ]
    resets, lengths = random_bounds(T, B, seed=H, with_resets=with_r, with_lengths=with_l)
    if special == "t0":
        resets[0] = True
    elif special == "all":
        resets[T // 2] = True
    elif special == "full":
        lengths = torch.full((B,), T)
    fn = fused_bptt.rnn_relu if relu else fused_bptt.rnn_tanh
    y, h_n = fn(*args, resets=resets, lengths=lengths, backend=backend)
    y_ref, h_ref = loop_layer(*args, relu, resets, lengths)
    assert_close(y, y_ref, name="y")
    assert_close(h_n, h_ref, name="h_n")
    outs, refs = ((y, h_n), (y_ref, h_ref)) if grad_h_n else ((y,), (y_ref,))
    for name, g, r in zip(
        "x h0 w_ih w_hh b_ih b_hh".split(), grads_of(outs, args), grads_of(refs, args)
    ):
        assert_close(g, r, name=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_reset_cuts_gradient(backend):
    """No gradient crosses a reset: the loss after the reset does not depend on x before it."""
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(6, 2, 3, 4, F64)
    x.requires_grad_()
    resets = torch.zeros(6, 2, dtype=torch.bool)
    resets[3, 0] = True
    y, _ = fused_bptt.rnn_tanh(x, h0, w_ih, w_hh, b_ih, b_hh, resets=resets, backend=backend)
    (dx,) = torch.autograd.grad(y[3:, 0].sum(), x)
    assert dx[:3, 0].abs().max() == 0 and dx[3:, 0].abs().max() > 0
    assert dx[:3, 1].abs().max() == 0  # row 1 does not feed row 0
    assert torch.equal(y[5:, 1] != 0, torch.ones_like(y[5:, 1], dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_gradcheck(backend):
    args = [t.requires_grad_() for t in make_layer_inputs(4, 3, 2, 3, F64, seed=5)]
    resets = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)
    lengths = torch.tensor([4, 2, 3])

    def f(*a):
        return fused_bptt.rnn_tanh(*a, resets=resets, lengths=lengths, backend=backend)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def module_loop(ref: nn.RNN, x, h0, resets):
    """FusedRNN's resets semantics with nn.RNN, one step at a time (time-major x, resets [T, B]):
    the forward direction zeroes the state entering a reset step; the reverse direction runs
    t = T-1 .. 0 and zeroes its state after a reset step (the boundary lies before t)."""
    D = 2 if ref.bidirectional else 1
    T = x.shape[0]
    layer_in = x
    finals = []
    for layer in range(ref.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [
                getattr(ref, f"{n}{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            act = torch.relu if ref.nonlinearity == "relu" else torch.tanh
            h = h0[layer * D + d]
            ys = [None] * T
            for t in range(T) if d == 0 else reversed(range(T)):
                if d == 0:
                    h = h * (~resets[t]).unsqueeze(-1)
                h = act(layer_in[t] @ w[0].t() + w[2] + h @ w[1].t() + w[3])
                ys[t] = h
                if d == 1:
                    h = h * (~resets[t]).unsqueeze(-1)
            finals.append(ys[-1] if d == 0 else ys[0])
            outs.append(torch.stack(ys))
        layer_in = torch.cat(outs, 2)
    return layer_in, torch.stack(finals)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layers,bidir,batch_first,nonlin",
    list(itertools.product([1, 2], [False, True], [False, True], ["tanh", "relu"])),
)
def test_module_resets_against_loop(backend, layers, bidir, batch_first, nonlin):
    torch.manual_seed(layers + 2 * bidir)
    T, B, I, H = 7, 5, 3, 5
    ref = nn.RNN(I, H, layers, nonlinearity=nonlin, bidirectional=bidir, dtype=F64)
    rnn = FusedRNN.from_rnn(ref, backend=backend)
    rnn.batch_first = batch_first
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    h0 = torch.randn(layers * (1 + bidir), B, H, dtype=F64, requires_grad=True)
    resets, _ = random_bounds(T, B, seed=3, with_lengths=False)
    resets[0, 1] = True
    if batch_first:
        y, h_n = rnn(x.transpose(0, 1), h0, resets=resets.t())
        y = y.transpose(0, 1)
    else:
        y, h_n = rnn(x, h0, resets=resets)
    y_ref, h_ref = module_loop(ref, x, h0, resets)
    assert_close(y, y_ref, name="y")
    assert_close(h_n, h_ref, name="h_n")
    params = list(rnn.parameters())
    got = grads_of((y, h_n), [x, h0] + params)
    want = grads_of((y_ref, h_ref), [x, h0] + list(ref.parameters()))
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, name=f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layers,bidir,batch_first,sorted_,nonlin",
    list(itertools.product([1, 2], [False, True], [False, True], [False, True], ["tanh", "relu"])),
)
def test_packed_against_nn_rnn(backend, layers, bidir, batch_first, sorted_, nonlin):
    torch.manual_seed(layers + 2 * bidir + 4 * batch_first)
    T, B, I, H = 6, 5, 3, 5
    ref = nn.RNN(
        I, H, layers, nonlinearity=nonlin, bidirectional=bidir, batch_first=batch_first, dtype=F64
    )
    rnn = FusedRNN.from_rnn(ref, backend=backend)
    lengths = torch.tensor([6, 6, 4, 2, 1] if sorted_ else [3, 6, 1, 6, 4])
    x = torch.randn(*((B, T) if batch_first else (T, B)), I, dtype=F64, requires_grad=True)
    h0 = torch.randn(layers * (1 + bidir), B, H, dtype=F64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=sorted_)
    out, h_n = rnn(packed, h0)
    out_ref, h_ref = ref(packed, h0)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
    for a, b in (
        (out.sorted_indices, out_ref.sorted_indices),
        (out.unsorted_indices, out_ref.unsorted_indices),
    ):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_close(out.data, out_ref.data, name="output")
    assert_close(h_n, h_ref, name="h_n")
    got = grads_of((out.data, h_n), [x, h0] + list(rnn.parameters()))
    want = grads_of((out_ref.data, h_ref), [x, h0] + list(ref.parameters()))
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, name=f"grad {i}")


def test_packed_without_hx_and_errors_match_nn_rnn():
    ref = nn.RNN(3, 4, dtype=F64)
    rnn = FusedRNN.from_rnn(ref)
    packed = pack_padded_sequence(torch.randn(5, 2, 3, dtype=F64), torch.tensor([5, 3]))
    out, h = rnn(packed)
    out_ref, h_ref = ref(packed)
    assert_close(out.data, out_ref.data)
    assert_close(h, h_ref)
    bad_hx = torch.zeros(1, 3, 4, dtype=F64)
    with pytest.raises(RuntimeError) as want:
        ref(packed, bad_hx)
    with pytest.raises(RuntimeError) as got:
        rnn(packed, bad_hx)
    assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="resets applies to tensor input"):
        rnn(packed, resets=torch.zeros(5, 2, dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_boundaries(backend):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, 3, 2, 5, F64)

    def call(**kw):
        return fused_bptt.rnn_tanh(x, h0, w_ih, w_hh, b_ih, b_hh, backend=backend, **kw)

    with pytest.raises(TypeError, match=r"resets must be a bool tensor \[T, B\].*got dtype"):
        call(resets=torch.zeros(4, 3))
    with pytest.raises(
        ValueError,
        match=r"resets must have shape \[T, B\] = \(4, 3\), but got "
        r"\(3, 4\)",
    ):
        call(resets=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"lengths must be an int64 tensor \[B\].*torch.float32"):
        call(lengths=torch.ones(3))
    with pytest.raises(
        ValueError,
        match=r"lengths must have shape \[B\] = \(3,\), but got "
        r"\(4,\)",
    ):
        call(lengths=torch.ones(4, dtype=torch.int64))
    with pytest.raises(
        ValueError,
        match=r"lengths must lie in 1..T = 1..4, but got values from "
        r"0 to 2",
    ):
        call(lengths=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"1..4, but got values from 1 to 5"):
        call(lengths=torch.tensor([1, 5, 2]))
    with pytest.raises(ValueError, match="lengths must be on cpu"):
        call(lengths=torch.ones(3, dtype=torch.int64, device="meta"))
    rnn = FusedRNN(2, 5, batch_first=True, backend=backend)
    with pytest.raises(ValueError, match=r"resets must have shape \[B, T\] = \(3, 4\)"):
        rnn(torch.randn(3, 4, 2), resets=torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"resets must be a bool tensor \[B, T\]"):
        rnn(torch.randn(3, 4, 2), resets=torch.zeros(3, 4))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled CPU kernels are not built")
def test_cpp_kernel_checks_boundaries():
    """The C++ checks, reached by calling the op directly (below the Python checks)."""
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, 3, 2, 5, F64)
    op = torch.ops.fused_bptt.rnn_forward
    with pytest.raises(RuntimeError, match="resets must be a bool tensor"):
        op(x, h0, w_ih, w_hh, b_ih, b_hh, False, torch.zeros(4, 3))
    with pytest.raises(
        RuntimeError,
        match=r"lengths must lie in 1..T = 1..4, but got values "
        r"from 1 to 9",
    ):
        op(x, h0, w_ih, w_hh, b_ih, b_hh, False, None, torch.tensor([1, 9, 2]))
    y = op(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    with pytest.raises(
        RuntimeError,
        match=r"lengths must have shape \[2\]|lengths must have "
        r"shape \[3\]",
    ):
        torch.ops.fused_bptt.rnn_backward(
            y, x, h0, w_ih, w_hh, y, False, None, None, torch.tensor([1, 2])
        )


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize(
    "mode",
    [
        "auto",
        "aten",
        "blas",
        "input-in-kernel",
        "overlapped",
        "handoff",
        "concurrent-products",
        "early-dx",
    ],
)
@pytest.mark.parametrize(
    "shape",
    [(5, 9, 3, 7), (4, 11, 5, 133), (6, 64, 8, 40), (40, 4, 6, 9), (24, 16, 5, 12), (40, 9, 6, 80)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_cpu_kernel_paths(monkeypatch, mode, shape, dtype):
    """Every CPU step path (hand-written kernel, K > 128 partial sums, BLAS per step, threads over
    rows; the forward's input projection inside the step kernel; the recurrence on one thread
    overlapped with chunked GEMMs, with and without dW_ih partial sums, and with half the rows
    handed to the helper thread at T/2 in the forward; the backward's GEMMs side
    by side, and dW_hh after them once the reset rows of dz are zeroed, with and without dx taken
    during the recurrence by the thread that finishes first: the last shape splits its rows
    unevenly) with resets and lengths, against the float64 loop."""
    if mode == "input-in-kernel":
        monkeypatch.setenv("FUSED_BPTT_CPU_INPUT", "kernel")
    elif mode in ("overlapped", "handoff"):
        monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "on")
        monkeypatch.setenv("FUSED_BPTT_CPU_HANDOFF", "half" if mode == "handoff" else "auto")
    elif mode in ("concurrent-products", "early-dx"):
        monkeypatch.setenv("FUSED_BPTT_CPU_OVERLAP", "off")
        monkeypatch.setenv("FUSED_BPTT_CPU_PRODUCTS", "concurrent")
        monkeypatch.setenv("FUSED_BPTT_CPU_EARLY_DX", "on" if mode == "early-dx" else "off")
    else:
        monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", mode)
        monkeypatch.setenv("FUSED_BPTT_CPU_INPUT", "gemm")
    T, B, I, H = shape
    args64 = make_layer_inputs(T, B, I, H, F64, seed=B)
    args = [t.to(dtype).requires_grad_() for t in args64]
    resets, lengths = random_bounds(T, B, seed=T, p=0.2)
    y, h_n = fused_bptt.rnn_tanh(*args, resets=resets, lengths=lengths, backend="cpp")
    ref_in = [t.detach().double().requires_grad_() for t in args]
    y_ref, h_ref = loop_layer(*ref_in, False, resets, lengths)
    assert_close(y, y_ref, dtype, name="y")
    assert_close(h_n, h_ref, dtype, name="h_n")
    for g, r in zip(grads_of((y, h_n), args), grads_of((y_ref.to(dtype), h_ref.to(dtype)), ref_in)):
        assert_close(g, r, dtype)

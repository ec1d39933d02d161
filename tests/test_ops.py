"""Every compiled backend against the reference: y, h_n and every gradient; gradcheck; opcheck;
non-contiguous inputs; bad input; what is saved for backward."""

import pytest
import torch

import fused_bptt
from conftest import (
    LAYER_GRAD_NAMES,
    assert_all_close,
    compare_to_reference,
    compiled_backends,
    device_of,
    make_layer_inputs,
)
from fused_bptt import _ops
from fused_bptt.function import RNNLayerFunction, rnn_layer

BACKENDS = compiled_backends()
SHAPES = [(1, 1, 1, 1), (1, 3, 4, 5), (5, 2, 3, 4), (17, 5, 7, 33), (40, 3, 16, 70)]
ops = torch.ops.fused_bptt


def test_cpp_backend_is_loaded():
    """Fails when the extension did not build or load: the cpp backend is expected everywhere."""
    assert _ops.loaded(), f"fused_bptt._C did not load: {_ops.LOAD_ERROR}"
    assert "cpp" in fused_bptt.available_backends()
    assert fused_bptt.available_backends()[-1] == "reference"


def through_autograd(backend):
    """(forward, backward) for compare_to_reference that run rnn_layer, the path users take, and
    differentiate it with autograd instead of calling the raw ops: backward returns the gradients
    of the layer's inputs (LAYER_GRAD_NAMES). h_n must be y[T-1], bit for bit."""
    graph = {}

    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu):
        args = [
            None if t is None else t.detach().clone().requires_grad_()
            for t in (x, h0, w_ih, w_hh, b_ih, b_hh)
        ]
        y, h_n = rnn_layer(*args, relu=relu, backend=backend)
        assert torch.equal(h_n, y[-1]), "h_n is not y[T-1]"
        graph.update(args=args, y=y, h_n=h_n)
        return y.detach()

    def backward(grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n):
        outputs, grads = [graph["y"]], [grad_y]
        if grad_h_n is not None:
            outputs, grads = outputs + [graph["h_n"]], grads + [grad_h_n]
        leaves = [t for t in graph["args"] if t is not None]
        found = iter(torch.autograd.grad(outputs, leaves, grads))
        return tuple(None if t is None else next(found) for t in graph["args"])

    return forward, backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,B,I,H", SHAPES)
def test_backend_matches_reference(backend, dtype, T, B, I, H, bias, relu):
    """y, h_n and every gradient through autograd, with y and h_n both in the loss."""
    inputs = make_layer_inputs(T, B, I, H, dtype, device_of(backend), bias=bias, seed=T * 100 + H)
    compare_to_reference(*through_autograd(backend), inputs, relu, grad_h_n=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_raw_ops_match_reference(backend, relu):
    inputs = make_layer_inputs(6, 3, 4, 5, torch.float64, device_of(backend))
    compare_to_reference(ops.rnn_forward, ops.rnn_backward, inputs, relu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Strided views (sliced out of wider tensors, transposed) and a strided grad_y give the
    contiguous answer: rnn_layer's forward, then the backward op."""
    device = device_of(backend)
    T, B, I, H = 6, 3, 4, 5
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, torch.float64, device)
    wide_x = torch.zeros(T, B, 2 * I, dtype=x.dtype, device=device)
    wide_x[:, :, ::2] = x
    x_strided = wide_x[:, :, ::2]
    batch_major = x.transpose(0, 1).contiguous().transpose(0, 1)
    w_hh_t = w_hh.t().contiguous().t()
    wide_b = torch.stack([b_ih, b_hh], 1)

    def forward(*args):
        return rnn_layer(*args[:6], relu=args[6], backend=backend)[0]

    for xs in (x_strided, batch_major):
        assert not xs.is_contiguous()
        gy = torch.randn(B, T, H, dtype=x.dtype, device=device).transpose(0, 1)  # strided grad
        inputs = (xs, h0, w_ih, w_hh_t, wide_b[:, 0], wide_b[:, 1])
        compare_to_reference(forward, ops.rnn_backward, inputs, False, grad_y=gy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gemm", ["auto", "blas", "aten"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_backward_strided_grads_and_grad_h_n(backend, gemm, relu, monkeypatch):
    """grad_y as autograd hands it over (transposed from batch_first, expanded from y.sum(),
    rows sliced out of a wider tensor), with and without grad_h_n, on every step path."""
    monkeypatch.setenv("FUSED_BPTT_CPU_GEMM", gemm)
    device = device_of(backend)
    T, B, I, H = 5, 6, 3, 7
    inputs = make_layer_inputs(T, B, I, H, torch.float64, device, seed=4)
    g = torch.randn(T, 2 * B, H, dtype=torch.float64, device=device)
    grads = {
        "transposed": torch.randn(B, T, H, dtype=torch.float64, device=device).transpose(0, 1),
        "expanded": torch.ones(1, 1, 1, dtype=torch.float64, device=device).expand(T, B, H),
        "sliced rows": g[:, ::2],
    }
    grad_h_n = torch.randn(B, H, dtype=torch.float64, device=device)
    for name, gy in grads.items():
        assert not gy.is_contiguous(), name
        for gh in (False, grad_h_n):
            label = f"{name}, grad_h_n={gh is not False}:"
            compare_to_reference(
                ops.rnn_forward, ops.rnn_backward, inputs, relu, gh, grad_y=gy, label=label
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_gradcheck(backend, relu):
    inputs = [
        t.requires_grad_()
        for t in make_layer_inputs(4, 2, 3, 3, torch.float64, device_of(backend), seed=3)
    ]
    if relu:  # keep z away from relu's kink, where finite differences are meaningless
        inputs[4].data += 0.5
    assert torch.autograd.gradcheck(lambda *a: rnn_layer(*a, relu=relu, backend=backend), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(backend, bias, dtype):
    device = device_of(backend)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(5, 3, 4, 6, dtype, device, bias=bias)
    fwd_args = (x, h0, w_ih, w_hh, b_ih, b_hh, False)
    torch.library.opcheck(torch.ops.fused_bptt.rnn_forward.default, fwd_args)
    y = torch.ops.fused_bptt.rnn_forward(*fwd_args)
    torch.library.opcheck(
        torch.ops.fused_bptt.rnn_backward.default, (torch.randn_like(y), x, h0, w_ih, w_hh, y, True)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bounds", [None, "lengths"])
def test_rnn_layer_takes_a_one_layer_state(backend, bounds):
    """rnn_layer takes h0 as [B, H] or as a one-layer module's [1, B, H]; h_n and dh0 then have
    that shape, with the same numbers, and the op's outputs hang off its own node (no view node
    in between: FusedRNN passes hx this way). First and second order, and under FakeTensorMode."""
    device = device_of(backend)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(5, 3, 4, 6, torch.float64, device)
    lengths = torch.tensor([5, 1, 3], device=device) if bounds else None
    results = []
    for state in (h0, h0.unsqueeze(0)):
        leaves = [t.detach().requires_grad_() for t in (x, state, w_ih, w_hh, b_ih, b_hh)]
        y, h_n = ops.rnn_layer(*leaves, False, None, lengths)
        assert h_n.shape == state.shape and "RnnLayerFunction" in h_n.grad_fn.name()
        loss = (y * y.detach().cos()).sum() + (h_n * h_n).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        assert grads[1].shape == state.shape
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
        results.append([y, h_n.reshape(h0.shape), *grads, *second])
    names = ["y", "h_n", "dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    names += [f"d2 {n}" for n in names[2:]]
    for name, a, b in zip(names, *results):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=1e-12, atol=1e-12, msg=name)
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = (x, h0.unsqueeze(0), w_ih, w_hh, b_ih, b_hh)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        fake_lengths = mode.from_tensor(lengths) if bounds else None
        y, h_n = ops.rnn_layer(*fake, False, None, fake_lengths)
        assert y.shape == (5, 3, 6) and h_n.shape == (1, 3, 6)


def test_fused_rnn_one_layer_graph_has_no_view_nodes():
    """A one-layer FusedRNN hands hx to the layer op as it is: h_n comes straight from the op's
    node and dh0 goes straight to hx (each view would be one more autograd node per call)."""
    rnn = fused_bptt.FusedRNN(4, 6)
    hx = torch.randn(1, 3, 6, requires_grad=True)
    y, h_n = rnn(torch.randn(5, 3, 4), hx)
    assert "RnnLayerFunction" in h_n.grad_fn.name()
    assert y.grad_fn.name() == h_n.grad_fn.name()
    assert any(
        next_fn is not None and next_fn.variable is hx
        for next_fn, _ in h_n.grad_fn.next_functions
        if hasattr(next_fn, "variable")
    )


def bytes_kept(fn):
    """Calls fn() and returns (its result, the bytes it allocated and did not free): the CPU
    allocator's own accounting, read through the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("path", ["module", "python_function", "reference"])
def test_keeps_no_extra_hidden_sized_tensor(path):
    """What a forward leaves allocated, beyond the outputs y and h_n it returns, is what the graph
    keeps for backward: nothing for the compiled paths (x, h0 and the weights existed before;
    y is the output itself), one more [T, B, H] tensor for nn.RNN (the control that shows the
    measurement sees such a tensor) and for the reference."""
    if path != "reference" and "cpp" not in BACKENDS:
        pytest.skip("needs the compiled CPU backend")
    T, B, H = 16, 8, 32
    torch.manual_seed(0)
    fused = fused_bptt.FusedRNN(H, H, backend="reference" if path == "reference" else "auto")
    ref = torch.nn.RNN(H, H)
    x = torch.randn(T, B, H, requires_grad=True)
    h0 = torch.randn(1, B, H, requires_grad=True)
    params = list(fused.parameters())
    calls = {
        "module": lambda: fused(x, h0),
        "reference": lambda: fused(x, h0),
        "python_function": lambda: RNNLayerFunction.apply(x, h0[0], *params, False),
    }
    (y, h_n), kept = bytes_kept(calls[path])
    unit = T * B * H * 4
    extra = kept - y.untyped_storage().nbytes() - h_n.untyped_storage().nbytes()
    (y_nn, h_nn), kept_nn = bytes_kept(lambda: ref(x, h0))
    extra_nn = kept_nn - y_nn.untyped_storage().nbytes() - h_nn.untyped_storage().nbytes()
    assert extra_nn >= unit
    if path == "reference":
        assert extra >= unit
    else:
        assert extra == 0
    (y.sum() + h_n.sum()).backward()  # and the graph it kept is enough to run backward
    assert x.grad is not None and all(p.grad is not None for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_reject_bad_input(backend):
    device = device_of(backend)
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, 2, 3, 5, torch.float64, device)
    op = torch.ops.fused_bptt.rnn_forward
    cases = [
        ((x[0], h0, w_ih, w_hh, b_ih, b_hh), "x must be 3-D"),
        ((x, h0[:1], w_ih, w_hh, b_ih, b_hh), r"h0 must have shape \[2, 5\]"),
        ((x, h0, w_ih[:, :2], w_hh, b_ih, b_hh), r"weight_ih must have shape \[5, 3\]"),
        ((x, h0, w_ih, w_hh, b_ih[:4], b_hh), r"bias_ih must have shape \[5\]"),
        ((x, h0.float(), w_ih, w_hh, b_ih, b_hh), "h0 must have dtype Double"),
        ((x.int(), h0, w_ih, w_hh, b_ih, b_hh), "x must be float32, float64, bfloat16 or float16"),
        ((x[:0], h0, w_ih, w_hh, b_ih, b_hh), "at least one time step"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args, False)
    y = op(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[4, 2, 5\]"):
        torch.ops.fused_bptt.rnn_backward(y[:3], x, h0, w_ih, w_hh, y, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["y", "h_n", "y[-1] and h_n"])
def test_gradients_when_only_some_outputs_are_used(backend, used):
    """grad_y or grad_h_n may be absent (None) in backward; both feed dz_{T-1} when present."""
    inputs = make_layer_inputs(5, 3, 4, 6, torch.float64, device_of(backend))

    def grads(name):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y, hn = rnn_layer(*leaves, backend=name)
        loss = {"y": (y * y).sum(), "h_n": (hn * hn).sum(), "y[-1] and h_n": (y[-1] * hn).sum()}[
            used
        ]
        return torch.autograd.grad(loss, leaves)

    want = [g.cpu() for g in grads("reference")]
    assert_all_close(LAYER_GRAD_NAMES, grads(backend), want, like=inputs[0], label=used)

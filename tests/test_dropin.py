"""FusedRNN and rnn_tanh across the PyTorch stack, against torch.nn.RNN with the same weights.

One test per way off the plain eager path: higher-order gradients, torch.func, forward-mode AD,
in-place changes of the output, torch.compile, torch.export, jit.trace, autocast, meta tensors,
swap_rnn, error messages and NaN. Every compiled backend here and the reference run each one.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacrev, jvp, vmap

import fused_bptt
from conftest import make_layer_inputs
from fused_bptt import FusedRNN, swap_rnn

BACKENDS = [b for b in fused_bptt.available_backends() if b != "cuda"]
D = torch.float64


def pair(backend, num_layers=2, nonlinearity="tanh", bidirectional=False, seed=0, **kw):
    """A float64 FusedRNN and an nn.RNN with the same weights."""
    torch.manual_seed(seed)
    fused = FusedRNN(
        3,
        5,
        num_layers,
        nonlinearity=nonlinearity,
        bidirectional=bidirectional,
        dtype=D,
        backend=backend,
        **kw,
    )
    ref = torch.nn.RNN(
        3, 5, num_layers, nonlinearity=nonlinearity, bidirectional=bidirectional, dtype=D, **kw
    )
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def loss_of(module):
    def loss(x):
        y, h = module(x)
        return (y**2).sum() + (h * h.detach().sin()).sum()

    return loss


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_hvp_and_hessian_match_nn_rnn(backend, nonlinearity):
    fused, ref = pair(backend, nonlinearity=nonlinearity)
    x = torch.randn(4, 2, 3, dtype=D)
    v = torch.randn_like(x)
    got = torch.autograd.functional.hvp(loss_of(fused), x, v)[1]
    want = torch.autograd.functional.hvp(loss_of(ref), x, v)[1]
    assert want.abs().max() > 1e-3  # a zero Hessian would pass a comparison with zeros
    close(got, want)
    x_small = torch.randn(2, 1, 3, dtype=D)
    close(
        torch.autograd.functional.hessian(loss_of(fused), x_small),
        torch.autograd.functional.hessian(loss_of(ref), x_small),
    )


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradgradcheck_rnn_layer(backend, relu, bias):
    inputs = [
        t.requires_grad_() if t is not None else None
        for t in make_layer_inputs(3, 2, 2, 3, D, bias=bias, seed=1)
    ]
    fn = fused_bptt.rnn_relu if relu else fused_bptt.rnn_tanh
    assert torch.autograd.gradgradcheck(
        lambda *a: fn(*a, backend=backend),
        [t for t in inputs if t is not None] if not bias else inputs,
    )


def test_gradgradcheck_module(backend):
    fused, _ = pair(backend, num_layers=2, bidirectional=True)
    x = torch.randn(3, 2, 3, dtype=D, requires_grad=True)
    h = torch.randn(4, 2, 5, dtype=D, requires_grad=True)
    params = tuple(fused.parameters())

    def fn(x, h, *p):
        return functional_call(
            fused, dict(zip([n for n, _ in fused.named_parameters()], p)), (x, h)
        )

    assert torch.autograd.gradgradcheck(fn, (x, h, *params))


def test_gradient_penalty_matches_nn_rnn(backend):
    fused, ref = pair(backend)
    x = torch.randn(5, 2, 3, dtype=D, requires_grad=True)
    grads = []
    for module in (fused, ref):
        y, h = module(x)
        (gx,) = torch.autograd.grad(y.sum() + h.sum(), x, create_graph=True)
        (gx**2).sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for got, want in zip(*grads):
        close(got, want)


def test_func_grad_jacrev_jvp_match_nn_rnn(backend):
    fused, ref = pair(backend)
    x = torch.randn(4, 2, 3, dtype=D)
    v = torch.randn_like(x)

    def loss(p, module):
        y, h = functional_call(module, p, (x,))
        return (y**2).sum() + h.sum()

    params = {k: p.detach() for k, p in fused.named_parameters()}
    got, want = grad(loss)(params, fused), grad(loss)(params, ref)
    for k in params:
        close(got[k], want[k])
    close(jacrev(lambda x: fused(x)[0])(x), jacrev(lambda x: ref(x)[0])(x))
    close(jvp(lambda x: fused(x)[0], (x,), (v,))[1], jvp(lambda x: ref(x)[0], (x,), (v,))[1])


def test_forward_mode_ad_matches_nn_rnn(backend):
    fused, ref = pair(backend)
    x, v = torch.randn(4, 2, 3, dtype=D), torch.randn(4, 2, 3, dtype=D)
    tangents = []
    with fwAD.dual_level():
        for module in (fused, ref):
            y, h = module(fwAD.make_dual(x, v))
            tangents.append((fwAD.unpack_dual(y).tangent, fwAD.unpack_dual(h).tangent))
    close(tangents[0][0], tangents[1][0])
    close(tangents[0][1], tangents[1][1])


def test_vmap_over_parameter_sets_then_backward(backend):
    """The ensemble pattern: vmap over stacked parameters, then .backward() on the result."""
    fused, ref = pair(backend)
    x = torch.randn(4, 2, 3, dtype=D)
    base = {k: p.detach() for k, p in fused.named_parameters()}
    stacked = {k: torch.stack([p, 0.9 * p, -p]).requires_grad_() for k, p in base.items()}
    vmap(lambda p: functional_call(fused, p, (x,))[0].pow(2).sum())(stacked).sum().backward()
    looped = {k: p.detach().clone().requires_grad_() for k, p in stacked.items()}
    sum(
        functional_call(ref, {k: p[i] for k, p in looped.items()}, (x,))[0].pow(2).sum()
        for i in range(3)
    ).backward()
    for k in stacked:
        assert stacked[k].grad is not None, k
        close(stacked[k].grad, looped[k].grad)


def test_vmap_over_inputs(backend):
    fused, ref = pair(backend)
    xs = torch.randn(3, 4, 2, 3, dtype=D)
    got = vmap(lambda x: fused(x)[0])(xs)
    close(got, torch.stack([ref(x)[0] for x in xs]))


def test_batched_grads(backend):
    fused, ref = pair(backend)
    x = torch.randn(4, 2, 3, dtype=D, requires_grad=True)
    outs = [module(x) for module in (fused, ref)]
    gy = torch.randn(3, 4, 2, 5, dtype=D)
    gh = torch.randn(3, 2, 2, 5, dtype=D)
    got = torch.autograd.grad(outs[0], x, (gy, gh), is_grads_batched=True)[0]
    want = torch.autograd.grad(outs[1], x, (gy, gh), is_grads_batched=True)[0]
    close(got, want)
    # Only h_n receives a gradient: grad_y is None inside the backward.
    outs = [module(x) for module in (fused, ref)]
    got = torch.autograd.grad(outs[0][1], x, gh, is_grads_batched=True)[0]
    close(got, torch.autograd.grad(outs[1][1], x, gh, is_grads_batched=True)[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_in_place_on_output_like_nn_rnn(backend, batch_first):
    fused, ref = pair(backend, batch_first=batch_first)
    x = torch.randn(4, 3, 3, dtype=D, requires_grad=True)
    skip = torch.randn(4, 3, 5, dtype=D)
    grads = []
    for module in (fused, ref):
        y, h = module(x)
        y += skip
        y.relu_()
        h.mul_(2)
        (y.pow(2).sum() + h.sum()).backward()
        grads.append([x.grad.clone()] + [p.grad for p in module.parameters()])
        x.grad = None
    for got, want in zip(*grads):
        close(got, want)


def test_activation_checkpointing_matches_nn_rnn(backend):
    """torch.utils.checkpoint (non-reentrant) installs saved-tensor hooks: y goes through them."""
    fused, ref = pair(backend)
    x = torch.randn(5, 2, 3, dtype=D, requires_grad=True)
    grads = []
    for module in (fused, ref):
        y, h = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
        (y.pow(2).sum() + h.sum()).backward()
        grads.append([x.grad.clone()] + [p.grad for p in module.parameters()])
        x.grad = None
    for got, want in zip(*grads):
        close(got, want)


def test_compiled_double_backward_is_an_error_not_zeros():
    if "cpp" not in BACKENDS:
        pytest.skip("needs the compiled CPU backend")
    inputs = [t.requires_grad_() for t in make_layer_inputs(3, 2, 2, 3, D)]
    compiled = torch.compile(fused_bptt.rnn_tanh, backend="aot_eager", fullgraph=True)
    y, _ = compiled(*inputs)
    (gx,) = torch.autograd.grad(y.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|twice|does not support"):
        torch.autograd.grad(gx.sum(), inputs[2])


# ---- torch.compile, torch.export, jit.trace --------------------------------------------------


class LinearRNNHead(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4, dtype=D)
        self.rnn = FusedRNN(4, 6, num_layers=2, bidirectional=True, dtype=D, backend=backend)
        self.head = torch.nn.Linear(12, 1, dtype=D)

    def forward(self, x):
        y, h = self.rnn(self.lin(x))
        return self.head(y), h


def _grads_after(model, x):
    out, h = model(x)
    (out.sum() + h.pow(2).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out.detach(), grads


def test_compile_fullgraph_one_graph_over_two_lengths(backend):
    """allow_rnn=True is Dynamo's own switch for RNN modules (nn.RNN needs it too)."""
    if backend == "reference":
        pytest.skip("the reference is a Python loop over T: each length is a graph of its own")
    # config.patch, not monkeypatch: pytest 9.2's monkeypatch undoes by deleting the attribute,
    # which hides the key in torch's config module for every later test (export, ONNX).
    with torch._dynamo.config.patch(allow_rnn=True):
        _one_graph_over_two_lengths(backend)


def _one_graph_over_two_lengths(backend):
    torch._dynamo.reset()
    model = LinearRNNHead(backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (5, 9):
        x = torch.randn(T, 2, 3, dtype=D)
        # The second length must reuse the first graph: a recompilation is an error.
        with torch.compiler.set_stance("fail_on_recompile" if T == 9 else "default"):
            got, got_grads = _grads_after(compiled, x)
        want, want_grads = _grads_after(model, x)
        close(got, want)
        for g, w in zip(got_grads, want_grads):
            close(g, w)


def test_raw_op_compiles_fullgraph_with_the_default_config(backend):
    torch._dynamo.reset()
    inputs = [t.requires_grad_() for t in make_layer_inputs(5, 2, 3, 4, D, seed=2)]
    compiled = torch.compile(
        lambda *a: fused_bptt.rnn_tanh(*a, backend=backend), fullgraph=True, backend="aot_eager"
    )
    got, want = compiled(*inputs), fused_bptt.rnn_tanh(*inputs, backend=backend)
    close(got[0], want[0])
    gw = torch.autograd.grad(got[0].sum() + got[1].sum(), inputs)
    for g, w in zip(gw, torch.autograd.grad(want[0].sum() + want[1].sum(), inputs)):
        close(g, w)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
def test_export(backend, strict):
    model = LinearRNNHead(backend).eval()
    x = torch.randn(5, 2, 3, dtype=D)
    exported = torch.export.export(model, (x,), strict=strict)
    got, want = exported.module()(x), model(x)
    close(got[0], want[0])
    close(got[1], want[1])


def test_jit_trace_runs_and_trains_like_eager(backend):
    model = LinearRNNHead(backend)
    x = torch.randn(5, 2, 3, dtype=D)
    traced = torch.jit.trace(model, (x,))  # its sanity check re-runs the trace under no_grad
    got, got_grads = _grads_after(traced, x)
    want, want_grads = _grads_after(model, x)
    close(got, want)
    for g, w in zip(got_grads, want_grads):
        close(g, w)


# ---- autocast, meta tensors, swap_rnn, messages, NaN -----------------------------------------


def test_autocast_follows_nn_rnn():
    """backend="auto" (the default) and "cpp": the bfloat16 kernels run (tests/test_lowp.py checks
    that they, not the reference, do), with nn.RNN's output dtype and float32 parameter grads."""
    torch.manual_seed(0)
    fused = FusedRNN(4, 6)
    ref = torch.nn.RNN(4, 6)
    ref.load_state_dict(fused.state_dict())
    lin = torch.nn.Linear(3, 4)
    x = torch.randn(7, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused(lin(x)), ref(lin(x))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.bfloat16
        # Both run in bfloat16: within a few bf16 roundings of each other.
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0.05)
    got[0].float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
    if "cpp" in BACKENDS:
        fused.backend = "cpp"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for g, a in zip(fused(lin(x)), got):
                assert torch.equal(g, a)


def test_meta_tensor_among_cpu_tensors_is_an_error():
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(4, 2, 3, 5, torch.float32)
    for backend in BACKENDS:
        with pytest.raises((ValueError, RuntimeError), match="weight_hh must be on cpu"):
            fused_bptt.rnn_tanh(x, h0, w_ih, w_hh.to("meta"), backend=backend)
        with pytest.raises((ValueError, RuntimeError), match="weight_ih must be on cpu"):
            fused_bptt.rnn_tanh(x, h0, w_ih.to("meta"), w_hh, backend=backend)
    if "cpp" in BACKENDS:
        op = torch.ops.fused_bptt
        # (The meta tensor sends the call to the Meta kernel, which is the fake kernel.)
        with pytest.raises(ValueError, match="weight_hh must be on cpu"):
            op.rnn_forward(x, h0, w_ih, w_hh.to("meta"), None, None, False)
        y = op.rnn_forward(x, h0, w_ih, w_hh, None, None, False)
        with pytest.raises(ValueError, match="y must be on cpu"):
            op.rnn_backward(y, x, h0, w_ih, w_hh, y.to("meta"), False)


def test_meta_kernels_check_shapes_like_the_real_ones():
    if "cpp" not in BACKENDS:
        pytest.skip("needs the compiled ops")
    meta = [t.to("meta") for t in make_layer_inputs(4, 2, 3, 5, torch.float32, bias=False)[:4]]
    op = torch.ops.fused_bptt
    y = op.rnn_forward(*meta, None, None, False)
    assert y.shape == (4, 2, 5) and y.device.type == "meta"
    with pytest.raises(
        ValueError, match=r"grad_y must have shape \(4, 2, 5\), but got \(1, 1, 1\)"
    ):
        op.rnn_backward(torch.empty(1, 1, 1, device="meta"), *meta, y, False)
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 5\)"):
        op.rnn_forward(meta[0], meta[1][:1], *meta[2:], None, None, False)
    with pytest.raises(TypeError, match="weight_hh must have dtype torch.float32"):
        op.rnn_forward(*meta[:3], meta[3].double(), None, None, False)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, h0, w_ih, w_hh = (torch.empty(t.shape) for t in meta)
        grads = op.rnn_backward(
            op.rnn_forward(x, h0, w_ih, w_hh, None, None, False),
            x,
            h0,
            w_ih,
            w_hh,
            torch.empty(4, 2, 5),
            False,
            torch.empty(2, 5),
        )
        assert [tuple(g.shape) for g in grads] == [(4, 2, 3), (2, 5), (5, 3), (5, 5), (5,)]
        with pytest.raises(ValueError, match="grad_h_n must have shape"):
            op.rnn_backward(
                torch.empty(4, 2, 5), x, h0, w_ih, w_hh, torch.empty(4, 2, 5), False, torch.empty(5)
            )


def test_swap_rnn_keeps_flags_parametrizations_hooks_mode_dtype():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.RNN(3, 5, num_layers=2, dtype=D))
    rnn = model[0]
    rnn.weight_ih_l0.requires_grad_(False)
    torch.nn.utils.parametrize.register_parametrization(
        rnn, "weight_hh_l1", type("Sym", (torch.nn.Module,), {"forward": lambda s, w: w + w.t()})()
    )
    calls = []
    rnn.register_forward_hook(lambda m, i, o: calls.append("forward"))
    rnn.register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    rnn.eval()
    x = torch.randn(4, 2, 3, dtype=D, requires_grad=True)
    want = rnn(x)[0]
    params_before = list(rnn.parameters())
    assert swap_rnn(model) is model and model[0] is rnn
    assert isinstance(rnn, FusedRNN) and isinstance(rnn, torch.nn.RNN)
    assert list(rnn.parameters()) == params_before  # same objects: an optimizer stays valid
    assert not rnn.weight_ih_l0.requires_grad and not rnn.training
    assert torch.nn.utils.parametrize.is_parametrized(rnn, "weight_hh_l1")
    calls.clear()
    got = rnn(x)[0]
    close(got, want)
    got.sum().backward()
    assert calls == ["forward", "backward"]
    assert (
        rnn.weight_ih_l0.grad is None
        and rnn.parametrizations.weight_hh_l1.original.grad is not None
    )


def test_messages_match_nn_rnn():
    with pytest.raises(ValueError) as fused_error:
        FusedRNN(3, 4, proj_size=2)
    with pytest.raises(ValueError) as rnn_error:
        torch.nn.RNN(3, 4, proj_size=2)
    assert str(fused_error.value) == str(rnn_error.value)
    x, h0, w_ih, w_hh, _, _ = make_layer_inputs(3, 2, 4, 5, torch.float32)
    with pytest.raises(TypeError, match="x is missing"):
        fused_bptt.rnn_tanh(None, h0, w_ih, w_hh)
    with pytest.raises(TypeError, match="weight_hh is missing"):
        fused_bptt.rnn_tanh(x, h0, w_ih, None)
    if "cpp" in BACKENDS:
        with pytest.raises(RuntimeError, match="x is missing"):
            torch.ops.fused_bptt.rnn_forward(None, h0, w_ih, w_hh, None, None, False)
        with pytest.raises(RuntimeError, match="weight_hh is missing"):
            torch.ops.fused_bptt.rnn_forward(x, h0, w_ih, None, None, None, False)


def test_nan_propagates_through_the_relu_backward_like_nn_rnn(backend):
    fused, ref = pair(backend, num_layers=1, nonlinearity="relu")
    x = torch.randn(4, 2, 3, dtype=D)
    x[1, 0, 0] = float("nan")
    grads = []
    for module in (fused, ref):
        xi = x.clone().requires_grad_()
        module(xi)[0].sum().backward()
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*grads):
        assert torch.equal(got.isnan(), want.isnan())
        close(got.nan_to_num(), want.nan_to_num())
    # The case is exercised: NaN states (relu passes NaN on), NaN weight gradients, and dx finite
    # yet different from what zeroing the gradient at NaN states (the old rule) would give.
    assert ref(x)[0].isnan().any() and grads[1][1].isnan().any()
    assert grads[1][0].isfinite().all()

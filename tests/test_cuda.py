"""The CUDA kernels on a real GPU: against the float64 reference, against torch.nn.RNN (cuDNN), both
paths (persistent and per-step, forced through FUSED_BPTT_CUDA_PATH), shared memory above 48 KiB,
the automatic fallback, determinism, a non-default stream, non-contiguous inputs.

Skipped where torch.cuda.is_available() is False. Where a GPU exists but fused_bptt._C was built
without its CUDA ops, the tests fail: that build is broken for this machine.
"""
import pytest
import torch

import fused_bptt
from fused_bptt import _ops, reference
from conftest import assert_close, make_layer_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NAMES = ["dx", "dh0", "dW_ih", "dW_hh", "db"]
# (T, B, I, H): T = 1, B not a multiple of 32, H not a multiple of the slice width, one unit.
SHAPES = [(1, 3, 4, 5), (7, 1, 3, 1), (9, 33, 17, 65), (16, 8, 32, 256), (5, 130, 7, 300)]


@pytest.fixture(scope="module", autouse=True)
def cuda_ops_built():
    assert _ops.has_kernel("CUDA"), (
        "a CUDA device is present but fused_bptt._C has no CUDA kernels: rebuild with nvcc and a CUDA "
        f"torch (FORCE_CUDA=1 pip install --no-build-isolation .); load error: {_ops.LOAD_ERROR}")


@pytest.fixture(params=["auto", "persistent", "per_step"])
def path(request, monkeypatch):
    # Read by rnn_cuda.cu at every call.
    monkeypatch.setenv("FUSED_BPTT_CUDA_PATH", request.param)
    return request.param


def run_ops(T, B, I, H, dtype, relu, bias, seed=0):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, dtype, device="cuda", bias=bias, seed=seed)
    grad_y = make_layer_inputs(T, B, H, H, dtype, device="cuda", seed=seed + 1)[0]
    y = torch.ops.fused_bptt.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    grads = torch.ops.fused_bptt.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, relu)
    d = [t.double().cpu() if t is not None else None for t in (x, h0, w_ih, w_hh, b_ih, b_hh, grad_y)]
    y_ref = reference.rnn_forward(*d[:6], relu=relu)
    grads_ref = reference.rnn_backward(d[6], *d[:4], y.double().cpu(), relu=relu)
    return y, y_ref, grads, grads_ref


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_ops_match_reference(shape, relu, bias, dtype, path):
    y, y_ref, grads, grads_ref = run_ops(*shape, dtype, relu, bias)
    assert y.is_cuda and all(g.is_cuda for g in grads)
    assert_close(y.cpu(), y_ref, dtype=dtype, name="y")
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert_close(g.cpu(), r, dtype=dtype, name=name)


@pytest.mark.parametrize("H", [1024, 2048])
def test_cuda_large_hidden(H, monkeypatch):
    """H = 1024: the backward slice needs more than 48 KiB of shared memory (opt-in).
    H = 2048: the backward slice no longer fits, auto must fall back to the per-step path."""
    monkeypatch.setenv("FUSED_BPTT_CUDA_PATH", "auto")
    y, y_ref, grads, grads_ref = run_ops(4, 8, 16, H, torch.float64, False, True)
    assert_close(y.cpu(), y_ref, name="y")
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert_close(g.cpu(), r, name=name)


def test_cuda_forced_persistent_that_cannot_fit_raises(monkeypatch):
    monkeypatch.setenv("FUSED_BPTT_CUDA_PATH", "persistent")
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(2, 2, 2, 4096, torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="persistent CUDA kernel was forced"):
        torch.ops.fused_bptt.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)


def test_cuda_backward_is_deterministic(path):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(32, 16, 8, 256, torch.float32, device="cuda")
    y = torch.ops.fused_bptt.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    grad_y = torch.randn_like(y)
    first = torch.ops.fused_bptt.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
    second = torch.ops.fused_bptt.rnn_backward(grad_y, x, h0, w_ih, w_hh, y, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cuda_on_a_side_stream():
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(12, 5, 6, 70, torch.float64, device="cuda")
    expected = torch.ops.fused_bptt.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = torch.ops.fused_bptt.rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, False)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, expected)


def test_cuda_non_contiguous_inputs():
    T, B, I, H = 6, 4, 5, 40
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, torch.float64, device="cuda")
    x_nc = torch.zeros(T, B, 2 * I, dtype=x.dtype, device="cuda")[:, :, ::2].copy_(x)
    w_hh_nc = w_hh.t().contiguous().t()
    y = torch.ops.fused_bptt.rnn_forward(x_nc, h0, w_ih, w_hh_nc, b_ih, b_hh, False)
    assert_close(y.cpu(), reference.rnn_forward(*(t.cpu() for t in (x, h0, w_ih, w_hh, b_ih, b_hh))), name="y")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_fused_rnn_cuda_matches_cudnn(nonlinearity):
    """FusedRNN(backend="cuda") against torch.nn.RNN (cuDNN) with the same weights, float32."""
    torch.manual_seed(0)
    T, B, I, H, layers = 20, 8, 16, 128, 2
    cudnn = torch.nn.RNN(I, H, layers, nonlinearity=nonlinearity).cuda()
    fused = fused_bptt.FusedRNN.from_rnn(cudnn, backend="cuda")
    x = torch.randn(T, B, I, device="cuda")
    h0 = torch.randn(layers, B, H, device="cuda") * 0.5
    out_ref, hn_ref = cudnn(x, h0)
    out, hn = fused(x, h0)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(hn, hn_ref, **tol)
    grad = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, list(cudnn.parameters()), grad)
    grads = torch.autograd.grad(out, list(fused.parameters()), grad)
    for (name, _), g, r in zip(cudnn.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")

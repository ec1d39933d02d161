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


def _cpu_float64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def compare_to_reference(forward, backward, inputs, relu, grad_h_n=False, grad_seed=1, label=""):
    """One layer through a pair of ops against fused_bptt.reference in float64.

    forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu) -> y and
    backward(grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n) -> (dx, dh0, dW_ih, dW_hh, db) run on
    `inputs` (make_layer_inputs; any device), with grad_y (and, when asked, grad_h_n) drawn from
    `grad_seed`. The oracle runs on the CPU in float64 from the very same (rounded) numbers, its
    backward from the op's own y; every output must have the inputs' dtype, device and the
    oracle's shape, and agree within the tolerance of the inputs' dtype. Returns (y, grads).
    """
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    y = forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu)
    g = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    ghn = torch.randn(h0.shape, generator=g, dtype=torch.float64).to(y) if grad_h_n else None
    grads = backward(grad_y, x, h0, w_ih, w_hh, y, relu, ghn)
    up = [_cpu_float64(t) for t in inputs]
    y_ref = reference.rnn_forward(*up, relu=relu)
    grads_ref = reference.rnn_backward(
        _cpu_float64(grad_y), *up[:4], _cpu_float64(y), relu=relu, grad_h_n=_cpu_float64(ghn)
    )
    for name, got, want in zip(("y",) + GRAD_NAMES, (y, *grads), (y_ref, *grads_ref)):
        where = f"{label} {name}".strip()
        assert got.dtype == x.dtype and got.device == x.device, (
            f"{where}: {got.dtype} on {got.device}, expected {x.dtype} on {x.device}"
        )
        assert got.shape == want.shape, (
            f"{where}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        )
        assert_close(got.cpu(), want, dtype=x.dtype, name=where)
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

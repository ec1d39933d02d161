"""Devices, dtypes, backends and the tolerance table shared by the tests."""
import pytest
import torch

import fused_bptt

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]

# Compared against the float64 reference computed from the same (rounded) inputs.
# float32: the error of a T-step recurrence grows with T, H and the magnitude of the gradients; these
# bounds hold for the sizes in the tests (T <= 40, H <= 70) with inputs of unit scale.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-4, atol=2e-5),
}


def assert_close(actual, expected, dtype=None, name=""):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **TOLERANCES[dtype],
                               msg=lambda m: f"{name}: {m}")


def compiled_backends():
    """The compiled backends available here (never 'reference')."""
    return [b for b in fused_bptt.available_backends() if b != "reference"]


def device_of(backend):
    return {"cuda": "cuda", "cpp": "cpu", "reference": "cpu"}[backend]


def make_layer_inputs(T, B, I, H, dtype, device="cpu", bias=True, seed=0, scale=1.0):
    """Random x, h0, weights of one layer with unit-scale activations (weights ~ U(-1/sqrt(H), .))."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s).to(
            dtype=dtype, device=device)

    k = 1.0 / H ** 0.5
    x = rand(T, B, I, s=scale)
    h0 = rand(B, H, s=0.5)
    w_ih, w_hh = rand(H, I, s=k), rand(H, H, s=k)
    b_ih, b_hh = (rand(H, s=k), rand(H, s=k)) if bias else (None, None)
    return x, h0, w_ih, w_hh, b_ih, b_hh


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param

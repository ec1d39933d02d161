"""The resets/lengths cases the CUDA kernels are checked on, shared by tests/test_cuda_emulated.py
(the kernels under the SIMT emulation) and tests/test_cuda.py (a real GPU): the cases
tests/test_varlen.py runs on the CPU, and the comparison of a pair of ops with the reference."""

import torch

from conftest import GRAD_NAMES, assert_close
from fused_bptt import reference

# random resets and/or lengths, a reset at t = 0 on every row, every row reset at once
# mid-sequence, every row full
BOUND_KINDS = ["resets", "lengths", "both", "reset_t0", "all_reset", "full"]


def make_bounds(kind, T, B, seed):
    """(resets [T, B] bool or None, lengths [B] int64 or None) of a case of BOUND_KINDS, on the
    CPU. Random lengths always hold a tie, a one-step row (T > 1) and a full row."""
    g = torch.Generator().manual_seed(seed)
    resets = torch.rand(T, B, generator=g) < 0.3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[: min(B, 4)] = torch.tensor([T, 1, max(1, T - 1), max(1, T - 1)])[: min(B, 4)]
    if kind == "resets":
        return resets, None
    if kind == "lengths":
        return None, lengths
    if kind == "reset_t0":
        resets[0] = True
        return resets, None
    if kind == "all_reset":
        resets[T // 2] = True
    elif kind == "full":
        lengths = torch.full((B,), T)
    return resets, lengths


def compare_bounded(forward, backward, inputs, relu, resets, lengths, label=""):
    """forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu, resets, lengths) -> y and
    backward(grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n, resets, lengths) on `inputs`
    (make_layer_inputs, any device; resets/lengths on the CPU, moved to x's device) against the
    reference in float64 on the CPU: y and every gradient, grad_h_n joining at each row's last
    step, within the tolerance of the inputs' dtype."""
    x, h0, w_ih, w_hh, b_ih, b_hh = inputs
    dev = x.device
    r = resets.to(dev) if resets is not None else None
    n = lengths.to(dev) if lengths is not None else None
    y = forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu, r, n)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    ghn = torch.randn(h0.shape, generator=g, dtype=torch.float64).to(y)
    grads = backward(grad_y, x, h0, w_ih, w_hh, y, relu, ghn, r, n)

    def up(t):
        return t.detach().cpu().double() if t is not None else None

    y_ref = reference.rnn_forward(*map(up, inputs), relu, resets, lengths)
    grads_ref = reference.rnn_backward(
        up(grad_y), *map(up, inputs[:4]), up(y), relu, up(ghn), resets, lengths
    )
    for name, got, want in zip(("y",) + GRAD_NAMES, (y, *grads), (y_ref, *grads_ref)):
        where = f"{label} {name}".strip()
        assert got.dtype == x.dtype and got.device == dev, (where, got.dtype, got.device)
        assert got.shape == want.shape, (where, tuple(got.shape), tuple(want.shape))
        assert_close(got.cpu(), want, dtype=x.dtype, name=where)

"""Pure-PyTorch single-layer RNN: the oracle the tests trust and the fallback backend.

Readable first: one step per loop iteration, exactly the math of csrc/fused_bptt.h.
Never imports the compiled library.

    x: [T, B, I], h0: [B, H], weight_ih: [H, I], weight_hh: [H, H], bias_*: [H] or None
    z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh,   h_t = act(z_t)   (tanh or relu)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def _activation(relu: bool):
    return torch.relu if relu else torch.tanh


def rnn_forward(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
                relu: bool = False) -> Tensor:
    """Returns y [T, B, H], the hidden state after every step. Differentiable by autograd."""
    act = _activation(relu)
    # The input projection of all T steps at once; only the recurrence is sequential.
    xw = torch.matmul(x, weight_ih.t())
    if bias_ih is not None:
        xw = xw + bias_ih
    if bias_hh is not None:
        xw = xw + bias_hh
    h = h0
    ys = []
    for t in range(x.shape[0]):
        h = act(xw[t] + h @ weight_hh.t())
        ys.append(h)
    return torch.stack(ys)


def rnn_backward(grad_y: Tensor, x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                 y: Tensor, relu: bool = False,
                 grad_h_n: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reverse-time backward written out by hand from y alone.

    Returns (dx, dh0, dW_ih, dW_hh, db) as the compiled `rnn_backward` op does:
        dz_t = (grad_y_t + [t = T-1] grad_h_n + dz_{t+1} W_hh) * act'(z_t)
    with act'(z_t) = 1 - y_t^2 (tanh); for relu, dz_t is 0 where y_t <= 0 and the incoming
    gradient elsewhere, as autograd's relu backward (so a NaN in y passes the gradient on).
    Differentiable by autograd (no in-place writes), which the double backward relies on.
    """
    T = y.shape[0]
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]])          # h_{t-1} for every t
    dzs = []
    carry = torch.zeros_like(h0)                            # dz_{t+1} W_hh
    for t in reversed(range(T)):
        g = grad_y[t] + carry
        if t == T - 1 and grad_h_n is not None:
            g = g + grad_h_n
        dz_t = torch.where(y[t] <= 0, torch.zeros_like(g), g) if relu else g * (1 - y[t] * y[t])
        dzs.append(dz_t)
        carry = dz_t @ weight_hh
    dz = torch.stack(dzs[::-1])
    dh0 = carry
    dz2 = dz.reshape(-1, dz.shape[-1])
    dW_hh = dz2.t() @ h_prev.reshape(-1, h_prev.shape[-1])
    dW_ih = dz2.t() @ x.reshape(-1, x.shape[-1])
    db = dz2.sum(0)
    dx = dz @ weight_ih
    return dx, dh0, dW_ih, dW_hh, db

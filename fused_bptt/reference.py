"""Pure-PyTorch single-layer RNN: the oracle the tests trust and the fallback backend.

Readable first: one step per loop iteration, exactly the math of csrc/fused_bptt.h.
Never imports the compiled library.

    x: [T, B, I], h0: [B, H], weight_ih: [H, I], weight_hh: [H, H], bias_*: [H] or None
    z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh,   h_t = act(z_t)   (tanh or relu)

Boundaries (optional): resets bool [T, B] zeroes the state entering step t of the rows where it is
true; lengths int64 [B] (1..T) ends row b after lengths[b] steps: later steps output 0 and keep the
state, so h_n[b] = y[lengths[b] - 1, b] (see last_state).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


def _activation(relu: bool):
    return torch.relu if relu else torch.tanh


def _active(lengths: Optional[Tensor], t: int) -> Optional[Tensor]:
    """[B, 1] bool: the rows whose step t is within their length (None: all of them)."""
    return None if lengths is None else (lengths > t).unsqueeze(-1)


def last_state(y: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """h_n [B, H]: y[T-1], or y[lengths[b] - 1, b] per row (a copy either way)."""
    if lengths is None:
        return y[-1].clone()
    return y[lengths - 1, torch.arange(y.shape[1], device=y.device)]


def rnn_forward(
    x: Tensor,
    h0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    relu: bool = False,
    resets: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tensor:
    """Returns y [T, B, H], the hidden state after every step (0 past a row's length).
    Differentiable by autograd."""
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
        h_in = h if resets is None else torch.where(resets[t].unsqueeze(-1), 0, h)
        h_new = act(xw[t] + h_in @ weight_hh.t())
        active = _active(lengths, t)
        if active is None:
            h = h_new
            ys.append(h)
        else:  # past its length a row keeps its state and outputs 0
            h = torch.where(active, h_new, h)
            ys.append(torch.where(active, h_new, 0))
    return torch.stack(ys)


def rnn_backward(
    grad_y: Tensor,
    x: Tensor,
    h0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    y: Tensor,
    relu: bool = False,
    grad_h_n: Optional[Tensor] = None,
    resets: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reverse-time backward written out by hand from y alone.

    Returns (dx, dh0, dW_ih, dW_hh, db) as the compiled `rnn_backward` op does:
        dz_t = (grad_y_t + [t = T-1] grad_h_n + dz_{t+1} W_hh) * act'(z_t)
    with act'(z_t) = 1 - y_t^2 (tanh); for relu, dz_t is 0 where y_t <= 0 and the incoming
    gradient elsewhere, as autograd's relu backward (so a NaN in y passes the gradient on).
    Differentiable by autograd (no in-place writes), which the double backward relies on.

    With lengths, dz_t = 0 past a row's length and grad_h_n joins at step lengths[b] - 1 (the
    state passes unchanged through the padded steps to h_n). With resets, the state entering a
    reset step is a constant 0: dz_t of that row reaches neither dh_{t-1} nor dW_hh (its h_{t-1}
    term is 0), only dx_t, dW_ih and db.
    """
    T = y.shape[0]
    h_prev = torch.cat([h0.unsqueeze(0), y[:-1]])  # h_{t-1} for every active t
    dzs, dz_recs = [], []
    carry = torch.zeros_like(h0)  # the gradient reaching h_t from t+1
    for t in reversed(range(T)):
        g = grad_y[t] + carry
        if grad_h_n is not None:
            if lengths is None:
                if t == T - 1:
                    g = g + grad_h_n
            else:
                g = g + torch.where((lengths == t + 1).unsqueeze(-1), grad_h_n, 0)
        dz_t = torch.where(y[t] <= 0, torch.zeros_like(g), g) if relu else g * (1 - y[t] * y[t])
        active = _active(lengths, t)
        if active is not None:
            dz_t = torch.where(active, dz_t, 0)
        dzs.append(dz_t)
        # The part of dz_t that goes through h_{t-1}: none where the state entering t was reset.
        dz_rec = dz_t if resets is None else torch.where(resets[t].unsqueeze(-1), 0, dz_t)
        dz_recs.append(dz_rec)
        carry = dz_rec @ weight_hh
    dz = torch.stack(dzs[::-1])
    dh0 = carry
    dz2 = dz.reshape(-1, dz.shape[-1])
    dz_rec2 = torch.stack(dz_recs[::-1]).reshape(-1, dz.shape[-1])
    dW_hh = dz_rec2.t() @ h_prev.reshape(-1, h_prev.shape[-1])
    dW_ih = dz2.t() @ x.reshape(-1, x.shape[-1])
    db = dz2.sum(0)
    dx = dz @ weight_ih
    return dx, dh0, dW_ih, dW_hh, db

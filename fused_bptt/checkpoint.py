"""Exact backpropagation through a whole sequence in bounded memory: checkpointing through time.

Plain BPTT over T steps keeps every step's activations for the backward pass: memory grows
linearly with T. Truncation bounds it by cutting the gradient. checkpointed_bptt bounds it
without cutting anything:

    1. forward over the sequence segment by segment under torch.no_grad(), keeping only the
       state at each segment boundary (T / s states);
    2. for the segments in reverse order: recompute the segment with grad from its boundary
       state (detached, requires_grad), backpropagate its loss plus <h_n, dL/dh_n> (the
       gradient that the later segments sent back to its final state), and hand the gradient
       of its initial state on to the segment before.

Step 2 is the chain rule split at the boundaries, so the parameters' .grad is what one
unchunked forward and backward gives, up to floating-point rounding. Memory: T / s boundary
states plus one segment's activations, O(sqrt(T)) at the default s = sqrt(T). Compute: one
forward more than plain BPTT (the first pass, which builds no graph).

Randomness: the CPU RNG state (and the CUDA one of x's device) is saved before each segment's
first forward and restored for its recomputation, so dropout draws the same masks both times;
afterwards the RNG is left where the first pass left it. The masks are those of a segmented
forward, not of one call over the whole sequence (which draws them in one go): the gradient is
exact for the forward that was run, as with TBPTT chunks. Other side effects of a forward
(BatchNorm's running statistics, counters) happen twice.
"""

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .tbptt import State, _map_state, _state_tensors
from .train import _check_loss, _split_output

__all__ = ["checkpointed_bptt"]

WHO = "checkpointed_bptt"


class _RNGStates:
    """The CPU RNG state and, for a CUDA device, that device's, captured before each segment.

    Kept in one preallocated buffer, as the boundary states are (see _Boundaries)."""

    def __init__(self, count: int, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state().expand(count, -1).clone()
        self.cuda = (
            torch.cuda.get_rng_state(self.device).expand(count, -1).clone() if self.device else None
        )

    def capture(self, index: int) -> None:
        self.cpu[index].copy_(torch.get_rng_state())
        if self.device:
            self.cuda[index].copy_(torch.cuda.get_rng_state(self.device))

    def restore(self, index: int) -> None:
        # A copy: torch 2.13's set_rng_state crashes on a view with a storage offset.
        torch.set_rng_state(self.cpu[index].clone())
        if self.device:
            torch.cuda.set_rng_state(self.cuda[index].clone(), self.device)


class _Boundaries:
    """The states at the segment boundaries, one preallocated buffer [count, ...] per tensor of
    the state. Many small long-lived allocations between the segments' large short-lived ones
    would fragment the heap: the process's memory would then grow by up to a segment's
    activations per segment (measured: about 1.8 MiB a segment at B/H = 16/256)."""

    def __init__(self, count: int) -> None:
        self.count, self.skeleton, self.buffers = count, None, []

    def store(self, index: int, h: State) -> None:
        tensors = _state_tensors(h)
        if not self.buffers:
            # The structure with None for each tensor (None alone: the state is one tensor).
            self.skeleton = _map_state(lambda t: None, h) if not isinstance(h, Tensor) else None
            self.buffers = [t.new_empty((self.count, *t.shape)) for t in tensors]
        shapes = [tuple(b.shape[1:]) for b in self.buffers]
        if [tuple(t.shape) for t in tensors] != shapes:
            raise RuntimeError(
                f"{WHO}: the model's state changed shape between segments: "
                f"{shapes} before, {[tuple(t.shape) for t in tensors]} after "
                f"segment {index - 1}; its state must keep one structure"
            )
        for buffer, t in zip(self.buffers, tensors):
            buffer[index].copy_(t)

    def load(self, index: int) -> State:
        return _rebuild(self.skeleton, iter([buffer[index] for buffer in self.buffers]))


def _rebuild(skeleton, tensors) -> State:
    """The state structure `skeleton` (tuples of None) filled with the next tensors in order."""
    if skeleton is None:
        return next(tensors)
    return type(skeleton)(_rebuild(part, tensors) for part in skeleton)


def _leaf(t: Tensor) -> Tensor:
    """A detached copy of t's value that collects its own gradient (where t can have one)."""
    return t.detach().requires_grad_(t.is_floating_point() or t.is_complex())


def checkpointed_bptt(
    model: Callable,
    x: Tensor,
    target: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    h0: State = None,
    *,
    segment: Optional[int] = None,
    batch_first: bool = False,
) -> Tensor:
    """Backpropagates the loss of a whole sequence exactly, holding O(sqrt(T)) activations.

    Args:
        model: (x_seg, h) -> (pred, h_n): FusedRNN, nn.RNN, nn.GRU, nn.LSTM (h = (h, c)),
            RNNWithHead, or any module of that form. It runs on one segment at a time.
        x: [T, B, ...] (batch_first: [B, T, ...]).
        target: the same length T in the same dim; feature shapes may differ from x's.
        loss_fn: (pred_seg, target_seg) -> a scalar. The total loss is the sum over segments,
            so for the mean over all T steps use a sum reduction divided by the total count,
            e.g. lambda p, t: F.mse_loss(p, t, reduction="sum") / t_full.numel().
        h0: the initial state (None: zeros, as the model takes it).
        segment: steps per segment, default round(sqrt(T)); the last one is shorter when it
            does not divide T. Memory is about T / segment states plus segment steps of
            activations.
        batch_first: time is dim 1 of x and target.

    Adds to every parameter's .grad (as backward() does) the gradient of the total loss that
    one unchunked forward and backward would give, also to x's, target's and h0's graph where
    they require grad. Returns the total loss, detached.

    Example::

        model = RNNWithHead(FusedRNN(4, 256), nn.Linear(256, 1))
        opt.zero_grad()
        loss = checkpointed_bptt(model, x, target, mse_sum, segment=200)  # x: [32000, 16, 4]
        opt.step()
    """
    if segment is not None and (
        isinstance(segment, bool) or not isinstance(segment, int) or segment < 1
    ):
        raise ValueError(
            f"{WHO}: segment must be an int >= 1 (time steps per segment) or None "
            f"for round(sqrt(T)), but got {segment!r}"
        )
    time_dim = 1 if batch_first else 0
    for name, value in (("x", x), ("target", target)):
        if not isinstance(value, Tensor) or value.dim() <= time_dim:
            raise ValueError(
                f"{WHO}: {name} must be a tensor with time at dim {time_dim} "
                f"({'[B, T, ...]' if batch_first else '[T, ...]'}), but got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else value!r}"
            )
    length = x.shape[time_dim]
    if target.shape[time_dim] != length:
        raise ValueError(
            f"{WHO}: x and target must have the same length T (dim {time_dim}), "
            f"but got x {tuple(x.shape)} and target {tuple(target.shape)}"
        )
    if length == 0:
        raise ValueError(f"{WHO}: the sequence is empty (T = 0)")
    step = min(segment or max(1, round(math.sqrt(length))), length)
    starts = range(0, length, step)

    # Inputs that want a gradient get it once at the end, from a leaf that the segments'
    # backward passes accumulate into: their own graph is then traversed once, not per segment.
    x_in = _leaf(x) if x.requires_grad else x
    target_in = _leaf(target) if target.requires_grad else target
    h0_in = _map_state(lambda t: _leaf(t) if t.requires_grad else t.detach(), h0)

    def piece(t: Tensor, start: int) -> Tensor:
        return t.narrow(time_dim, start, min(step, length - start))

    # Pass 1: the boundary states only (boundary i: the state before segment i).
    boundaries = _Boundaries(len(starts))
    rng_states = _RNGStates(len(starts), x.device)
    with torch.no_grad():
        h = h0_in
        for index, start in enumerate(starts):
            rng_states.capture(index)
            _, h = _split_output(model(piece(x_in, start), h), WHO, f"segment {index}")
            if index + 1 < len(starts):
                boundaries.store(index + 1, h)
            h = boundaries.load(index + 1) if index + 1 < len(starts) else None
    after_forward = _RNGStates(1, x.device)
    after_forward.capture(0)

    # Pass 2: each segment again, with grad, last to first.
    losses: Optional[Tensor] = None
    grad_h: Optional[List[Optional[Tensor]]] = None  # dL/d(the segment's final state)
    for index in reversed(range(len(starts))):
        start = starts[index]
        h_in = h0_in if index == 0 else _map_state(_leaf, boundaries.load(index))
        rng_states.restore(index)
        with torch.enable_grad():
            pred, h_out = _split_output(model(piece(x_in, start), h_in), WHO, f"segment {index}")
            loss = loss_fn(pred, piece(target_in, start))
        _check_loss(loss, WHO)
        outputs, grads = ([loss], [None]) if loss.requires_grad else ([], [])
        if grad_h is not None:
            finals = _state_tensors(h_out)
            if len(finals) != len(grad_h):
                raise RuntimeError(
                    f"{WHO}: the model returned a state of {len(finals)} "
                    f"tensors for segment {index}, but {len(grad_h)} for the "
                    f"next one; its state must keep one structure"
                )
            for t, g in zip(finals, grad_h):
                if g is not None and t.requires_grad:
                    outputs.append(t)
                    grads.append(g)
        if index == 0 and not (
            loss.requires_grad or any(t.requires_grad for t in _state_tensors(h_out))
        ):
            # Segment 0 starts from the caller's h0, so only what the caller asks to
            # differentiate (parameters, x, h0) can make its outputs require grad.
            raise RuntimeError(
                f"{WHO}: nothing to backpropagate: the loss does not require "
                f"grad (no parameter of the model requires grad, nor do x or "
                f"h0)"
            )
        if outputs:
            torch.autograd.backward(outputs, grads)
        grad_h = [t.grad for t in _state_tensors(h_in)] if index else None
        if losses is None:
            losses = loss.new_empty(len(starts))
        losses[index] = loss.detach()
    after_forward.restore(0)

    # The inputs' own graphs, once.
    tails = [
        (t, leaf.grad)
        for t, leaf in ((x, x_in), (target, target_in))
        if t.requires_grad and leaf.grad is not None
    ]
    tails += [
        (t, leaf.grad)
        for t, leaf in zip(_state_tensors(h0), _state_tensors(h0_in))
        if t.requires_grad and leaf.grad is not None
    ]
    if tails:
        torch.autograd.backward([t for t, _ in tails], [g for _, g in tails])
    return losses.sum()

"""Training glue on top of the chunk drivers: a model with a readout, and the per-chunk loop.

RNNWithHead    (x, h) -> (head(rnn(x, h)[0]), h_n): an rnn and a readout as one model.
train_tbptt    forward, loss, backward, gradient norm (and clipping), optimizer step per
               chunk of a driver; returns the losses, with the gradient norms and whether
               each update was clipped.
TrainLog       what train_tbptt returns: the list of per-update losses, plus .grad_norms
               and .clipped.
"""

import inspect
import math
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .tbptt import State, _map_state, _state_tensors

__all__ = ["RNNWithHead", "TrainLog", "train_tbptt"]


class RNNWithHead(nn.Module):
    """An rnn `(x, h) -> (y, h_n)` and a readout `head(y)` as one model `(x, h) -> (pred, h_n)`.

    `head` is usually a module (its parameters are then the model's); any callable works.

    Example::

        model = RNNWithHead(FusedRNN(1, 64), nn.Linear(64, 1))
        pred, h_n = model(x, None)            # x: [T, B, 1] -> pred: [T, B, 1]
    """

    def __init__(self, rnn: nn.Module, head: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.rnn, self.head = rnn, head

    def forward(self, x: Tensor, h: State = None, resets: Optional[Tensor] = None):
        if resets is None:  # an rnn without resets (nn.RNN, nn.LSTM) keeps working
            y, h_n = self.rnn(x, h)
        else:
            _require_resets(self.rnn, "RNNWithHead: its rnn")
            y, h_n = self.rnn(x, h, resets=resets)
        return self.head(y), h_n


def _require_resets(model: Callable, who: str) -> None:
    """A TypeError unless model(x, h, resets=...) is accepted: dropping the resets would run
    the state across every document boundary, a silently wrong training."""
    fn = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call decide
        return
    if any(p.name == "resets" or p.kind is p.VAR_KEYWORD for p in params):
        return
    raise TypeError(
        f"{who} ({type(model).__name__}) takes no `resets`, but the chunks carry "
        f"resets (StatefulTBPTT(boundaries=...)). Use a model whose forward takes "
        f"resets (FusedRNN, or RNNWithHead around one), or build the driver without "
        f"boundaries"
    )


class TrainLog(list):
    """The per-update losses of train_tbptt (a plain list of floats, as it always was), with

    grad_norms  the 2-norm of all the optimizer's gradients before clipping, per update
                (inf or nan when the gradient was: what monitoring is for);
    clipped     per update, whether clipping scaled the gradient down (always False
                without clip_grad_norm).
    """

    def __init__(self, losses=(), grad_norms=(), clipped=()) -> None:
        super().__init__(losses)
        self.grad_norms: List[float] = list(grad_norms)
        self.clipped: List[bool] = list(clipped)


def _split_output(out, who: str, where: str):
    """(pred, h_n) from what the model returned, or a TypeError saying what came instead."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        what = (
            f"a {type(out).__name__} of length {len(out)}"
            if isinstance(out, (tuple, list))
            else f"a {type(out).__name__}"
        )
        raise TypeError(
            f"{who}: model(x, h) must return (pred, h_n), as nn.RNN, FusedRNN, "
            f"nn.LSTM and RNNWithHead do, but it returned {what} ({where})"
        )
    pred, h_n = out
    try:
        _map_state(lambda t: t, h_n)
    except TypeError as error:
        raise TypeError(
            f"{who}: model(x, h) must return (pred, h_n) with h_n its final state ({error})"
        ) from None
    if not _state_tensors(h_n):
        raise TypeError(
            f"{who}: model(x, h) returned h_n = {h_n!r} ({where}); expected its "
            f"final state, a Tensor or a tuple of Tensors, to carry on from"
        )
    return pred, h_n


def _check_loss(loss, who: str) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else repr(loss)
        raise ValueError(
            f"{who}: loss_fn must return a scalar tensor (a reduction such as "
            f"'mean' or 'sum'), but it returned {got}"
        )


def _grad_norm_and_clip(params: List[Tensor], max_norm: Optional[float]):
    """The total gradient 2-norm before clipping, and whether clipping scaled it down."""
    if max_norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(nn.utils.get_total_norm(grads)) if grads else 0.0
        return norm, False
    norm = float(nn.utils.clip_grad_norm_(params, max_norm))
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6) when that is below 1.
    return norm, not max_norm >= norm + 1e-6


def train_tbptt(
    model: Callable,
    driver,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    head: Optional[Callable] = None,
    clip_grad_norm: Optional[float] = None,
    on_chunk: Optional[Callable[[int, float], None]] = None,
) -> TrainLog:
    """One pass over `driver` (StatefulTBPTT or StatelessTBPTT): one optimizer step per chunk.

    For each chunk: pred, h_n = model(chunk.x, chunk.h) (with resets=chunk.resets when the
    driver has boundaries; a model that takes no resets is then refused),
    loss = loss_fn(chunk.scored(pred), chunk.target) (the newest steps only with
    StatefulTBPTT(backprop=k2)), backward, the gradient norm of the optimizer's parameters
    (clipped to `clip_grad_norm` if set), optimizer.step(), driver.carry(h_n). `on_chunk(index,
    loss)` is called after each step
    (progress, logging).

    `model` is any callable (x, h) -> (pred, h_n); with `head`, the model is
    RNNWithHead(model, head).

    Returns a TrainLog: the per-chunk losses (a list of floats), with `.grad_norms` (before
    clipping) and `.clipped` per chunk.

    Example::

        model = RNNWithHead(FusedRNN(1, 64), nn.Linear(64, 1))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        driver = StatefulTBPTT(x, target, k=32, num_streams=16)
        log = train_tbptt(model, driver, F.mse_loss, opt, clip_grad_norm=1.0)
        print(log[-1], log.grad_norms[-1], sum(log.clipped))
    """
    if clip_grad_norm is not None and not (
        isinstance(clip_grad_norm, (int, float))
        and not isinstance(clip_grad_norm, bool)
        and clip_grad_norm > 0
        and not math.isnan(clip_grad_norm)
    ):
        raise ValueError(
            f"train_tbptt: clip_grad_norm must be a positive number or None, but "
            f"got {clip_grad_norm!r}"
        )
    if head is not None:
        model = RNNWithHead(model, head)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    log = TrainLog()
    for index, chunk in enumerate(driver):
        if chunk.resets is None:
            out = model(chunk.x, chunk.h)
        else:
            _require_resets(model, "train_tbptt: the model")
            out = model(chunk.x, chunk.h, resets=chunk.resets)
        pred, h_n = _split_output(out, "train_tbptt", f"chunk {index}")
        loss = loss_fn(chunk.scored(pred), chunk.target)
        _check_loss(loss, "train_tbptt")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm, clipped = _grad_norm_and_clip(params, clip_grad_norm)
        optimizer.step()
        driver.carry(h_n)
        log.append(loss.item())
        log.grad_norms.append(norm)
        log.clipped.append(clipped)
        if on_chunk is not None:
            on_chunk(index, log[-1])
    return log

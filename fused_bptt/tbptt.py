"""Truncated backpropagation through time: chunk drivers on top of any recurrent module.

The drivers know one interface only, `module(x, h) -> (y, h_n)` (torch.nn.RNN, FusedRNN, nn.GRU,
nn.LSTM with h = (h, c), or your own); they never see a kernel. They cut the data into chunks of
k time steps; gradients then flow inside a chunk and never across a chunk boundary.

    StatefulTBPTT    B contiguous streams, consecutive chunks in time order; the final state of
                     one chunk, detached, is the initial state of the next (forward information
                     flows across the boundary, gradient does not). With backprop=k2 > k it is
                     TBPTT(k, k2): every k new steps, backpropagate through the last k2.
    StatelessTBPTT   mini-batches of B windows of length k at random places of random sequences
                     (seeded), each window starting from a fresh zero state.
    batchify         one long sequence [N, ...] -> B contiguous streams [N // B, B, ...].

Both drivers yield `Chunk(x, target, h, context, time_dim, resets)` and follow one protocol: run
the model on `chunk.x` from `chunk.h` (with `resets=chunk.resets` when it is not None), take
the loss of `chunk.scored(pred)` against `chunk.target`, then hand the model's final state back
with `driver.carry(h_n)` (the stateless driver ignores it). Chunks are time-major
([k, B, ...]) unless the driver is built with batch_first=True ([B, k, ...]), matching the
module's own `batch_first`.

The training loop is in fused_bptt/train.py; exact full-sequence BPTT in bounded memory in
fused_bptt/checkpoint.py.
"""

import collections
import math
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_bool_layout

__all__ = ["Chunk", "batchify", "StatefulTBPTT", "StatelessTBPTT"]

# A recurrent state: a tensor whose dim -2 is the batch (nn.RNN's [L*D, B, H], or [B, H]),
# a tuple of such tensors (nn.LSTM's (h, c)), or None for "zeros" (what nn.RNN & co. accept).
State = Union[None, Tensor, tuple]


class Chunk(NamedTuple):
    """One truncation unit: the model runs on x from state h, the loss compares with target.

    x: [n, B, ...] (or [B, n, ...] when time_dim = 1, batch_first), h: the state before x[0]
    (None means zeros). The first `context` steps of x only rebuild the state and carry
    gradient back (TBPTT(k1, k2)); the loss is on the last n - context steps, whose targets
    are `target` ([n - context, B, ...]). context is 0 except with StatefulTBPTT(backprop=k2).
    resets: None, or bool [n, B] ([B, n] when time_dim = 1) from StatefulTBPTT(boundaries=...),
    covering every step of x (context steps too): pass it on, `model(x, h, resets=resets)`.
    """

    x: Tensor
    target: Tensor
    h: State
    context: int = 0
    time_dim: int = 0
    resets: Optional[Tensor] = None

    def scored(self, pred: Tensor) -> Tensor:
        """The part of the model's output that the loss compares with `target`: its last
        n - context steps (all of it when context is 0)."""
        if not self.context:
            return pred
        return pred.narrow(self.time_dim, self.context, pred.shape[self.time_dim] - self.context)


def batchify(sequence: Tensor, num_streams: int) -> Tensor:
    """Cuts one sequence [N, ...] into B = num_streams contiguous streams [N // B, B, ...].

    Stream b is the b-th contiguous piece sequence[b * L : (b + 1) * L], L = N // B; the last
    N - B * L steps are dropped. Time-major, like the chunks of StatefulTBPTT.
    """
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
        raise ValueError(f"batchify: num_streams must be an int >= 1, but got {num_streams!r}")
    if sequence.dim() < 1:
        raise ValueError("batchify: expected a sequence [N, ...], but got a 0-d tensor")
    n = sequence.shape[0]
    if num_streams > n:
        raise ValueError(
            f"batchify: cannot cut a sequence of length {n} into {num_streams} "
            f"streams (at most {n}, one step each)"
        )
    length = n // num_streams
    streams = sequence[: length * num_streams].reshape(num_streams, length, *sequence.shape[1:])
    return streams.transpose(0, 1)


def _map_state(fn: Callable[[Tensor], Tensor], h: State) -> State:
    if h is None:
        return None
    if isinstance(h, Tensor):
        return fn(h)
    if isinstance(h, (tuple, list)):
        return type(h)(_map_state(fn, part) for part in h)
    raise TypeError(
        f"a recurrent state must be a Tensor, a tuple of Tensors or None, but got "
        f"{type(h).__name__}"
    )


def _state_tensors(h: State) -> List[Tensor]:
    if h is None:
        return []
    if isinstance(h, Tensor):
        return [h]
    return [t for part in h for t in _state_tensors(part)]


def _check_k(k, who: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(
            f"{who}: the chunk length k must be an int >= 1 (a number of time "
            f"steps, not a number of chunks), but got {k!r}"
        )


def _check_boundary_stream(
    boundaries, x: Tensor, num_streams: Optional[int], batch_first: bool
) -> None:
    """boundaries must be a bool tensor on x's device laid out like x: [N] with num_streams,
    else x's first two dims ([T, B], or [B, T] with batch_first)."""
    who = "StatefulTBPTT"
    if num_streams is not None:
        layout, expected = "[N] (one sequence, like x)", tuple(x.shape[:1])
    else:
        layout = "[B, T] (batch_first, like x)" if batch_first else "[T, B] (like x)"
        expected = tuple(x.shape[:2])
    meaning = ", true where a new document starts"
    check_bool_layout(who, "boundaries", boundaries, layout, expected, x, "x", meaning)


class StatefulTBPTT:
    """Consecutive chunks of B contiguous streams; the state crosses chunk boundaries detached.

    Args:
        x, target: the input and target streams [T, B, ...] (batch_first: [B, T, ...]); or, with
            `num_streams`, one long sequence each, [N, ...], cut by `batchify` into that many
            streams. x and target must have the same length (their feature shapes may differ,
            e.g. target [N] of class indices).
        k: chunk length in time steps (k1 of TBPTT(k1, k2)): every chunk brings k new steps,
            one update each. The last chunk is shorter when k does not divide T, unless
            drop_last=True drops it.
        num_streams: B, when x and target are single sequences to batchify.
        batch_first: yield [B, k, ...] chunks, for modules built with batch_first=True.
        backprop: k2, how far back each update backpropagates: a multiple of k, default k
            (plain TBPTT). With k2 > k every chunk's x is the k new steps preceded by the
            k2 - k steps before them (fewer at the start of the streams), chunk.h is the
            state before those (detached), and chunk.context = the number of those steps.
            The loss covers the new steps only: compare `chunk.scored(pred)` with
            `chunk.target`. Each step is scored once and every gradient reaches k2 - k to k2
            steps back, at k2 / k times the forward and backward work of plain TBPTT(k).
        boundaries: where documents (episodes) start, for streams of many concatenated ones:
            a bool tensor laid out like x ([T, B], batch_first [B, T]; with num_streams one
            [N], cut like x), on x's device. boundaries[t] true means the state entering step
            t is zero. Each chunk then carries `chunk.resets`, the boundaries of its steps
            (context steps included), in the chunk's layout; run the model with
            `model(chunk.x, chunk.h, resets=chunk.resets)` (FusedRNN takes them; train_tbptt
            passes them on), so no state leaks across a boundary, even inside a chunk.

    Protocol: for each chunk run `pred, h_n = model(chunk.x, chunk.h)` (adding
    `resets=chunk.resets` with boundaries) and call `carry(h_n)`;
    h_n, the state after the chunk's last step, is exactly the state one unchunked forward
    gives there (the driver keeps the last k2 / k of them, detached, to start later windows).
    `reset()` zeroes the state of all streams, `reset(streams)` of some (an index list, a
    LongTensor or a bool mask [B]) between chunks; for document boundaries inside the streams,
    known in advance, pass `boundaries` instead (they also act inside a chunk).
    Iterating again starts from the first chunk and a zero state.

    Example::

        model = RNNWithHead(FusedRNN(1, 64), nn.Linear(64, 1))
        driver = StatefulTBPTT(x, target, k=32, num_streams=16)     # x, target: [N, 1]
        for chunk in driver:                # backprop=256: the same loop gives TBPTT(32, 256)
            pred, h_n = model(chunk.x, chunk.h)
            loss = F.mse_loss(chunk.scored(pred), chunk.target)
            opt.zero_grad(); loss.backward(); opt.step()
            driver.carry(h_n)
    """

    def __init__(
        self,
        x: Tensor,
        target: Tensor,
        k: int,
        num_streams: Optional[int] = None,
        *,
        batch_first: bool = False,
        drop_last: bool = False,
        backprop: Optional[int] = None,
        boundaries: Optional[Tensor] = None,
    ) -> None:
        who = "StatefulTBPTT"
        _check_k(k, who)
        if backprop is None:
            backprop = k
        if isinstance(backprop, bool) or not isinstance(backprop, int) or backprop < k:
            raise ValueError(
                f"{who}: backprop (k2, the steps each update backpropagates "
                f"through) must be an int >= k={k}, but got {backprop!r}"
            )
        if backprop % k:
            # The driver sees only the final state of each chunk, so it can start a window
            # only at a chunk boundary.
            raise ValueError(
                f"{who}: backprop must be a multiple of k={k} (windows start at "
                f"chunk boundaries, the only states the driver sees), but got "
                f"{backprop}; use {backprop // k * k} or {(backprop // k + 1) * k}"
            )
        if boundaries is not None:
            _check_boundary_stream(boundaries, x, num_streams, batch_first)
        if num_streams is not None:
            if x.dim() < 1 or target.dim() < 1 or x.shape[0] != target.shape[0]:
                raise ValueError(
                    f"{who}: x and target must be sequences of the same length "
                    f"(dim 0), but got x {tuple(x.shape)} and target "
                    f"{tuple(target.shape)}"
                )
            x, target = batchify(x, num_streams), batchify(target, num_streams)
            if boundaries is not None:
                boundaries = batchify(boundaries, num_streams)
            if batch_first:
                x, target = x.transpose(0, 1), target.transpose(0, 1)
                if boundaries is not None:
                    boundaries = boundaries.transpose(0, 1)
        else:
            if x.dim() < 2 or target.dim() < 2:
                raise ValueError(
                    f"{who}: without num_streams, x and target must be streams "
                    f"{'[B, T, ...]' if batch_first else '[T, B, ...]'}, but got x "
                    f"{tuple(x.shape)} and target {tuple(target.shape)}; pass "
                    f"num_streams=B to cut one long sequence into B streams"
                )
            if x.shape[:2] != target.shape[:2]:
                raise ValueError(
                    f"{who}: x and target must have the same length and number of "
                    f"streams (their first two dims), but got x {tuple(x.shape)} "
                    f"and target {tuple(target.shape)}"
                )
        self._time_dim = 1 if batch_first else 0
        self.x, self.target, self.k, self.drop_last = x, target, k, drop_last
        self.backprop, self.boundaries = backprop, boundaries
        self.length = x.shape[self._time_dim]
        self.num_streams = x.shape[1 - self._time_dim]
        if self.length < k:
            raise ValueError(
                f"{who}: the streams are {self.length} steps long, shorter than "
                f"the chunk length k={k}; use k <= {self.length} or fewer streams"
            )
        # The states at the last backprop // k chunk boundaries since the last full reset,
        # newest last; boundary j is the state after j * k steps.
        self._chunk_states = collections.deque([None], maxlen=backprop // k)
        self._first_boundary = 0  # the boundary of the last full reset
        self._next_index = 0  # the chunk after the current one
        self._awaiting_carry = False

    @property
    def state(self) -> State:
        """The carried state: the one the next chunk's new steps start from."""
        return self._chunk_states[-1]

    def __len__(self) -> int:
        return self.length // self.k if self.drop_last else math.ceil(self.length / self.k)

    def __iter__(self) -> Iterator[Chunk]:
        self._next_index = 0
        self.reset()
        for index in range(len(self)):
            if self._awaiting_carry:
                raise RuntimeError(
                    f"StatefulTBPTT: carry(h_n) was not called after chunk "
                    f"{index - 1}; call it with the model's final state after "
                    f"every chunk (or reset() to start the streams over)"
                )
            start = index * self.k
            end = min(start + self.k, self.length)
            # The window starts backprop - k steps before the new ones, at a chunk boundary
            # whose state is kept, but never before the last full reset.
            first = max(self._first_boundary, index + 1 - self.backprop // self.k)
            h = self._chunk_states[first - index - 1]
            x = self.x.narrow(self._time_dim, first * self.k, end - first * self.k)
            target = self.target.narrow(self._time_dim, start, end - start)
            # The resets of every step of x, the context steps too: a window re-run from an
            # older state must zero it at the same boundaries as the first run did.
            resets = (
                None
                if self.boundaries is None
                else self.boundaries.narrow(self._time_dim, first * self.k, end - first * self.k)
            )
            self._awaiting_carry, self._next_index = True, index + 1
            yield Chunk(x, target, h, start - first * self.k, self._time_dim, resets)
        self._awaiting_carry = False

    def carry(self, h_n: State) -> None:
        """Keeps h_n, detached, as the state after the current chunk."""
        for t in _state_tensors(h_n):
            if t.dim() < 2 or t.shape[-2] != self.num_streams:
                raise ValueError(
                    f"StatefulTBPTT.carry: expected a state with the "
                    f"{self.num_streams} streams at dim -2 (e.g. [layers, B, H]), "
                    f"but got shape {tuple(t.shape)}"
                )
        self._chunk_states.append(_map_state(Tensor.detach, h_n))
        self._awaiting_carry = False

    def reset(self, streams=None) -> None:
        """Zeroes the state of all streams (streams=None) or of the given ones.

        A full reset may replace carry() after a chunk, and the next windows start after it
        (no context from before the reset); a partial one edits the carried state, so call it
        after carry(). With backprop > k a partial reset is refused: the streams share their
        windows, which would run the reset streams across their reset point.
        """
        if streams is None:
            self._chunk_states.clear()
            self._chunk_states.append(None)
            self._first_boundary = self._next_index
            self._awaiting_carry = False
            return
        if self.backprop > self.k:
            raise NotImplementedError(
                f"StatefulTBPTT.reset: resetting some streams is not supported with "
                f"backprop={self.backprop} > k={self.k}: the next windows reach back across "
                f"the reset point for all streams. Use backprop=k, or reset() all streams"
            )
        index = torch.as_tensor(streams)
        if index.dtype == torch.bool:
            if index.shape != (self.num_streams,):
                raise ValueError(
                    f"StatefulTBPTT.reset: a bool mask must have shape "
                    f"({self.num_streams},), but got {tuple(index.shape)}"
                )
            index = index.nonzero().flatten()
        index = index.flatten().long()
        if index.numel() and (index.min() < -self.num_streams or index.max() >= self.num_streams):
            raise IndexError(
                f"StatefulTBPTT.reset: stream indices must be in "
                f"[0, {self.num_streams}), but got {index.tolist()}"
            )

        def zero_rows(t: Tensor) -> Tensor:
            # A copy: the carried tensor may still be the saved output of the last chunk's graph.
            t = t.clone()
            t.index_fill_(t.dim() - 2, index.to(t.device) % self.num_streams, 0)
            return t

        self._chunk_states[-1] = _map_state(zero_rows, self.state)


class StatelessTBPTT:
    """Mini-batches of B windows of length k at random places, each from a fresh zero state.

    Args:
        x, target: one sequence [N, ...] each, or lists of sequences [N_i, ...] (lengths may
            differ between sequences; x[i] and target[i] must have the same length).
        k: window length in time steps; every sequence must be at least k long.
        batch_size: B, windows per mini-batch (drawn independently, with replacement).
        num_batches: mini-batches per pass over the driver.
        generator: a torch.Generator or an int seed (None: a seed drawn from torch's global
            RNG). Passes draw on from it: the same seed gives the same sequence of passes.
        batch_first: yield [B, k, ...] chunks instead of [k, B, ...].

    Every window start is equally likely: a window is a uniform draw among all the
    sum_i (N_i - k + 1) windows of all sequences. chunk.h is always None (zeros), and carry()
    ignores its argument, so the same loop serves both drivers.
    """

    def __init__(
        self,
        x: Union[Tensor, Sequence[Tensor]],
        target: Union[Tensor, Sequence[Tensor]],
        k: int,
        batch_size: int,
        num_batches: int,
        *,
        generator: Union[None, int, torch.Generator] = None,
        batch_first: bool = False,
    ) -> None:
        who = "StatelessTBPTT"
        _check_k(k, who)
        for name, value in (("batch_size", batch_size), ("num_batches", num_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{who}: {name} must be an int >= 1, but got {value!r}")
        xs = [x] if isinstance(x, Tensor) else list(x)
        targets = [target] if isinstance(target, Tensor) else list(target)
        if len(xs) != len(targets) or not xs:
            raise ValueError(
                f"{who}: expected as many target sequences as input sequences "
                f"(at least one), but got {len(xs)} and {len(targets)}"
            )
        for i, (xi, ti) in enumerate(zip(xs, targets)):
            if xi.dim() < 1 or ti.dim() < 1 or xi.shape[0] != ti.shape[0]:
                raise ValueError(
                    f"{who}: sequence {i}: x and target must have the same length "
                    f"(dim 0), but got x {tuple(xi.shape)} and target "
                    f"{tuple(ti.shape)}"
                )
            if xi.shape[0] < k:
                raise ValueError(
                    f"{who}: sequence {i} is {xi.shape[0]} steps long, shorter than "
                    f"the window length k={k}"
                )
            if xi.shape[1:] != xs[0].shape[1:] or ti.shape[1:] != targets[0].shape[1:]:
                raise ValueError(
                    f"{who}: sequence {i} has feature shape x {tuple(xi.shape[1:])}"
                    f", target {tuple(ti.shape[1:])}, but sequence 0 has x "
                    f"{tuple(xs[0].shape[1:])}, target {tuple(targets[0].shape[1:])}"
                )
        self.x, self.target, self.k = xs, targets, k
        self.batch_size, self.num_batches, self.batch_first = batch_size, num_batches, batch_first
        if generator is None:  # seeded from the global RNG: torch.manual_seed rules
            generator = int(torch.randint(2**62, (), dtype=torch.int64))
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        self.generator = generator
        # Window w of all sequences: sequence = searchsorted(offsets, w), start = w - offset.
        counts = torch.tensor([xi.shape[0] - k + 1 for xi in xs])
        self._offsets = torch.cumsum(counts, 0) - counts
        self._num_windows = int(counts.sum())

    def __len__(self) -> int:
        return self.num_batches

    def sample_windows(self):
        """Draws one mini-batch: (sequence index [B], start [B]) LongTensors."""
        w = torch.randint(self._num_windows, (self.batch_size,), generator=self.generator)
        sequence = torch.searchsorted(self._offsets, w, right=True) - 1
        return sequence, w - self._offsets[sequence]

    def __iter__(self) -> Iterator[Chunk]:
        dim = 0 if self.batch_first else 1
        for _ in range(self.num_batches):
            sequence, start = self.sample_windows()
            pairs = [
                (self.x[s][b : b + self.k], self.target[s][b : b + self.k])
                for s, b in zip(sequence.tolist(), start.tolist())
            ]
            x = torch.stack([p[0] for p in pairs], dim)
            target = torch.stack([p[1] for p in pairs], dim)
            yield Chunk(x, target, None, 0, 1 - dim)

    def carry(self, h_n: State) -> None:
        """Does nothing: every window starts from zeros."""

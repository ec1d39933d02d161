"""FusedRNN: a drop-in for torch.nn.RNN that runs each layer and direction through fused_bptt.

It subclasses torch.nn.RNN, so the constructor, parameter names, order, shapes, initialisation,
state_dict, repr and the argument validation are nn.RNN's own; isinstance(m, nn.RNN) holds.
Only forward differs: every (layer, direction) is one call of the fused op over the whole chunk.
"""

from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _ops
from ._checks import check_bool_layout, check_boundaries
from .export import _torch_is_exporting, onnx_export_active, onnx_forward
from .function import check_backend_name, layer_forward, resolve_backend, resolved_backend


class FusedRNN(nn.RNN):
    """Multi-layer Elman RNN with tanh or relu, computed by the fused kernels.

    Args are those of torch.nn.RNN, plus the keyword `backend` ("auto", "cuda", "cpp" or
    "reference"; see fused_bptt.available_backends()).

    Example::

        rnn = FusedRNN(input_size=32, hidden_size=128, num_layers=2, batch_first=True)
        out, h_n = rnn(torch.randn(8, 100, 32))           # out: [8, 100, 128], h_n: [2, 8, 128]

    forward also takes a PackedSequence (as nn.RNN does: a PackedSequence comes back, h_n holds
    each sequence's last state) and, for tensor input, the keyword `resets`: a bool [T, B]
    ([B, T] with batch_first) that zeroes the state entering step t of sequence b in every layer
    and direction (the reverse direction sees the same boundaries), and `lengths`: int64 [B] in
    1..T, padded input whose sequence b ends after lengths[b] steps (what nn.RNN gives for
    pack_padded_sequence(input, lengths, enforce_sorted=False), padded again to T; this form
    also exports to ONNX with either exporter).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        **kwargs,
    ) -> None:
        check_backend_name(backend, "FusedRNN")
        # Other keywords (proj_size, ...) go to nn.RNN, which accepts or rejects them itself,
        # with its own errors.
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            nonlinearity,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
            **kwargs,
        )
        self.backend = backend

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, *, backend: str = "auto") -> "FusedRNN":
        """A FusedRNN with the configuration, weights, device, dtype and mode of `rnn`."""
        if not isinstance(rnn, nn.RNN):
            raise TypeError(
                f"FusedRNN.from_rnn expects a torch.nn.RNN, but got {type(rnn).__name__}"
            )
        weight = rnn.weight_ih_l0
        fused = cls(
            rnn.input_size,
            rnn.hidden_size,
            rnn.num_layers,
            rnn.nonlinearity,
            rnn.bias,
            rnn.batch_first,
            rnn.dropout,
            rnn.bidirectional,
            device=weight.device,
            dtype=weight.dtype,
            backend=backend,
        )
        fused.load_state_dict(rnn.state_dict())
        fused.train(rnn.training)
        return fused

    def flatten_parameters(self) -> None:
        """Does nothing: the fused ops read the parameters where they are (no cuDNN buffer)."""

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    # resets and lengths are positional-or-keyword, not keyword-only: the TorchScript ONNX
    # exporter fills every parameter of forward positionally with its default.
    def forward(
        self,
        input: Tensor,
        hx: Optional[Tensor] = None,
        resets: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        if resets is None and lengths is None and type(input) is Tensor and _plain_eager():
            out = self._forward_eager(input, hx)
            if out is not None:
                return out
        if onnx_export_active():  # torch.onnx.export: the graph is ONNX's RNN op (export.py)
            if resets is not None:
                raise NotImplementedError(
                    "ONNX export of FusedRNN does not take resets: ONNX's RNN op has no state "
                    "reset inside a sequence; export without resets"
                )
            return onnx_forward(self, input, hx, lengths)
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "FusedRNN: lengths applies to padded tensor input; a PackedSequence "
                    "carries its own lengths (pass lengths=None)"
                )
            if resets is not None:
                raise ValueError(
                    "FusedRNN: resets applies to tensor input; a PackedSequence "
                    "already separates its sequences (pass resets=None)"
                )
            return forward_packed(self, input, hx)
        if input.dim() not in (2, 3):
            raise ValueError(
                f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead"
            )
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if resets is not None:
            resets = _resets_time_major(resets, input, self.batch_first)
        input, hx = _batched(input, hx, batch_dim)
        input, hx, weights, autocast = self._autocast_args(input, hx)
        if hx is None:
            hx = self._zero_state(input.size(batch_dim), input)
        _check_input_dtype(input, weights)
        self._check_sizes(input, hx)
        _check_hx_dtype(hx, input)
        if self.batch_first:
            input = input.transpose(0, 1)
        if input.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is not None:  # the range is read in eager mode only, as rnn_layer does
            check_boundaries(input, None, lengths, values=not torch.compiler.is_compiling())

        if autocast:
            with torch.autocast(input.device.type, enabled=False):
                output, h_n = self._run_layers(input, hx, weights, resets, lengths)
        else:
            output, h_n = self._run_layers(input, hx, weights, resets, lengths)

        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n

    def _forward_eager(self, input: Tensor, hx: Optional[Tensor]):
        """forward's common case in few Python steps (on a small layer each step costs about as
        much as the arithmetic): any number of layers and directions, batched input without
        resets or lengths, hx None or [num_layers * num_directions, B, H], a backend already
        resolved for the input's device and dtype and not the reference. It runs the ops the
        general path runs, in the same order (per layer and direction layer_forward's C++
        autograd op, exact with or without grad; the time flips and the concatenation of two
        directions; dropout between layers; hx.unbind and torch.stack around more than one
        layer or direction), so the results are the same bits, and lets the op check the rest
        (dtypes, devices, T >= 1; its checks are at least nn.RNN's). Anything else, or an error
        from an op, returns None: the general path then runs with its own checks and raises
        nn.RNN's error, so nothing is raised here."""
        shape = input.shape
        if len(shape) != 3:
            return None
        batch_first = self.batch_first
        batch = shape[0] if batch_first else shape[1]
        states = self.num_layers * (2 if self.bidirectional else 1)
        if shape[2] != self.input_size:
            return None
        if hx is None:
            hx = self._zero_state(batch, input)
        elif type(hx) is not Tensor or hx.shape != (states, batch, self.hidden_size):
            return None
        # resolve_backend's stored answer: a first call resolves it (with its errors) on the
        # general path
        resolved = resolved_backend(self.backend, input)
        if resolved is None or resolved == "reference":
            return None
        weights = self._weights()
        x = input.transpose(0, 1) if batch_first else input
        try:
            if states == 1:  # hx itself ([1, B, H]), and h_n comes back as [1, B, H]
                bias_ih, bias_hh = (weights[2], weights[3]) if self.bias else (None, None)
                x, h_n = _rnn_layer_op()(
                    x,
                    hx,
                    weights[0],
                    weights[1],
                    bias_ih,
                    bias_hh,
                    self.nonlinearity == "relu",
                    None,
                    None,
                )
            else:
                op, relu = _rnn_layer_op(), self.nonlinearity == "relu"
                x, h_n = self._layers(
                    x,
                    hx,
                    weights,
                    lambda x, h0, w_ih, w_hh, b_ih, b_hh, flip: op(
                        x, h0, w_ih, w_hh, b_ih, b_hh, relu, None, None
                    ),
                    _Reversal(x, None, None) if self.bidirectional else None,
                )
        except (RuntimeError, ValueError, TypeError):
            return None  # bad input: the general path raises nn.RNN's error for it
        return (x.transpose(0, 1) if batch_first else x), h_n

    def _autocast_args(self, input: Tensor, hx: Optional[Tensor]):
        """(input, hx, weights in nn.RNN's order, whether autocast is on). Under autocast, nn.RNN's
        policy (its op is on autocast's lower-precision list): floating tensors other than
        float64 run in the autocast dtype, and so does the output."""
        weights = self._weights()
        autocast = torch.is_autocast_enabled(input.device.type)
        if autocast:
            low = torch.get_autocast_dtype(input.device.type)
            input, hx, *weights = [_autocast_cast(t, low) for t in (input, hx, *weights)]
        return input, hx, weights, autocast

    def _weights(self) -> list:
        """The weights in nn.RNN's order (_flat_weights_names), read where they live now: from
        _parameters directly (a module attribute lookup per weight costs microseconds a call),
        and through getattr for a name that is not a plain parameter there (a parametrization,
        or a tensor put in its place)."""
        params = self._parameters
        weights = []
        for name in self._flat_weights_names:
            w = params.get(name)
            weights.append(getattr(self, name) if w is None else w)
        return weights

    def _zero_state(self, batch: int, like: Tensor) -> Tensor:
        """nn.RNN's default hx: zeros [num_layers * num_directions, batch, H]."""
        num_directions = 2 if self.bidirectional else 1
        return torch.zeros(
            self.num_layers * num_directions,
            batch,
            self.hidden_size,
            dtype=like.dtype,
            device=like.device,
        )

    def _check_sizes(self, input: Tensor, hx: Tensor) -> None:
        """nn.RNN's size checks and messages (check_input / check_hidden_size), input batched."""
        if input.dim() != 3:
            raise RuntimeError(f"input must have 3 dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected "
                f"{self.input_size}, got {input.size(-1)}"
            )
        self.check_hidden_size(hx, self.get_expected_hidden_size(input, None))

    def _run_layers(
        self,
        x: Tensor,
        hx: Tensor,
        weights,
        resets: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """x: [T, B, I] time-major, hx: [num_layers * num_directions, B, H], weights in
        nn.RNN's order (_flat_weights_names), resets [T, B] bool and lengths [B] int64 (both
        checked) or None. The module has checked every shape: each layer goes straight to the
        backend (the ops check again, in C++)."""
        relu = self.nonlinearity == "relu"
        backend = resolve_backend(self.backend, x)
        reverse = _Reversal(x, resets, lengths) if self.bidirectional else None

        def run(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, flip):
            bounds = (reverse.resets, lengths) if flip else (resets, lengths)
            return layer_forward(
                backend, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, *bounds
            )

        return self._layers(x, hx, weights, run, reverse)

    def _layers(self, x: Tensor, hx: Tensor, weights, run, reverse: Optional["_Reversal"]):
        """The loop over layers and directions of _run_layers and _forward_eager: run(x, h0,
        weight_ih, weight_hh, bias_ih, bias_hh, flip) -> (y, h_last) computes one layer in one
        direction (flip: the reverse one, the forward recurrence over x flipped in time by
        `reverse`, whose y is flipped back here); dropout between layers; h_n the stacked last
        states."""
        num_directions = 2 if self.bidirectional else 1
        per_layer = 4 if self.bias else 2
        # Each layer's initial state: with one state, hx itself ([1, B, H]; layer_forward returns
        # h_n as [1, B, H] then, and no view of either is an autograd node); otherwise views.
        states = (hx,) if hx.size(0) == 1 else hx.unbind(0)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                w = weights[index * per_layer : (index + 1) * per_layer]
                bias_ih, bias_hh = (w[2], w[3]) if self.bias else (None, None)
                flip = direction == 1
                y, h_last = run(
                    reverse.flip(x) if flip else x, states[index], *w[:2], bias_ih, bias_hh, flip
                )
                if flip:
                    y = reverse.flip(y)
                outputs.append(y)
                finals.append(h_last)
            x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, (finals[0] if len(finals) == 1 else torch.stack(finals))


def _rnn_layer_op():
    """torch.ops.fused_bptt.rnn_layer (its one overload) as the eager path calls it: _ops'
    EAGER_RNN_LAYER, fused_bptt._C.rnn_layer, which calls the same op through the dispatcher
    without torch.ops' boxed argument parsing (csrc/eager_call.cpp; several microseconds a call)
    and hands what it does not take itself (a tensor subclass, a torch function mode) to
    torch.ops. Either way the same op, dispatched the same way. Called only once the extension
    is loaded (a backend other than the reference is resolved)."""
    return _ops.EAGER_RNN_LAYER


_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_any_autocast = torch._C._is_any_autocast_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack
_forward_ad = torch.autograd.forward_ad
_saved_tensor_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _plain_eager() -> bool:
    """True in plain eager mode, where FusedRNN._forward_eager may run: no torch.compile or
    export tracing, no jit.trace, no autocast, no torch.func transform or forward-mode AD level,
    no saved-tensor hooks. Each of those takes the general path (layer_forward). is_compiling
    comes first: Dynamo reads it as a constant and never traces the rest."""
    return not (
        _is_compiling()
        or _is_tracing()
        or _torch_is_exporting()
        or _any_autocast()
        or _functorch_level() is not None
        or _forward_ad._current_level >= 0
        or _saved_tensor_hooks(False) is not None
    )


class _Reversal:
    """The time reversal of the reverse direction, within each sequence's own length.

    Without lengths it is x.flip(0). With lengths, step t < lengths[b] of row b swaps with
    lengths[b] - 1 - t and the padded steps stay (a gather; the same index undoes it).
    A reset at t (a boundary between steps t-1 and t) is, in reversed time, a boundary between
    reversed steps L-1-t and L-t: the reversed resets are resets[L - s] at s >= 1, none at 0.
    """

    def __init__(self, x: Tensor, resets: Optional[Tensor], lengths: Optional[Tensor]) -> None:
        T = x.shape[0]
        self.index = None
        if lengths is not None:
            t = torch.arange(T, device=x.device).unsqueeze(1)
            self.index = torch.where(t < lengths, lengths - 1 - t, t)  # [T, B]
        self.resets = None
        if resets is not None:
            flipped = resets.flip(0) if self.index is None else resets.gather(0, self.index)
            self.resets = torch.cat([torch.zeros_like(resets[:1]), flipped[:-1]])

    def flip(self, t: Tensor) -> Tensor:
        if self.index is None:
            return t.flip(0)
        return t.gather(0, self.index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _batched(input: Tensor, hx: Optional[Tensor], batch_dim: int):
    """Unbatched input ([T, I], hx [L*D, H]) as a batch of one; nn.RNN's checks of hx's rank."""
    if input.dim() == 2:
        if hx is not None:
            if hx.dim() != 2:
                raise RuntimeError(
                    f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                )
            hx = hx.unsqueeze(1)
        return input.unsqueeze(batch_dim), hx
    if hx is not None and hx.dim() != 3:
        raise RuntimeError(
            f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
        )
    return input, hx


def _check_input_dtype(input: Tensor, weights) -> None:
    """nn.RNN's error for an input whose dtype is not the weights'."""
    if input.dtype != weights[0].dtype:
        raise ValueError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype "
            f"({weights[0].dtype}). Convert input: input.to({weights[0].dtype}), "
            f"or convert model: model.to({input.dtype})"
        )


def _check_hx_dtype(hx: Tensor, input: Tensor) -> None:
    if hx.dtype != input.dtype:
        raise ValueError(
            f"RNN hx dtype ({hx.dtype}) does not match input dtype "
            f"({input.dtype}). Convert it: hx.to({input.dtype})"
        )


def _resets_time_major(resets, input: Tensor, batch_first: bool) -> Tensor:
    """resets as the bool [T, B] the layers take, from the layout of `input`."""
    batched = input.dim() == 3
    T = input.shape[1 if batch_first and batched else 0]
    B = input.shape[0 if batch_first else 1] if batched else None
    layout = "[B, T]" if batch_first and batched else "[T, B]" if batched else "[T]"
    expected = (B, T) if batch_first and batched else (T, B) if batched else (T,)
    check_bool_layout("FusedRNN", "resets", resets, layout, expected, input, "input")
    if not batched:
        return resets.unsqueeze(1)
    return resets.t() if batch_first else resets


def forward_packed(
    rnn: "FusedRNN", packed: PackedSequence, hx: Optional[Tensor]
) -> Tuple[PackedSequence, Tensor]:
    """nn.RNN's forward on a PackedSequence: the sequences run as rows of a padded time-major
    batch in the packed (length-descending) order, each with its length, so a row stops at its
    own last step; the output is packed again and h_n put back in the caller's order."""
    data, batch_sizes, sorted_indices, unsorted_indices = packed
    max_batch = int(batch_sizes[0])
    hx = rnn._zero_state(max_batch, data) if hx is None else rnn.permute_hidden(hx, sorted_indices)
    data, hx, weights, autocast = rnn._autocast_args(data, hx)
    _check_input_dtype(data, weights)
    rnn.check_forward_args(data, hx, batch_sizes)
    _check_hx_dtype(hx, data)
    # Packed row p is (t, b) of the padded batch, in row-major order: one index_copy pads, one
    # index_select packs again (pad_packed_sequence / pack_padded_sequence copy step by step,
    # and cost more than the layer).
    T = batch_sizes.numel()
    mask = torch.arange(max_batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # [T, B]
    rows = mask.flatten().nonzero().squeeze(1).to(data.device)
    lengths = mask.sum(0).to(data.device)
    x = data.new_zeros(T * max_batch, data.shape[-1]).index_copy(0, rows, data)
    with torch.autocast(data.device.type, enabled=False) if autocast else nullcontext():
        y, h_n = rnn._run_layers(x.view(T, max_batch, -1), hx, weights, None, lengths)
    out = y.reshape(T * max_batch, -1).index_select(0, rows)
    return (
        PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices),
        rnn.permute_hidden(h_n, unsorted_indices),
    )


def _autocast_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """What autocast does to an argument of a lower-precision op: floating tensors other than
    float64 are cast (differentiably) to the autocast dtype; the rest pass unchanged."""
    if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def swap_rnn(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Turns, in place, every torch.nn.RNN inside `model` (or `model` itself) into a FusedRNN,
    and returns `model`.

    The module objects stay the same and only change class: the parameters (so an optimizer
    built before swapping keeps working), requires_grad flags, parametrizations, forward and
    backward hooks, training mode, device and dtype are all kept.
    """
    check_backend_name(backend, "swap_rnn")
    for module in model.modules():
        if isinstance(module, nn.RNN) and not isinstance(module, FusedRNN):
            module.__class__ = _fused_class_for(type(module))
            module.backend = backend
    return model


def _fused_class_for(cls: type) -> type:
    """FusedRNN for nn.RNN. For a subclass of nn.RNN made by torch.nn.utils.parametrize
    (it holds the parametrized weights as properties), the same subclass of FusedRNN."""
    if cls is nn.RNN:
        return FusedRNN
    if cls.__bases__ == (nn.RNN,) and cls.__name__.startswith("Parametrized"):
        members = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        return type(f"Parametrized{FusedRNN.__name__}", (FusedRNN,), members)
    raise TypeError(
        f"swap_rnn: cannot swap {cls.__name__}, a subclass of torch.nn.RNN whose "
        f"forward may differ; build a FusedRNN with FusedRNN.from_rnn(module) instead"
    )

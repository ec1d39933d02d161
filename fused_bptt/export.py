"""ONNX export of FusedRNN: the graph is ONNX's standard `RNN` operator, with either exporter.

`torch.onnx.export(model, args, f)` on a model that holds a FusedRNN needs nothing extra from the
user. While an ONNX export traces the model, FusedRNN.forward hands over to `onnx_forward`, which
never reaches the fused op (an ONNX runtime has no `fused_bptt::rnn_forward`):

- TorchScript exporter (`dynamo=False`): nn.RNN's own forward, which that exporter translates into
  one ONNX `RNN` node per layer (its symbolic for aten::rnn_tanh / aten::rnn_relu).
- dynamo exporter (`dynamo=True`, the default): one ONNX `RNN` node per layer, written here with
  `torch.onnx.ops.symbolic_multi_out`. nn.RNN's forward is no use there: that exporter unrolls
  aten::rnn_tanh over the traced length, so the model only runs at the T it was traced with.

Layer l of an RNN with D directions (D = 2 when bidirectional), time-major x [T, B, I_l]:

    W  [D, H, I_l]  weight_ih_l{l}{_reverse}          R [D, H, H]  weight_hh_l{l}{_reverse}
    B  [D, 2H]      cat(bias_ih, bias_hh) per direction (omitted when bias=False)
    initial_h [D, B, H]  hx[l*D:(l+1)*D] (omitted without hx: ONNX starts from zeros, as nn.RNN)
    Y [T, D, B, H] -> next layer's input [T, B, D*H];  Y_h [D, B, H] -> h_n[l*D:(l+1)*D]

ONNX's RNN computes H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb), nn.RNN's recurrence exactly, and
its reverse direction reads the sequence from the end, as nn.RNN's does.

Variable lengths (padded input with `lengths`, int64 [B]; or a PackedSequence, TorchScript
exporter only) become RNN's optional input `sequence_lens` (int32 [B], the same for every layer
and direction). onnxruntime then stops row b after lengths[b] steps, writes zeros to Y past it,
returns each row's own last state as Y_h and starts the reverse direction at each row's own last
step: nn.RNN's result on the packed input (tests/test_onnx.py checks all four). The ONNX spec
leaves Y past the length and the reverse direction's start unsaid, and onnx's own reference
evaluator (onnx 1.23.2) ignores sequence_lens: the model needs a runtime that implements it.

- TorchScript exporter: padded input with lengths goes through pack_padded_sequence
  (enforce_sorted=False), nn.RNN's forward and pad_packed_sequence, which that exporter turns
  into the RNN nodes with sequence_lens, the rows sorted by length before them and put back after
  (TopK, Gather): the graph of nn.RNN's own export of packed input.
- dynamo exporter: lengths cast to int32 (one Cast node), fed to each RNN node. A PackedSequence
  cannot cross this exporter: torch.export fails on nn.RNN's packed forward (its batch size is
  read from the data), and the exporter has no translation for aten::_pack_padded_sequence.

`resets` (a state reset inside a sequence) has no counterpart in the RNN op: FusedRNN refuses to
export it.

Nothing here changes global state: the checks read torch's export flags, the graph is written
through the public torch.onnx.ops API, and no translation table or exporter registry is touched.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._checks import check_boundaries


def onnx_export_active() -> bool:
    """True while torch.onnx.export traces the model (either exporter).

    The cheap checks come first: `torch.onnx` is imported lazily by torch and costs ~20 ms to
    import, which an eager forward (no tracing, no torch.export) never pays. A model called eagerly
    while an export runs (e.g. to compare outputs) keeps the fused kernels.
    """
    return (torch.jit.is_tracing() or _torch_is_exporting()) and _in_onnx_export()


# torch.compiler.is_exporting is newer than the oldest torch the package accepts (pyproject); on a
# torch without it the dynamo exporter cannot take the path below anyway (no torch.onnx.ops).
_torch_is_exporting = getattr(torch.compiler, "is_exporting", None) or (lambda: False)


@torch.compiler.assume_constant_result
def _in_onnx_export() -> bool:
    # When torch.export(strict=False) fails, the dynamo exporter retries with strict=True, where
    # TorchDynamo replaces torch.onnx.is_in_onnx_export() by a constant False; marked constant,
    # this function is run once at trace time instead and returns the real flag. The retry then
    # fails too (TorchDynamo does not trace torch.onnx.ops), and the exporter reports the first
    # error, the one that says what went wrong; unmarked, the retry would put the fused op into
    # the graph and fail later with "No ONNX function found for fused_bptt.rnn_forward".
    return torch.onnx.is_in_onnx_export()


def onnx_forward(
    rnn: nn.RNN, input, hx: Optional[Tensor] = None, lengths: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """FusedRNN.forward while an ONNX export traces it: same inputs, outputs and checks."""
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError(
                "FusedRNN: lengths applies to padded tensor input; a PackedSequence carries its "
                "own lengths (pass lengths=None)"
            )
        if torch.jit.is_tracing():
            # nn.RNN's own export of packed input: pack_padded_sequence, the RNN and
            # pad_packed_sequence become one ONNX RNN per layer with sequence_lens.
            return nn.RNN.forward(rnn, input, hx)
        raise NotImplementedError(
            "ONNX export of FusedRNN with the dynamo exporter does not take a PackedSequence "
            "(nor does nn.RNN's: torch.export fails on the packed path, and the exporter has no "
            "translation for pack_padded_sequence); pass the padded input and its lengths "
            "instead, rnn(x, hx, lengths=lengths), which exports as ONNX RNN's sequence_lens, "
            "or export with dynamo=False"
        )
    if not torch.jit.is_tracing():
        return _rnn_through_onnx_op(rnn, input, hx, lengths)
    if lengths is None:
        return nn.RNN.forward(rnn, input, hx)
    return _rnn_through_packing(rnn, input, hx, lengths)


def _rnn_through_packing(
    rnn: nn.RNN, input: Tensor, hx: Optional[Tensor], lengths: Tensor
) -> Tuple[Tensor, Tensor]:
    """Padded input with lengths under the TorchScript exporter: the packed input nn.RNN exports
    (its graph sorts the rows by length and puts them back: TopK and Gather around the RNNs)."""
    input, hx, is_batched = _checked_batched(rnn, input, hx, lengths)
    packed = pack_padded_sequence(input, lengths, batch_first=rnn.batch_first, enforce_sorted=False)
    output, h_n = nn.RNN.forward(rnn, packed, hx)
    output, _ = pad_packed_sequence(
        output, batch_first=rnn.batch_first, total_length=input.shape[int(rnn.batch_first)]
    )
    if not is_batched:
        output = output.squeeze(0 if rnn.batch_first else 1)
        h_n = h_n.squeeze(1)
    return output, h_n


def _checked_batched(
    rnn: nn.RNN, input: Tensor, hx: Optional[Tensor], lengths: Optional[Tensor]
) -> Tuple[Tensor, Optional[Tensor], bool]:
    """nn.RNN's checks and errors (FusedRNN's for lengths, without reading its values, which
    are not known while tracing); unbatched input as a batch of one. Returns (input, hx,
    whether input was batched)."""
    if input.dim() not in (2, 3):
        raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
    is_batched = input.dim() == 3
    batch_dim = 0 if rnn.batch_first else 1
    if not is_batched:
        input = input.unsqueeze(batch_dim)
        if hx is not None:
            if hx.dim() != 2:
                raise RuntimeError(
                    f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                )
            hx = hx.unsqueeze(1)
    elif hx is not None and hx.dim() != 3:
        raise RuntimeError(
            f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
        )
    if hx is None:
        rnn.check_input(input, None)
    else:
        rnn.check_forward_args(input, hx, None)
        if hx.dtype != input.dtype:
            raise ValueError(
                f"RNN hx dtype ({hx.dtype}) does not match input dtype "
                f"({input.dtype}). Convert it: hx.to({input.dtype})"
            )
    if lengths is not None:
        check_boundaries(
            input.transpose(0, 1) if rnn.batch_first else input, None, lengths, values=False
        )
    return input, hx, is_batched


def _rnn_through_onnx_op(
    rnn: nn.RNN, input: Tensor, hx: Optional[Tensor], lengths: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    if not hasattr(torch.onnx, "ops"):
        raise RuntimeError(
            f"exporting FusedRNN with the dynamo exporter needs torch >= 2.8 (torch.onnx.ops), "
            f"but this is torch {torch.__version__}; upgrade torch or pass dynamo=False to "
            f"torch.onnx.export"
        )
    if rnn.training and rnn.dropout > 0 and rnn.num_layers > 1:
        # ONNX RNN has no dropout between layers: exporting it would silently drop it.
        raise RuntimeError(
            f"FusedRNN has dropout={rnn.dropout} between layers and is in training mode, which "
            f"ONNX RNN cannot express; call model.eval() before torch.onnx.export"
        )
    input, hx, is_batched = _checked_batched(rnn, input, hx, lengths)
    batch_dim = 0 if rnn.batch_first else 1
    # ONNX RNN's sequence_lens is int32 [B]; every layer and direction reads the same one.
    sequence_lens = None if lengths is None else lengths.to(torch.int32)

    x = input.transpose(0, 1) if rnn.batch_first else input
    num_directions = 2 if rnn.bidirectional else 1
    seq_len, batch = x.shape[0], x.shape[1]
    hidden = rnn.hidden_size
    finals = []
    for layer in range(rnn.num_layers):
        first = layer * num_directions
        params = [
            [getattr(rnn, name) for name in rnn._all_weights[first + d]]
            for d in range(num_directions)
        ]
        weight = torch.stack([p[0] for p in params])
        recurrence = torch.stack([p[1] for p in params])
        bias = torch.stack([torch.cat([p[2], p[3]]) for p in params]) if rnn.bias else None
        initial_h = None if hx is None else hx[first : first + num_directions]
        y, h_last = torch.onnx.ops.symbolic_multi_out(
            "RNN",
            # X, W, R, B, sequence_lens, initial_h; None is an omitted optional input.
            [x, weight, recurrence, bias, sequence_lens, initial_h],
            {
                "activations": ["Relu" if rnn.nonlinearity == "relu" else "Tanh"] * num_directions,
                "direction": "bidirectional" if rnn.bidirectional else "forward",
                "hidden_size": hidden,
            },
            dtypes=[x.dtype, x.dtype],
            shapes=[[seq_len, num_directions, batch, hidden], [num_directions, batch, hidden]],
        )
        # [T, D, B, H] -> [T, B, D*H]: the directions side by side, as nn.RNN concatenates them.
        x = y.squeeze(1) if num_directions == 1 else y.transpose(1, 2).flatten(2)
        finals.append(h_last)
    h_n = torch.cat(finals) if len(finals) > 1 else finals[0]
    output = x.transpose(0, 1) if rnn.batch_first else x
    if not is_batched:
        output = output.squeeze(batch_dim)
        h_n = h_n.squeeze(1)
    return output, h_n

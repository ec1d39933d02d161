"""ONNX export of FusedRNN with both exporters, run in onnxruntime against torch.nn.RNN.

Each exported model is traced at one (T, B) and run at others: the graph must hold ONNX's standard
`RNN` op (one per layer, default domain) and no fused_bptt op, which no ONNX runtime has.
"""

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fused_bptt import FusedRNN, RNNWithHead

INPUT, HIDDEN = 3, 6
TRACE_SHAPE = (6, 3)  # (T, B) the model is exported with
RUN_SHAPES = [(6, 3), (11, 1), (2, 4)]  # (T, B) it is run at
ATOL = 1e-5  # float32, onnxruntime against nn.RNN

# (num_layers, bidirectional, batch_first, nonlinearity, bias, with hx): every value of every
# option, and 1-3 layers both ways, in few exports (a dynamo export takes about a second).
CONFIGS = [
    (1, False, False, "tanh", True, False),
    (1, True, True, "relu", False, True),
    (2, True, False, "tanh", True, True),
    (2, False, True, "relu", True, False),
    (3, True, True, "tanh", False, False),
    (3, False, False, "relu", False, True),
]
EXPORTERS = ["dynamo", "torchscript"]


def _config_id(c):
    layers, bidir, batch_first, nl, bias, with_hx = c
    return (
        f"L{layers}-{'bi' if bidir else 'uni'}-{'bf' if batch_first else 'tm'}-{nl}-"
        f"{'bias' if bias else 'nobias'}-{'hx' if with_hx else 'nohx'}"
    )


def _pair(layers, bidir, batch_first, nl, bias, seed=0):
    torch.manual_seed(seed)
    ref = nn.RNN(INPUT, HIDDEN, layers, nl, bias, batch_first, bidirectional=bidir).eval()
    return ref, FusedRNN.from_rnn(ref).eval()


def _inputs(rnn, T, B, with_hx, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, INPUT) if rnn.batch_first else (T, B, INPUT), generator=g)
    if not with_hx:
        return (x,)
    directions = 2 if rnn.bidirectional else 1
    return x, torch.randn(rnn.num_layers * directions, B, HIDDEN, generator=g)


def _export(model, args, path, exporter, batch_first=False, dynamic=True):
    """torch.onnx.export as a user calls it, T and B dynamic; returns the loaded ModelProto."""
    names = ["x", "hx"][: len(args)]
    x_axes = {0: "B", 1: "T"} if batch_first else {0: "T", 1: "B"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and says so, and warns that an RNN without h0
        # may fail at another batch size (the runs at other B below show this one does not).
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {name: torch.export.Dim(name) for name in ("T", "B")}
            shapes = ({axis: dims[name] for axis, name in x_axes.items()}, {1: dims["B"]})
            torch.onnx.export(
                model,
                args,
                path,
                dynamo=True,
                input_names=names,
                verbose=False,
                dynamic_shapes=shapes[: len(args)] if dynamic else None,
            )
        else:
            axes = {"x": x_axes, "hx": {1: "B"}}
            torch.onnx.export(
                model,
                args,
                path,
                dynamo=False,
                input_names=names,
                output_names=["y", "h_n"],
                dynamic_axes={n: axes[n] for n in names} if dynamic else None,
            )
    return onnx.load(path)


def _run(proto, args):
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)


def _assert_standard_rnn_graph(proto, layers):
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("RNN") == layers, ops
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, [
        (n.op_type, n.domain) for n in proto.graph.node if n.domain not in ("", "ai.onnx")
    ]
    assert not {"Loop", "Scan"} & set(ops), ops
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_export_runs_in_onnxruntime_like_nn_rnn(config, exporter, tmp_path):
    layers, bidir, batch_first, nl, bias, with_hx = config
    ref, fused = _pair(layers, bidir, batch_first, nl, bias)
    proto = _export(
        fused,
        _inputs(fused, *TRACE_SHAPE, with_hx, seed=1),
        tmp_path / "rnn.onnx",
        exporter,
        batch_first,
    )
    _assert_standard_rnn_graph(proto, layers)
    rnn_nodes = [n for n in proto.graph.node if n.op_type == "RNN"]
    activations = {
        a.decode() for n in rnn_nodes for a in onnx.helper.get_node_attr_value(n, "activations")
    }
    assert activations == {nl.capitalize()}
    for T, B in RUN_SHAPES:
        args = _inputs(fused, T, B, with_hx, seed=10 * T + B)
        y, h_n = _run(proto, args)
        with torch.no_grad():
            y_ref, h_n_ref = ref(*args)
        np.testing.assert_allclose(
            y, y_ref.numpy(), rtol=0, atol=ATOL, err_msg=f"output at T={T}, B={B}"
        )
        np.testing.assert_allclose(
            h_n, h_n_ref.numpy(), rtol=0, atol=ATOL, err_msg=f"h_n at T={T}, B={B}"
        )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_of_a_model_holding_fusedrnn_unbatched_input(exporter, tmp_path):
    """A FusedRNN inside a larger model, with unbatched [T, I] input."""
    ref_rnn, fused_rnn = _pair(2, True, False, "tanh", True)
    head = nn.Linear(2 * HIDDEN, 2)
    ref, model = RNNWithHead(ref_rnn, head).eval(), RNNWithHead(fused_rnn, head).eval()
    x = torch.randn(TRACE_SHAPE[0], INPUT)
    proto = _export(model, (x,), tmp_path / "model.onnx", exporter, dynamic=False)
    _assert_standard_rnn_graph(proto, 2)
    pred, h_n = _run(proto, (x,))
    with torch.no_grad():
        pred_ref, h_n_ref = ref(x)
    assert pred.shape == tuple(pred_ref.shape) and h_n.shape == tuple(h_n_ref.shape)
    np.testing.assert_allclose(pred, pred_ref.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(h_n, h_n_ref.numpy(), rtol=0, atol=ATOL)


class _PacksItsInput(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        lengths = torch.full((x.shape[1],), x.shape[0], dtype=torch.int64)
        return self.rnn(pack_padded_sequence(x, lengths))[1]


def _error_chain(excinfo):
    """The messages of an exception and its causes (the dynamo exporter wraps what it catches)."""
    messages, error = [], excinfo.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_with_packed_input_says_what_to_do(exporter, tmp_path):
    model = _PacksItsInput(FusedRNN(INPUT, HIDDEN)).eval()
    with pytest.raises(Exception) as excinfo:
        _export(
            model,
            (torch.randn(*TRACE_SHAPE, INPUT),),
            tmp_path / "packed.onnx",
            exporter,
            dynamic=False,
        )
    assert "ONNX export of FusedRNN does not take a PackedSequence" in _error_chain(excinfo)


def test_dynamo_export_in_training_mode_with_dropout_says_what_to_do(tmp_path):
    model = FusedRNN(INPUT, HIDDEN, num_layers=2, dropout=0.5).train()
    with pytest.raises(Exception) as excinfo:
        _export(
            model,
            (torch.randn(*TRACE_SHAPE, INPUT),),
            tmp_path / "dropout.onnx",
            "dynamo",
            dynamic=False,
        )
    assert "call model.eval() before torch.onnx.export" in _error_chain(excinfo)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_forward_outside_export_keeps_the_fused_kernels(monkeypatch):
    """The export path is taken only inside torch.onnx.export: not in eager, jit tracing or a
    plain torch.export."""
    import fused_bptt.module as module

    def no_export_path(*args):
        raise AssertionError("FusedRNN took the ONNX export path outside an export")

    monkeypatch.setattr(module, "onnx_forward", no_export_path)
    fused = FusedRNN(INPUT, HIDDEN)
    x = torch.randn(*TRACE_SHAPE, INPUT)
    fused(x)
    torch.jit.trace(fused, (x,), check_trace=False)
    program = torch.export.export(fused, (x,))
    assert any("fused_bptt" in str(node.target) for node in program.graph.nodes)

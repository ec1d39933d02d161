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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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


def _export(model, args, path, exporter, batch_first=False, dynamic=True, names=("x", "hx")):
    """torch.onnx.export as a user calls it, T and B dynamic; returns the loaded ModelProto.
    names: the model's inputs in order (x, hx, lengths or resets)."""
    names = list(names[: len(args)])
    x_axes = {0: "B", 1: "T"} if batch_first else {0: "T", 1: "B"}
    axes = {"x": x_axes, "hx": {1: "B"}, "lengths": {0: "B"}, "resets": {}}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and says so, and warns that an RNN without h0
        # may fail at another batch size (the runs at other B below show this one does not).
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {name: torch.export.Dim(name) for name in ("T", "B")}
            shapes = tuple({a: dims[d] for a, d in axes[n].items()} for n in names)
            torch.onnx.export(
                model,
                args,
                path,
                dynamo=True,
                input_names=names,
                verbose=False,
                dynamic_shapes=shapes if dynamic else None,
            )
        else:
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


def _exported_pair(config, exporter, tmp_path, with_lengths=False):
    """(nn.RNN, its FusedRNN, the FusedRNN exported, T and B dynamic) for a CONFIGS or
    LENGTH_CONFIGS entry; with_lengths: exported inside _WithLengths, on padded input."""
    layers, bidir, batch_first, nl, bias, with_hx = config
    ref, fused = _pair(layers, bidir, batch_first, nl, bias)
    if with_lengths:
        args = _length_inputs(fused, 6, [4, 6, 1], with_hx, seed=1)
        model, names = _WithLengths(fused).eval(), ("x", "lengths", "hx")
    else:
        args = _inputs(fused, *TRACE_SHAPE, with_hx, seed=1)
        model, names = fused, ("x", "hx")
    proto = _export(model, args, tmp_path / "rnn.onnx", exporter, batch_first, names=names)
    return ref, fused, proto


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
    layers, _, _, nl, _, with_hx = config
    ref, fused, proto = _exported_pair(config, exporter, tmp_path)
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


# Variable lengths. (num_layers, bidirectional, batch_first, nonlinearity, bias, with hx)
LENGTH_CONFIGS = [
    (1, True, False, "tanh", True, False),
    (2, True, True, "relu", False, True),
    (3, False, False, "tanh", True, True),
    (2, False, True, "tanh", True, False),
]
# (T, lengths) the models are run at: unsorted, the extremes 1 and T, max(lengths) < T, B = 1.
LENGTH_RUNS = [(6, [2, 6, 1]), (11, [7]), (2, [1, 2, 2, 1]), (9, [3, 8, 8, 1, 5])]


class _WithLengths(nn.Module):
    """Padded input and its lengths: the form that exports with either exporter."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths, hx=None):
        return self.rnn(x, hx, lengths=lengths)


class _PacksItsInput(nn.Module):
    """The usual nn.RNN idiom: pack, run, pad again to the input's length."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths, hx=None):
        bf = self.rnn.batch_first
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        y, h_n = self.rnn(packed, hx)
        y, _ = pad_packed_sequence(y, batch_first=bf, total_length=x.shape[int(bf)])
        return y, h_n


def _length_inputs(rnn, T, lengths, with_hx, seed):
    """(x, lengths[, hx]); x is random at the padded steps too, so a runtime that read them (or
    ran the reverse direction from T - 1 instead of each sequence's last step) would differ."""
    x, *hx = _inputs(rnn, T, len(lengths), with_hx, seed)
    return (x, torch.tensor(lengths), *hx)


def _rnn_on_packed(ref, x, lengths, hx=None):
    """nn.RNN on the PackedSequence of (x, lengths), padded again to T: the expected result."""
    with torch.no_grad():
        return _PacksItsInput(ref)(x, lengths, hx)


def _assert_rnn_nodes_take_sequence_lens(proto):
    rnn_nodes = [n for n in proto.graph.node if n.op_type == "RNN"]
    # Inputs X, W, R, B, sequence_lens, initial_h: an omitted optional input is "".
    assert all(len(n.input) > 4 and n.input[4] for n in rnn_nodes), [
        list(n.input) for n in rnn_nodes
    ]


def _assert_runs_like_nn_rnn_on_packed_input(proto, layers, ref, fused, with_hx):
    """The graph is standard, each RNN node takes sequence_lens, and onnxruntime gives nn.RNN's
    result on the packed input at each of LENGTH_RUNS."""
    _assert_standard_rnn_graph(proto, layers)
    _assert_rnn_nodes_take_sequence_lens(proto)
    for T, lengths in LENGTH_RUNS:
        args = _length_inputs(fused, T, lengths, with_hx, seed=10 * T + len(lengths))
        y, h_n = _run(proto, args)
        y_ref, h_n_ref = _rnn_on_packed(ref, *args)
        where = f"T={T}, lengths={lengths}"
        np.testing.assert_allclose(y, y_ref.numpy(), rtol=0, atol=ATOL, err_msg=f"output, {where}")
        np.testing.assert_allclose(h_n, h_n_ref.numpy(), rtol=0, atol=ATOL, err_msg=f"h_n, {where}")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("config", LENGTH_CONFIGS, ids=_config_id)
def test_export_with_lengths_runs_like_nn_rnn_on_packed_input(config, exporter, tmp_path):
    layers, _, _, _, _, with_hx = config
    ref, fused, proto = _exported_pair(config, exporter, tmp_path, with_lengths=True)
    _assert_runs_like_nn_rnn_on_packed_input(proto, layers, ref, fused, with_hx)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_with_lengths_unbatched_input(exporter, tmp_path):
    ref, fused = _pair(2, True, False, "tanh", True)
    x, lengths = torch.randn(7, INPUT), torch.tensor([4])
    proto = _export(
        _WithLengths(fused).eval(),
        (x, lengths),
        tmp_path / "unbatched.onnx",
        exporter,
        dynamic=False,
        names=("x", "lengths"),
    )
    _assert_rnn_nodes_take_sequence_lens(proto)
    y, h_n = _run(proto, (x, lengths))
    y_ref, h_n_ref = _rnn_on_packed(ref, x.unsqueeze(1), lengths)
    np.testing.assert_allclose(y, y_ref.squeeze(1).numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(h_n, h_n_ref.squeeze(1).numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
def test_packed_input_exports_as_nn_rnn_does_with_torchscript(with_hx, tmp_path):
    """pack_padded_sequence -> FusedRNN -> pad_packed_sequence gives nn.RNN's own export."""
    ref, fused = _pair(2, True, True, "tanh", True)
    trace_args = _length_inputs(fused, 6, [4, 6, 1], with_hx, seed=1)
    names = ("x", "lengths", "hx")
    export = [
        _export(
            _PacksItsInput(rnn).eval(),
            trace_args,
            tmp_path / f"{i}.onnx",
            "torchscript",
            batch_first=True,
            names=names,
        )
        for i, rnn in enumerate((fused, ref))
    ]
    proto, proto_ref = export
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in proto_ref.graph.node]
    _assert_runs_like_nn_rnn_on_packed_input(proto, 2, ref, fused, with_hx)


def _export_error(model, args, exporter, tmp_path, names, raises=Exception):
    """Exports model (T and B fixed) where the export must fail with `raises`; returns the
    messages of the error and its causes (the dynamo exporter wraps what it catches)."""
    with pytest.raises(raises) as excinfo:
        _export(model, args, tmp_path / "fails.onnx", exporter, dynamic=False, names=names)
    messages, error = [], excinfo.value
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


class _PacksAndPassesLengths(_PacksItsInput):
    def forward(self, x, lengths):
        return self.rnn(pack_padded_sequence(x, lengths), lengths=lengths)[1]


@pytest.mark.parametrize(
    "model_type, exporter, raises, message",
    [
        # torch.export cannot trace nn.RNN on a PackedSequence either: the error names the form
        # that exports.
        (_PacksItsInput, "dynamo", Exception, "rnn(x, hx, lengths=lengths)"),
        (
            _PacksAndPassesLengths,
            "torchscript",
            ValueError,
            "a PackedSequence carries its own lengths",
        ),
    ],
    ids=["packed-dynamo", "packed-and-lengths"],
)
def test_export_of_packed_input_says_what_to_do(model_type, exporter, raises, message, tmp_path):
    model = model_type(FusedRNN(INPUT, HIDDEN)).eval()
    args = (torch.randn(*TRACE_SHAPE, INPUT), torch.tensor([6, 4, 1]))
    assert message in _export_error(model, args, exporter, tmp_path, ("x", "lengths"), raises)


class _WithResets(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, resets):
        return self.rnn(x, resets=resets)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_with_resets_says_what_to_do(exporter, tmp_path):
    model = _WithResets(FusedRNN(INPUT, HIDDEN)).eval()
    resets = torch.zeros(*TRACE_SHAPE, dtype=torch.bool)
    resets[3, 1] = True
    args = (torch.randn(*TRACE_SHAPE, INPUT), resets)
    message = _export_error(model, args, exporter, tmp_path, ("x", "resets"))
    assert "ONNX export of FusedRNN does not take resets" in message


def test_dynamo_export_in_training_mode_with_dropout_says_what_to_do(tmp_path):
    model = FusedRNN(INPUT, HIDDEN, num_layers=2, dropout=0.5).train()
    message = _export_error(model, (torch.randn(*TRACE_SHAPE, INPUT),), "dynamo", tmp_path, ("x",))
    assert "call model.eval() before torch.onnx.export" in message


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


@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
def test_lengths_in_eager_mode_match_nn_rnn_on_packed_input(batch_first):
    """The form that exports, run eagerly: FusedRNN(x, hx, lengths=...) is nn.RNN's result on the
    PackedSequence, padded again to T (float64, kernels against nn.RNN)."""
    ref, fused = (m.double() for m in _pair(2, True, batch_first, "tanh", True))
    x, lengths, hx = _length_inputs(fused, 9, [3, 8, 9, 1, 5], True, seed=2)
    x, hx = x.double(), hx.double()
    y, h_n = fused(x, hx, lengths=lengths)
    y_ref, h_n_ref = _rnn_on_packed(ref, x, lengths, hx)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(h_n, h_n_ref, rtol=0, atol=1e-10)


def test_lengths_in_eager_mode_errors():
    fused = FusedRNN(INPUT, HIDDEN)
    x = torch.randn(*TRACE_SHAPE, INPUT)
    with pytest.raises(ValueError, match=r"lengths must lie in 1..T = 1..6, but got values from 0"):
        fused(x, lengths=torch.tensor([0, 6, 2]))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(3,\)"):
        fused(x, lengths=torch.tensor([6, 2]))
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 1]))
    with pytest.raises(ValueError, match="a PackedSequence carries its own lengths"):
        fused(packed, lengths=torch.tensor([6, 4, 1]))

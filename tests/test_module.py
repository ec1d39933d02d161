"""FusedRNN as a drop-in for torch.nn.RNN: numbers, parameters, state_dict, validation, dropout,
and the swap helper."""

import itertools

import pytest
import torch
from torch import nn

import fused_bptt
from conftest import assert_close, device_of
from fused_bptt import FusedRNN, swap_rnn

BACKENDS = [b for b in fused_bptt.available_backends()]
CONFIG_NAMES = ("num_layers", "bias", "batch_first", "bidirectional", "nonlinearity")
CONFIGS = list(
    itertools.product([1, 2], [True, False], [False, True], [False, True], ["tanh", "relu"])
)


def _config_id(c):
    layers, bias, batch_first, bidir, nl = c
    return (
        f"L{layers}-{'bias' if bias else 'nobias'}-{'bf' if batch_first else 'tm'}-"
        f"{'bi' if bidir else 'uni'}-{nl}"
    )


def _pair(dtype=torch.float64, device="cpu", backend="auto", seed=0, **config):
    torch.manual_seed(seed)
    ref = nn.RNN(dtype=dtype, device=device, **config)
    fused = FusedRNN.from_rnn(ref, backend=backend)
    return ref, fused


def _grads(module, x, h0, gy, ghn):
    x = x.detach().clone().requires_grad_()
    h0 = h0.detach().clone().requires_grad_()
    out, hn = module(x, h0)
    params = list(module.parameters())
    grads = torch.autograd.grad((out * gy).sum() + (hn * ghn).sum(), [x, h0] + params)
    return out, hn, grads


def _assert_matches_nn_rnn(ref, fused, x, h0, gy, ghn):
    """FusedRNN's output, h_n and the gradients of the loss sum(out * gy) + sum(h_n * ghn) for the
    input, hx and every parameter, against nn.RNN's with the same weights."""
    out_r, hn_r, g_r = _grads(ref, x, h0, gy, ghn)
    out_f, hn_f, g_f = _grads(fused, x, h0, gy, ghn)
    assert out_f.shape == out_r.shape and hn_f.shape == hn_r.shape
    assert_close(out_f, out_r, name="output")
    assert_close(hn_f, hn_r, name="h_n")
    names = ["input", "hx"] + [n for n, _ in ref.named_parameters()]
    assert len(g_f) == len(g_r) == len(names)
    for name, a, b in zip(names, g_f, g_r):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_matches_nn_rnn_float64(config, backend):
    layers, _, batch_first, bidir, _ = config
    device = device_of(backend)
    options = dict(zip(CONFIG_NAMES, config))
    ref, fused = _pair(torch.float64, device, backend, input_size=3, hidden_size=5, **options)
    T, B, D = 7, 4, 2 if bidir else 1
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    x = randn(B, T, 3) if batch_first else randn(T, B, 3)
    h0 = randn(layers * D, B, 5)
    gy = randn(*x.shape[:2], 5 * D)
    ghn = randn(layers * D, B, 5)
    _assert_matches_nn_rnn(ref, fused, x, h0, gy, ghn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_nn_rnn_float32(backend):
    device = device_of(backend)
    options = dict(input_size=16, hidden_size=32, num_layers=2, bidirectional=True)
    ref, fused = _pair(torch.float32, device, backend, **options)
    x = torch.randn(20, 6, 16, device=device)
    h0 = torch.zeros(4, 6, 32, device=device)
    gy, ghn = torch.randn(20, 6, 64, device=device), torch.randn(4, 6, 32, device=device)
    _assert_matches_nn_rnn(ref, fused, x, h0, gy, ghn)


def test_same_parameters_and_initialisation_as_nn_rnn():
    config = dict(input_size=4, hidden_size=6, num_layers=3, bidirectional=True, bias=True)
    torch.manual_seed(123)
    ref = nn.RNN(**config)
    torch.manual_seed(123)
    fused = FusedRNN(**config)
    assert isinstance(fused, nn.RNN)
    ref_params, fused_params = list(ref.named_parameters()), list(fused.named_parameters())
    assert [n for n, _ in fused_params] == [n for n, _ in ref_params]
    for (name, a), (_, b) in zip(fused_params, ref_params):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_state_dict_round_trips_both_ways():
    config = dict(input_size=3, hidden_size=4, num_layers=2, nonlinearity="relu")
    ref, fused = nn.RNN(**config), FusedRNN(**config)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3)
    assert_close(fused(x)[0], ref(x)[0], torch.float32)
    back = nn.RNN(**config)
    back.load_state_dict(FusedRNN.from_rnn(ref).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), ref.parameters()))


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(batch_first):
    ref, fused = _pair(input_size=3, hidden_size=4, num_layers=2, batch_first=batch_first)
    x, h0 = torch.randn(6, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    for args in ((x,), (x, h0)):
        (out_r, hn_r), (out_f, hn_f) = ref(*args), fused(*args)
        assert out_f.shape == out_r.shape == (6, 4) and hn_f.shape == hn_r.shape == (2, 4)
        assert_close(out_f, out_r)
        assert_close(hn_f, hn_r)


def test_validation_matches_nn_rnn():
    """Bad input raises the same error class with nn.RNN's message (expected vs got)."""
    ref, fused = _pair(torch.float32, input_size=3, hidden_size=4, num_layers=1)
    cases = [
        (torch.randn(5, 2, 4),),  # wrong input size
        (torch.randn(5, 2, 3, 1),),  # 4-D input
        (torch.randn(5, 2, 3), torch.randn(1, 3, 4)),  # hidden batch mismatch
        (torch.randn(5, 2, 3), torch.randn(2, 4)),  # 2-D hx for batched input
        (torch.randn(5, 3), torch.randn(1, 1, 4)),  # 3-D hx for unbatched input
        (torch.randn(5, 2, 3, dtype=torch.float64),),  # dtype mismatch
        (torch.randn(0, 2, 3),),  # no time steps
    ]
    for args in cases:
        with pytest.raises(Exception) as expected:
            ref(*args)
        with pytest.raises(type(expected.value)) as got:
            fused(*args)
        assert str(got.value) == str(expected.value)


def test_constructor_errors():
    with pytest.raises(ValueError, match="backend must be one of .* but got 'fast'"):
        FusedRNN(3, 4, backend="fast")
    with pytest.raises(ValueError):
        FusedRNN(3, 4, nonlinearity="sigmoid")


def test_dropout_between_layers_in_training():
    """Training: dropout on every layer's output but the last, drawn like F.dropout; eval: none."""
    fused = FusedRNN(3, 5, num_layers=3, dropout=0.5).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    torch.manual_seed(7)
    out, hn = fused(x)
    torch.manual_seed(7)
    h, finals = x, []
    for layer in range(3):
        p = [
            getattr(fused, f"{n}_l{layer}")
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]
        y = fused_bptt.reference.rnn_forward(h, torch.zeros(2, 5, dtype=x.dtype), *p)
        finals.append(y[-1])
        h = nn.functional.dropout(y, 0.5, training=True) if layer < 2 else y
    assert_close(out, h)
    assert_close(hn, torch.stack(finals))
    fused.eval()
    ref = nn.RNN(3, 5, num_layers=3, dropout=0.5).double().eval()
    ref.load_state_dict(fused.state_dict())
    assert_close(fused(x)[0], ref(x)[0])


def test_flatten_parameters_is_a_no_op_and_to_works():
    fused = FusedRNN(3, 4, num_layers=2)
    before = [p.data_ptr() for p in fused.parameters()]
    fused.flatten_parameters()
    assert [p.data_ptr() for p in fused.parameters()] == before
    fused = fused.double()
    assert fused(torch.randn(2, 1, 3, dtype=torch.float64))[0].dtype == torch.float64
    assert "backend='auto'" in repr(fused)


def test_swap_rnn_replaces_every_nn_rnn_with_same_weights():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.RNN(3, 8, num_layers=2, batch_first=True)
            self.blocks = nn.Sequential(nn.RNN(8, 4, bidirectional=True, batch_first=True))
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            h, _ = self.encoder(x)
            h, _ = self.blocks[0](h)
            return self.head(h)

    model = Model()
    x = torch.randn(2, 9, 3)
    expected = model(x)
    swapped = swap_rnn(model)
    assert swapped is model
    assert type(model.encoder) is FusedRNN and type(model.blocks[0]) is FusedRNN
    assert_close(model(x), expected, torch.float32)
    single = swap_rnn(nn.RNN(2, 3))
    assert type(single) is FusedRNN
    with pytest.raises(TypeError, match="expects a torch.nn.RNN, but got Linear"):
        FusedRNN.from_rnn(nn.Linear(2, 3))


def _spy_on_eager_path(monkeypatch):
    """A list that records, for each FusedRNN forward, whether _forward_eager answered it."""
    taken = []
    inner = FusedRNN._forward_eager

    def spy(self, input, hx):
        out = inner(self, input, hx)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(FusedRNN, "_forward_eager", spy)
    return taken


def _run_both_paths(monkeypatch, module, x, h0, grad_mode):
    """(out, h_n, gradients) of module(x, h0) through forward as it is, then with
    FusedRNN._forward_eager switched off (the general path); a grad_mode of "inference" or
    "no_grad" runs the forward only."""
    import fused_bptt.module as module_py

    results = []
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(module_py, "_plain_eager", lambda: False)
        torch.manual_seed(7)  # the same dropout masks on both paths
        xs = x.detach().clone().requires_grad_(grad_mode == "grad")
        hs = None if h0 is None else h0.detach().clone().requires_grad_(grad_mode == "grad")
        if grad_mode == "grad":
            out, hn = module(xs, hs)
            inputs = [xs] + ([] if hs is None else [hs]) + list(module.parameters())
            grads = torch.autograd.grad((out * out.detach()).sum() + (hn * 3).sum(), inputs)
        else:
            with torch.inference_mode() if grad_mode == "inference" else torch.no_grad():
                out, hn = module(xs, hs)
            grads = ()
        results.append((out, hn, grads))
    return results


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad", "inference"])
@pytest.mark.parametrize(
    "config", list(itertools.product([True, False], [False, True], ["tanh", "relu"]))
)
@pytest.mark.parametrize("hx", [True, False], ids=["hx", "no_hx"])
@pytest.mark.parametrize("layers", [1, 2, 3], ids=["L1", "L2", "L3-dropout"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_eager_fast_path_gives_the_general_paths_bits(
    monkeypatch, bidirectional, layers, config, hx, grad_mode
):
    """Plain eager: forward takes _forward_eager, and its output, h_n and gradients are the
    general path's, bit for bit (float32: any difference would show); with three layers in
    training mode, dropout between them, the same masks."""
    bias, batch_first, nonlinearity = config
    torch.manual_seed(0)
    fused = FusedRNN(
        3,
        5,
        num_layers=layers,
        bidirectional=bidirectional,
        bias=bias,
        batch_first=batch_first,
        nonlinearity=nonlinearity,
        dropout=0.5 if layers == 3 else 0.0,
        backend="cpp",
    )
    x = torch.randn(4, 6, 3)
    batch = x.shape[0 if batch_first else 1]
    states = layers * (2 if bidirectional else 1)
    h0 = torch.randn(states, batch, 5) if hx else None
    fused(x)  # the first call of a (backend, device, dtype) resolves it on the general path
    taken = _spy_on_eager_path(monkeypatch)
    (out_e, hn_e, g_e), (out_g, hn_g, g_g) = _run_both_paths(monkeypatch, fused, x, h0, grad_mode)
    assert taken == [True], "the eager path did not answer the common case"
    assert out_e.shape == out_g.shape and hn_e.shape == hn_g.shape == (states, batch, 5)
    assert torch.equal(out_e, out_g) and torch.equal(hn_e, hn_g)
    assert out_e.is_inference() == out_g.is_inference() == (grad_mode == "inference")
    assert out_e.requires_grad == out_g.requires_grad == (grad_mode == "grad")
    assert len(g_e) == len(g_g)
    for a, b in zip(g_e, g_g):
        assert torch.equal(a, b)
    if layers == 3:  # dropout was applied: the output differs from an eval-mode run
        with torch.no_grad():
            assert not torch.equal(fused.eval()(x, h0)[0], out_e)


def test_eager_fast_path_declines_what_it_does_not_cover(monkeypatch):
    """Every case outside the fast path's plan goes to the general path (whose own tests cover
    it), and bad input gets nn.RNN's errors from there: the fast path raises nothing."""
    taken = _spy_on_eager_path(monkeypatch)
    torch.manual_seed(0)
    fused, x, h0 = FusedRNN(3, 5, backend="cpp"), torch.randn(4, 2, 3), torch.randn(1, 2, 5)
    fused(x)  # resolves (cpp, cpu, float32)
    taken.clear()
    declined = {
        "hx of one layer for two": lambda: FusedRNN(3, 5, num_layers=2, backend="cpp")(x, h0),
        "hx of one direction for two": lambda: FusedRNN(3, 5, bidirectional=True)(x, h0),
        "reference backend": lambda: FusedRNN(3, 5, backend="reference")(x),
        "unbatched": lambda: fused(x[:, 0]),
        "float64 input": lambda: fused(x.double()),
        "hx of another batch": lambda: fused(x, torch.randn(1, 3, 5)),
        "hx of another dtype": lambda: fused(x, h0.double()),
        "2-D hx": lambda: fused(x, h0[0]),
        "no steps": lambda: fused(x[:0]),
        "input size": lambda: fused(torch.randn(4, 2, 4)),
        "autocast": lambda: _under(torch.autocast("cpu", dtype=torch.bfloat16), fused, x),
        "saved-tensor hooks": lambda: _under(
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), fused, x
        ),
        "jit.trace": lambda: torch.jit.trace(fused, (x,), check_trace=False),
        "torch.func": lambda: torch.func.vmap(lambda xi: fused(xi)[0], in_dims=1)(x),
        "resets": lambda: fused(x, resets=torch.zeros(4, 2, dtype=torch.bool)),
        "lengths": lambda: fused(x, lengths=torch.tensor([4, 2])),
    }
    for name, call in declined.items():
        taken.clear()
        try:
            call()
        except (RuntimeError, ValueError):
            pass  # nn.RNN's error, from the general path (test_validation_matches_nn_rnn)
        assert True not in taken, f"{name}: the fast path answered"
    taken.clear()
    fused(x, h0)
    assert taken == [True]


def _under(context, module, x):
    with context:
        return module(x)


@pytest.mark.parametrize("batch_first", [False, True])
def test_eager_fast_path_errors_are_the_general_paths(monkeypatch, batch_first):
    """Input that passes the fast path's own checks but not the op's (dtypes, no steps): the op's
    error sends it to the general path, which raises its own error (nn.RNN's where nn.RNN has
    one: test_validation_matches_nn_rnn), class and message alike."""
    import fused_bptt.module as module_py

    fused = FusedRNN(3, 4, batch_first=batch_first)
    for dtype in (torch.float32, torch.float64):  # both dtypes resolved: the fast path runs
        FusedRNN(3, 4, dtype=dtype)(torch.randn(2, 1, 3, dtype=dtype))
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    cases = {
        "float64 input": (x.double(),),
        "float64 input and hx": (x.double(), torch.randn(1, 2, 4, dtype=torch.float64)),
        "float64 hx": (x, torch.randn(1, 2, 4, dtype=torch.float64)),
        "no steps": (x[:, :0] if batch_first else x[:0],),
    }
    for name, args in cases.items():
        with monkeypatch.context() as general:
            general.setattr(module_py, "_plain_eager", lambda: False)
            with pytest.raises(Exception) as expected:
                fused(*args)
        taken = _spy_on_eager_path(monkeypatch)
        with pytest.raises(type(expected.value)) as got:
            fused(*args)
        assert str(got.value) == str(expected.value), name
        assert taken == [False], f"{name}: {taken}"

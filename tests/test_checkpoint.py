"""checkpointed_bptt: the gradients of one unchunked forward and backward (float64, 1e-9) for
nn.RNN, FusedRNN, nn.GRU and nn.LSTM at every segment length, only one segment's activations
alive at a time, dropout replayed, and the errors for bad input.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_bptt import FusedRNN, RNNWithHead, available_backends, checkpointed_bptt

TOL = dict(rtol=1e-9, atol=1e-9)
BACKENDS = [b for b in available_backends() if b != "reference"] + ["reference"]


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def make_model(kind, input_size=3, hidden_size=5, batch_first=False, seed=0, dropout=0.0):
    """An rnn of the given kind and a linear head, float64, as one (x, h) -> (pred, h_n) model."""
    torch.manual_seed(seed)
    common = dict(batch_first=batch_first, dtype=torch.float64)
    if kind == "gru":
        rnn = nn.GRU(input_size, hidden_size, **common)
    elif kind == "lstm":
        rnn = nn.LSTM(input_size, hidden_size, num_layers=2, **common)
    else:
        rnn = nn.RNN(input_size, hidden_size, num_layers=2, dropout=dropout, **common)
        if kind != "torch":
            rnn = FusedRNN.from_rnn(rnn, backend=kind)
    model = RNNWithHead(rnn, nn.Linear(hidden_size, 2, dtype=torch.float64))
    return model.to(device_of(kind))


def data(T=23, B=4, I=3, batch_first=False, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    target = torch.randn(T, B, 2, generator=g, dtype=torch.float64)
    if batch_first:
        x, target = x.transpose(0, 1), target.transpose(0, 1)
    return x.to(device), target.to(device)


def sum_mse(pred, target):
    return F.mse_loss(pred, target, reduction="sum")


def unchunked(model, x, target, loss_fn, segment, h0=None, time_dim=0):
    """The oracle: one forward over all T steps, the same per-segment loss terms summed, one
    backward. Returns the loss and the parameters' gradients."""
    model.zero_grad(set_to_none=True)
    pred, _ = model(x, h0)
    length = x.shape[time_dim]
    loss = sum(
        loss_fn(
            pred.narrow(time_dim, s, min(segment, length - s)),
            target.narrow(time_dim, s, min(segment, length - s)),
        )
        for s in range(0, length, segment)
    )
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def checkpointed(model, x, target, loss_fn, segment, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = checkpointed_bptt(model, x, target, loss_fn, segment=segment, **kwargs)
    return loss, [p.grad.clone() for p in model.parameters()]


KINDS = ["torch", "gru", "lstm"] + [pytest.param(b, id=f"fused-{b}") for b in BACKENDS]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("segment", [1, 4, 23, 50, None])
def test_gradients_equal_one_unchunked_backward(kind, segment):
    model = make_model(kind)
    device = next(model.parameters()).device
    x, target = data(device=device)
    effective = min(segment or round(math.sqrt(23)), 23)
    want_loss, want = unchunked(model, x, target, sum_mse, effective)
    loss, got = checkpointed(model, x, target, sum_mse, segment)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want_loss, **TOL)
    for name, g, w in zip([n for n, _ in model.named_parameters()], got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["torch", "lstm", pytest.param(BACKENDS[0], id="fused")])
def test_batch_first_h0_and_input_gradients(kind):
    """A given initial state and an input computed by an encoder: their gradients too."""
    model = make_model(kind, batch_first=True)
    device = next(model.parameters()).device
    raw, target = data(T=17, batch_first=True, device=device)
    encoder = nn.Linear(3, 3, dtype=torch.float64).to(device)
    shape = (2, 4, 5)
    h0 = tuple(
        torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        for _ in range(2 if kind == "lstm" else 1)
    )
    if kind != "lstm":
        h0 = h0[0]

    def grads_of(run):
        for t in h0 if isinstance(h0, tuple) else (h0,):
            t.grad = None
        encoder.zero_grad(set_to_none=True)
        loss, params = run(encoder(raw))
        return [
            loss,
            *params,
            encoder.weight.grad.clone(),
            *[t.grad.clone() for t in (h0 if isinstance(h0, tuple) else (h0,))],
        ]

    want = grads_of(lambda x: unchunked(model, x, target, sum_mse, 5, h0=h0, time_dim=1))
    got = grads_of(lambda x: checkpointed(model, x, target, sum_mse, 5, h0=h0, batch_first=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_a_plain_rnn_as_the_model_and_a_mean_loss():
    torch.manual_seed(0)
    rnn = nn.RNN(3, 5, dtype=torch.float64)
    x, _ = data(T=10)
    target = torch.randn(10, 4, 5, dtype=torch.float64)
    want_loss, want = unchunked(rnn, x, target, F.mse_loss, 3)
    loss, got = checkpointed(rnn, x, target, F.mse_loss, 3)
    torch.testing.assert_close(loss, want_loss, **TOL)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_dropout_masks_are_replayed_in_the_recomputation():
    """In training mode with dropout, the gradient is that of the segmented forward that ran:
    the same masks in the first pass and in the recomputation, drawn segment by segment."""
    model = make_model(BACKENDS[0], dropout=0.5).train()
    x, target = data(T=12)
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    h, loss = None, 0
    for s in range(0, 12, 5):  # segments of 5, 5, 2, state not detached
        pred, h = model(x[s : s + 5], h)
        loss = loss + sum_mse(pred, target[s : s + 5])
    loss.backward()
    after_oracle = torch.get_rng_state()
    want = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(7)
    got_loss, got = checkpointed(model, x, target, sum_mse, 5)
    assert torch.equal(torch.get_rng_state(), after_oracle)
    torch.testing.assert_close(got_loss, loss.detach(), **TOL)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


class SavedBytes:
    """Counts the bytes that autograd holds saved for backward at any moment, and the peak: a
    saved tensor is counted from its packing until its graph is freed."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        counter = self

        class Held:
            def __init__(self):
                self.tensor, self.nbytes = tensor, tensor.nbytes
                counter.live += self.nbytes
                counter.peak = max(counter.peak, counter.live)

            def __del__(self):
                counter.live -= self.nbytes

        return Held()

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)


@pytest.mark.parametrize("kind", ["torch", pytest.param(BACKENDS[0], id="fused")])
def test_only_one_segment_of_activations_is_alive(kind):
    model = make_model(kind, hidden_size=16)
    x, target = data(T=400)
    plain, ckpt = SavedBytes(), SavedBytes()
    with plain.hooks():
        unchunked(model, x, target, sum_mse, 20)
    with ckpt.hooks():
        checkpointed(model, x, target, sum_mse, 20)
    assert plain.live == 0 and ckpt.live == 0
    # 20 of 400 steps alive at a time: about 1/20 of plain's, plus per-segment constants.
    assert ckpt.peak < plain.peak / 10, (ckpt.peak, plain.peak)


def test_no_grad_first_pass_and_segment_lengths():
    inner = make_model("torch")
    calls = []

    def model(x, h):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return inner(x, h)

    x, target = data(T=23)
    checkpointed_bptt(model, x, target, sum_mse, segment=10)
    assert calls == [(10, False), (10, False), (3, False), (3, True), (10, True), (10, True)]
    calls.clear()
    checkpointed_bptt(model, x, target, sum_mse)  # default: round(sqrt(23)) = 5
    assert [n for n, grad in calls if grad] == [3, 5, 5, 5, 5]


@pytest.mark.parametrize("segment", [0, -3, 2.5, True, "4"])
def test_segment_must_be_a_positive_int(segment):
    model = make_model("torch")
    x, target = data(T=8)
    with pytest.raises(ValueError, match=r"segment must be an int >= 1.*got"):
        checkpointed_bptt(model, x, target, sum_mse, segment=segment)


def test_bad_input_errors():
    model = make_model("torch")
    x, target = data(T=8)
    with pytest.raises(ValueError, match=r"same length T.*\(8, 4, 3\).*\(7, 4, 2\)"):
        checkpointed_bptt(model, x, target[:7], sum_mse)
    with pytest.raises(ValueError, match=r"same length T \(dim 1\)"):
        checkpointed_bptt(model, x, target[:, :3], sum_mse, batch_first=True)
    with pytest.raises(ValueError, match=r"scalar.*returned shape \(2, 4, 2\)"):
        checkpointed_bptt(model, x, target, lambda p, t: (p - t) ** 2, segment=3)
    with pytest.raises(ValueError, match=r"scalar"):
        checkpointed_bptt(model, x, target, lambda p, t: 0.5)
    with pytest.raises(TypeError, match=r"must return \(pred, h_n\).*returned a Tensor"):
        checkpointed_bptt(lambda x, h: model(x, h)[0], x, target, sum_mse)
    with pytest.raises(TypeError, match=r"must return \(pred, h_n\).*tuple of length 3"):
        checkpointed_bptt(lambda x, h: (*model(x, h), 0), x, target, sum_mse)
    with pytest.raises(TypeError, match=r"h_n = None"):
        checkpointed_bptt(lambda x, h: (model(x, h)[0], None), x, target, sum_mse)
    with pytest.raises(RuntimeError, match=r"state changed shape between segments"):
        checkpointed_bptt(
            lambda x, h: (lambda p, h_n: (p, h_n if h is None else h_n[0]))(*model(x, h)),
            x,
            target,
            sum_mse,
            segment=3,
        )
    with pytest.raises(ValueError, match=r"x must be a tensor with time at dim 0"):
        checkpointed_bptt(model, [1, 2], target, sum_mse)
    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"nothing to backpropagate"):
        checkpointed_bptt(model, x, target, sum_mse)

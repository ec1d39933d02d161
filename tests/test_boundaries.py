"""StatefulTBPTT(boundaries=...): document boundaries inside the streams become chunk.resets, and
train_tbptt passes them to the model. Float64 against a hand-written per-step loop that zeroes
the state at each boundary, with FusedRNN on every available backend; no leak across a boundary;
TBPTT(k1, k2) windows carry the resets of their context steps; bad input.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_bptt import (
    FusedRNN,
    RNNWithHead,
    StatefulTBPTT,
    available_backends,
    batchify,
    train_tbptt,
)

TOL64 = dict(rtol=1e-10, atol=1e-10)
BACKENDS = [b for b in available_backends() if b != "cuda"]
T, B, I, H, K = 17, 4, 3, 5, 5


def make_pair(backend, num_layers=2, batch_first=False):
    """nn.RNN (the hand-written side) and a FusedRNN with the same float64 weights."""
    torch.manual_seed(0)
    rnn = nn.RNN(I, H, num_layers, batch_first=batch_first, dtype=torch.float64)
    return rnn, FusedRNN.from_rnn(rnn, backend=backend)


def stream_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    target = torch.randn(T, B, 2, generator=g, dtype=torch.float64)
    boundaries = torch.zeros(T, B, dtype=torch.bool)
    boundaries[7, 0] = True  # in the middle of chunk 1 (steps 5..9)
    boundaries[5, 1] = True  # at the first step of chunk 1
    boundaries[0, 2] = boundaries[12, 2] = True
    boundaries[16, 3] = True  # the last step of the last (short) chunk
    boundaries[10, :] = True  # every row at once, first step of chunk 2
    return x, target, boundaries


def loop_forward(rnn, x, h, boundaries):
    """The per-step loop users write today: zero the state where a document starts, one step
    at a time. x: [n, B, I], boundaries: [n, B]; returns y [n, B, H] and the final state."""
    ys = []
    for t in range(x.shape[0]):
        if h is not None:
            h = h * (~boundaries[t]).to(h.dtype)[None, :, None]
        y, h = rnn(x[t : t + 1], h)
        ys.append(y)
    return torch.cat(ys), h


def hand_written_grads(rnn, head, x, target, boundaries, k1, k2):
    """TBPTT(k1, k2) with boundaries written out: for the new steps [s, e) run the loop from the
    state of one full loop at w = max(0, s - (k2 - k1)), detached; loss on [s, e) only."""
    with torch.no_grad():
        states = [None] + [
            loop_forward(rnn, x[:e], None, boundaries[:e])[1] for e in range(1, x.shape[0] + 1)
        ]
    grads, outputs = [], []
    for s in range(0, x.shape[0], k1):
        e, w = min(s + k1, x.shape[0]), max(0, s - (k2 - k1))
        y, _ = loop_forward(rnn, x[w:e], states[w], boundaries[w:e])
        loss = F.mse_loss(head(y[s - w :]), target[s:e])
        grads.append(torch.autograd.grad(loss, [*rnn.parameters(), *head.parameters()]))
        outputs.append(y[s - w :].detach())
    return grads, outputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k2", [K, 3 * K], ids=["tbptt-k", "k1-k2"])
def test_driver_with_boundaries_equals_a_loop_zeroing_the_state(backend, k2):
    x, target, boundaries = stream_data()
    rnn, fused = make_pair(backend)
    torch.manual_seed(3)
    head = nn.Linear(H, 2, dtype=torch.float64)
    expected, outputs = hand_written_grads(rnn, head, x, target, boundaries, K, k2)
    model = RNNWithHead(fused, head)
    driver = StatefulTBPTT(x, target, K, backprop=k2, boundaries=boundaries)
    for index, chunk in enumerate(driver):
        first = index * K - chunk.context
        # The resets cover every step of x, the context steps too.
        assert torch.equal(chunk.resets, boundaries[first : first + chunk.x.shape[0]])
        pred, h_n = model(chunk.x, chunk.h, resets=chunk.resets)
        loss = F.mse_loss(chunk.scored(pred), chunk.target)
        got = torch.autograd.grad(loss, list(model.parameters()))
        for g, w in zip(got, expected[index]):
            torch.testing.assert_close(g, w, **TOL64)
        y = fused(chunk.x, chunk.h, resets=chunk.resets)[0]
        torch.testing.assert_close(chunk.scored(y).detach(), outputs[index], **TOL64)
        driver.carry(h_n)
    assert index == len(expected) - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_tbptt_passes_the_resets(backend):
    """train_tbptt with boundaries: the losses and the SGD-trained parameters equal the
    hand-written loop's (without the resets the losses differ: the test can fail)."""
    x, target, boundaries = stream_data()
    rnn, fused = make_pair(backend)
    torch.manual_seed(3)
    head, head2 = nn.Linear(H, 2, dtype=torch.float64), nn.Linear(H, 2, dtype=torch.float64)
    head2.load_state_dict(head.state_dict())
    initial_head = {name: t.clone() for name, t in head.state_dict().items()}
    model = RNNWithHead(fused, head)
    log = train_tbptt(
        model,
        StatefulTBPTT(x, target, K, boundaries=boundaries),
        F.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
    )
    params = [*rnn.parameters(), *head2.parameters()]
    opt, h, expected = torch.optim.SGD(params, lr=0.1), None, []
    for s in range(0, T, K):
        y, h = loop_forward(rnn, x[s : s + K], h, boundaries[s : s + K])
        loss = F.mse_loss(head2(y), target[s : s + K])
        opt.zero_grad()
        loss.backward()
        opt.step()
        h = h.detach()
        expected.append(loss.item())
    torch.testing.assert_close(torch.tensor(log), torch.tensor(expected), **TOL64)
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p, q, **TOL64)
    _, fused_again = make_pair(backend)
    head3 = nn.Linear(H, 2, dtype=torch.float64)
    head3.load_state_dict(initial_head)
    model3 = RNNWithHead(fused_again, head3)
    no_resets = train_tbptt(
        model3,
        StatefulTBPTT(x, target, K),
        F.mse_loss,
        torch.optim.SGD(model3.parameters(), lr=0.1),
    )
    # The first chunk starts from zeros either way; the boundaries change the later ones.
    assert no_resets[0] == pytest.approx(expected[0], abs=1e-10)
    assert not torch.allclose(torch.tensor(no_resets[1:]), torch.tensor(expected[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [7, 5], ids=["mid-chunk", "chunk-start"])
def test_no_leak_across_a_boundary(backend, step):
    """Perturbing row 0's inputs before its boundary changes nothing from the boundary on, and
    no gradient of a loss after the boundary reaches those inputs."""
    x, target, _ = stream_data()
    boundaries = torch.zeros(T, B, dtype=torch.bool)
    boundaries[step, 0] = True
    _, fused = make_pair(backend)
    perturbed = x.clone()
    perturbed[:step, 0] += 1.0
    runs = []
    for inputs in (x, perturbed):
        inputs = inputs.clone().requires_grad_()
        driver, ys = StatefulTBPTT(inputs, target, K, boundaries=boundaries), []
        for chunk in driver:
            y, h_n = fused(chunk.x, chunk.h, resets=chunk.resets)
            ys.append(y)
            driver.carry(h_n)
        y = torch.cat(ys)
        # The loss after the boundary, inside the boundary's own chunk.
        start = step // K * K
        y[step : start + K, 0].sum().backward()
        runs.append((y.detach(), inputs.grad))
    (y, grad), (y_perturbed, _) = runs
    assert torch.equal(y[step:, 0], y_perturbed[step:, 0])
    assert torch.equal(y[:, 1:], y_perturbed[:, 1:])
    assert not torch.allclose(y[:step, 0], y_perturbed[:step, 0])  # the perturbation is real
    assert torch.count_nonzero(grad[:step]) == 0
    assert torch.count_nonzero(grad[step:, 0]) > 0


def test_boundaries_of_one_sequence_are_cut_like_x():
    N, streams = 43, 4
    seq, tgt = torch.randn(N, I), torch.randn(N)
    boundaries = torch.rand(N, generator=torch.Generator().manual_seed(0)) < 0.2
    for batch_first in (False, True):
        driver = StatefulTBPTT(
            seq, tgt, K, num_streams=streams, batch_first=batch_first, boundaries=boundaries
        )
        time_dim = 1 if batch_first else 0
        chunks = []
        for chunk in driver:
            assert chunk.resets.shape == chunk.x.shape[:2]
            chunks.append(chunk.resets)
            driver.carry(torch.zeros(1, streams, H))
        want = batchify(boundaries, streams)
        assert torch.equal(
            torch.cat(chunks, time_dim), want.transpose(0, 1) if batch_first else want
        )


def test_batch_first_streams_equal_time_major():
    x, target, boundaries = stream_data()
    _, fused = make_pair("reference")
    _, fused_bf = make_pair("reference", batch_first=True)
    ys = []
    for model, driver, dim in (
        (fused, StatefulTBPTT(x, target, K, boundaries=boundaries), 0),
        (
            fused_bf,
            StatefulTBPTT(
                x.transpose(0, 1),
                target.transpose(0, 1),
                K,
                batch_first=True,
                boundaries=boundaries.t(),
            ),
            1,
        ),
    ):
        out = []
        for chunk in driver:
            y, h_n = model(chunk.x, chunk.h, resets=chunk.resets)
            out.append(y)
            driver.carry(h_n)
        ys.append(torch.cat(out, dim))
    torch.testing.assert_close(ys[1].transpose(0, 1), ys[0], **TOL64)


def test_no_boundaries_gives_no_resets():
    x, target, _ = stream_data()
    for chunk in StatefulTBPTT(x, target, K):
        assert chunk.resets is None
        break


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda x, t, b: StatefulTBPTT(x, t, K, boundaries=b.int()),
            TypeError,
            r"boundaries must be a bool tensor \[T, B\].*got torch.int32",
        ),
        (
            lambda x, t, b: StatefulTBPTT(x, t, K, boundaries=b.tolist()),
            TypeError,
            r"boundaries must be a bool tensor.*got list",
        ),
        (
            lambda x, t, b: StatefulTBPTT(x, t, K, boundaries=b.t()),
            ValueError,
            r"shape \[T, B\] \(like x\) = \(17, 4\).*got \(4, 17\)",
        ),
        (
            lambda x, t, b: StatefulTBPTT(
                x.transpose(0, 1), t.transpose(0, 1), K, batch_first=True, boundaries=b
            ),
            ValueError,
            r"shape \[B, T\] \(batch_first, like x\) = \(4, 17\).*got \(17, 4\)",
        ),
        (
            lambda x, t, b: StatefulTBPTT(x[:, 0], t[:, 0], K, num_streams=2, boundaries=b),
            ValueError,
            r"shape \[N\] \(one sequence, like x\) = \(17,\).*got \(17, 4\)",
        ),
    ],
)
def test_bad_boundaries(make, error, match):
    x, target, boundaries = stream_data()
    with pytest.raises(error, match=match):
        make(x, target, boundaries)


def test_a_model_without_resets_is_refused():
    """Boundaries and a model that cannot take resets: an error, never a silent leak."""
    x, target, boundaries = stream_data()
    rnn, _ = make_pair("reference")
    opt = torch.optim.SGD(rnn.parameters(), lr=0.1)
    driver = StatefulTBPTT(x, target, K, boundaries=boundaries)
    with pytest.raises(TypeError, match=r"RNNWithHead: its rnn \(RNN\) takes no `resets`"):
        train_tbptt(rnn, driver, F.mse_loss, opt, head=nn.Linear(H, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"train_tbptt: the model \(function\) takes no `resets`"):
        train_tbptt(lambda x, h: rnn(x, h), driver, F.mse_loss, opt)
    with pytest.raises(TypeError, match=r"RNNWithHead: its rnn \(RNN\) takes no `resets`"):
        RNNWithHead(rnn, nn.Identity())(x, None, resets=boundaries)
    # Without boundaries the same models keep working.
    assert (
        len(
            train_tbptt(
                rnn,
                StatefulTBPTT(x, target, K),
                F.mse_loss,
                opt,
                head=nn.Linear(H, 2, dtype=torch.float64),
            )
        )
        == 4
    )

"""The TBPTT chunk drivers and the training helper: chunking, state carry and reset, windows,
TBPTT(k1, k2), gradient-norm monitoring. Float64 against unchunked runs and hand-written loops,
with nn.RNN and FusedRNN.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_bptt import (
    Chunk,
    FusedRNN,
    RNNWithHead,
    StatefulTBPTT,
    StatelessTBPTT,
    available_backends,
    batchify,
    train_tbptt,
)

FUSED_BACKENDS = list(available_backends())
TOL64 = dict(rtol=1e-10, atol=1e-10)


def device_of(kind):
    return "cuda" if kind == "cuda" else "cpu"


def make_rnn(kind, input_size=3, hidden_size=5, num_layers=1, batch_first=False, seed=0):
    """nn.RNN, or FusedRNN with the given backend, holding identical float64 weights, on the
    backend's device."""
    torch.manual_seed(seed)
    rnn = nn.RNN(input_size, hidden_size, num_layers, batch_first=batch_first, dtype=torch.float64)
    if kind == "torch":
        return rnn
    return FusedRNN.from_rnn(rnn, backend=kind).to(device_of(kind))


RNN_KINDS = ["torch"] + [pytest.param(b, id=f"fused-{b}") for b in FUSED_BACKENDS]


def stream_data(T=23, B=4, I=3, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, B, I, generator=g, dtype=torch.float64).to(device),
        torch.randn(T, B, 2, generator=g, dtype=torch.float64).to(device),
    )


def run_chunks(rnn, driver, time_dim=0):
    """Forward over every chunk with carry, returns the outputs concatenated and the last state."""
    ys = []
    for chunk in driver:
        y, h_n = rnn(chunk.x, chunk.h)
        driver.carry(h_n)
        ys.append(y)
    return torch.cat(ys, time_dim), h_n


# ---- batchify and chunking ---------------------------------------------------------------------


def test_batchify_makes_contiguous_streams():
    seq = torch.arange(23.0).unsqueeze(1)
    streams = batchify(seq, 4)  # L = 5, the last 3 steps dropped
    assert streams.shape == (5, 4, 1)
    for b in range(4):
        assert torch.equal(streams[:, b, 0], torch.arange(5.0 * b, 5.0 * b + 5))


@pytest.mark.parametrize("T,k", [(23, 5), (20, 5), (7, 7), (8, 1)])
def test_stateful_chunks_cover_the_streams_in_order(T, k):
    x, target = stream_data(T=T)
    driver = StatefulTBPTT(x, target, k)
    chunks = []
    for chunk in driver:
        chunks.append(chunk)
        driver.carry(torch.zeros(1, 4, 5))
    assert len(chunks) == len(driver) == math.ceil(T / k)
    assert [c.x.shape[0] for c in chunks] == [k] * (T // k) + ([T % k] if T % k else [])
    assert torch.equal(torch.cat([c.x for c in chunks]), x)
    assert torch.equal(torch.cat([c.target for c in chunks]), target)
    dropped = StatefulTBPTT(x, target, k, drop_last=True)
    assert len(dropped) == T // k


def test_stateful_from_one_sequence_and_batch_first():
    seq, tgt = torch.randn(40, 3), torch.randn(40)
    driver = StatefulTBPTT(seq, tgt, k=4, num_streams=3, batch_first=True)
    chunk = next(iter(driver))
    assert isinstance(chunk, Chunk) and chunk.h is None
    assert chunk.x.shape == (3, 4, 3) and chunk.target.shape == (3, 4)
    assert torch.equal(chunk.x[1], seq[13:17])  # stream 1 starts at 40 // 3 = 13
    assert len(driver) == math.ceil(13 / 4)


# ---- stateful TBPTT = the unchunked forward; gradients = the hand-written detach loop -------


@pytest.mark.parametrize("kind", RNN_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_stateful_forward_equals_unchunked(kind, batch_first):
    rnn = make_rnn(kind, num_layers=2, batch_first=batch_first)
    x, target = stream_data(T=23, device=device_of(kind))
    if batch_first:
        x, target = x.transpose(0, 1), target.transpose(0, 1)
    with torch.no_grad():  # against one unchunked nn.RNN run on the CPU
        y_full, h_full = make_rnn("torch", num_layers=2, batch_first=batch_first)(x.cpu(), None)
        y, h_n = run_chunks(
            rnn, StatefulTBPTT(x, target, 5, batch_first=batch_first), time_dim=int(batch_first)
        )
    torch.testing.assert_close(y.cpu(), y_full, **TOL64)
    torch.testing.assert_close(h_n.cpu(), h_full, **TOL64)


def test_stateful_carries_a_tuple_state_of_an_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, dtype=torch.float64)
    x, target = stream_data(T=23)
    with torch.no_grad():
        y_full, (h_full, c_full) = lstm(x)
        y, (h_n, c_n) = run_chunks(lstm, StatefulTBPTT(x, target, 5))
    torch.testing.assert_close(y, y_full, **TOL64)
    torch.testing.assert_close(c_n, c_full, **TOL64)


def hand_written_tbptt_grads(rnn, head, x, target, k):
    """The textbook loop: slice k steps, forward from h, backward, h = h.detach()."""
    grads, h = [], None
    for start in range(0, x.shape[0], k):
        pred, h = rnn(x[start : start + k], h)
        loss = F.mse_loss(head(pred), target[start : start + k])
        params = [*rnn.parameters(), *head.parameters()]
        grads.append(torch.autograd.grad(loss, params))
        h = h.detach()
    return grads


@pytest.mark.parametrize("kind", RNN_KINDS)
def test_stateful_gradients_equal_hand_written_detach_loop(kind):
    torch.manual_seed(3)
    head = nn.Linear(5, 2, dtype=torch.float64)
    x, target = stream_data(T=23)
    expected = hand_written_tbptt_grads(make_rnn("torch"), head, x, target, k=6)  # nn.RNN, CPU
    model = RNNWithHead(make_rnn(kind), head).to(device_of(kind))
    x, target = x.to(device_of(kind)), target.to(device_of(kind))
    driver = StatefulTBPTT(x, target, k=6)
    assert len(driver) == len(expected) == 4  # the last chunk has 5 steps
    for chunk, want in zip(driver, expected):
        pred, h_n = model(chunk.x, chunk.h)
        got = torch.autograd.grad(F.mse_loss(pred, chunk.target), list(model.parameters()))
        driver.carry(h_n)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, **TOL64)


def test_carry_detaches_and_no_gradient_crosses_a_boundary():
    rnn = make_rnn("torch")
    x, target = stream_data(T=12)
    x.requires_grad_(True)
    driver = StatefulTBPTT(x, target, k=4)
    for index, chunk in enumerate(driver):
        y, h_n = rnn(chunk.x, chunk.h)
        driver.carry(h_n)
        assert not driver.state.requires_grad
        if index == 1:
            y.sum().backward()
    # Only chunk 1 (steps 4..7) received gradient: chunk 0 is cut off by the detach.
    assert x.grad[:4].abs().max() == 0 and x.grad[4:8].abs().max() > 0


def test_carry_must_be_called():
    x, target = stream_data(T=12)
    driver = StatefulTBPTT(x, target, k=4)
    with pytest.raises(RuntimeError, match="carry"):
        for _ in driver:
            pass


# ---- TBPTT(k1, k2): StatefulTBPTT(backprop=k2) -------------------------------------------------


def full_forward_state(rnn, x, steps, time_dim=0):
    """The state after the first `steps` steps of one unchunked forward (None for 0 steps)."""
    if steps == 0:
        return None
    with torch.no_grad():
        return rnn(x.narrow(time_dim, 0, steps), None)[1]


def hand_written_k1_k2_grads(rnn, head, x, target, k1, k2):
    """Williams & Peng's TBPTT(k1, k2) written out: for the new steps [s, e), run forward from
    the state of one full forward at max(0, s - (k2 - k1)), loss on [s, e) only."""
    grads = []
    for s in range(0, x.shape[0], k1):
        e, w = min(s + k1, x.shape[0]), max(0, s - (k2 - k1))
        pred, _ = rnn(x[w:e], full_forward_state(rnn, x, w))
        loss = F.mse_loss(head(pred[s - w :]), target[s:e])
        grads.append(torch.autograd.grad(loss, [*rnn.parameters(), *head.parameters()]))
    return grads


@pytest.mark.parametrize("kind", RNN_KINDS)
@pytest.mark.parametrize("T,k1,k2", [(23, 4, 12), (24, 4, 8), (23, 5, 5), (9, 3, 30)])
def test_k1_k2_gradients_and_states_equal_hand_written_loop(kind, T, k1, k2):
    torch.manual_seed(3)
    head = nn.Linear(5, 2, dtype=torch.float64)
    x, target = stream_data(T=T)
    reference_rnn = make_rnn("torch", num_layers=2)
    expected = hand_written_k1_k2_grads(reference_rnn, head, x, target, k1, k2)
    model = RNNWithHead(make_rnn(kind, num_layers=2), head).to(device_of(kind))
    driver = StatefulTBPTT(x.to(device_of(kind)), target.to(device_of(kind)), k=k1, backprop=k2)
    assert len(driver) == len(expected) == math.ceil(T / k1)
    for index, (chunk, want) in enumerate(zip(driver, expected)):
        s, e = index * k1, min(index * k1 + k1, T)
        assert chunk.context == s - max(0, s - (k2 - k1))
        assert chunk.x.shape[0] == e - s + chunk.context
        torch.testing.assert_close(chunk.target.cpu(), target[s:e], rtol=0, atol=0)
        pred, h_n = model(chunk.x, chunk.h)
        loss = F.mse_loss(chunk.scored(pred), chunk.target)
        got = torch.autograd.grad(loss, list(model.parameters()))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, **TOL64)
        driver.carry(h_n)
        # The carried state is the full forward's, although every window started elsewhere.
        torch.testing.assert_close(
            driver.state.cpu(), full_forward_state(reference_rnn, x, e), **TOL64
        )


def test_k1_k2_batch_first_and_an_lstm_state():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True, dtype=torch.float64)
    x, target = stream_data(T=19)
    x, target = x.transpose(0, 1), target.transpose(0, 1)
    driver = StatefulTBPTT(x, target, k=3, backprop=9, batch_first=True)
    with torch.no_grad():
        for index, chunk in enumerate(driver):
            s = index * 3
            assert chunk.time_dim == 1 and chunk.context == min(s, 6)
            y, h_n = lstm(chunk.x, chunk.h)
            assert chunk.scored(y).shape[:2] == chunk.target.shape[:2]
            torch.testing.assert_close(chunk.scored(y), lstm(x[:, : s + 3])[0][:, s:], **TOL64)
            driver.carry(h_n)
            for got, want in zip(driver.state, lstm(x[:, : s + 3])[1]):
                torch.testing.assert_close(got, want, **TOL64)


def test_k1_k2_train_tbptt_equals_hand_written_loop():
    """train_tbptt scores the newest steps only; SGD, so each window starts from a state that
    older weights produced, kept exactly as the driver keeps it."""
    x, target = stream_data(T=20)
    model = RNNWithHead(make_rnn("torch"), nn.Linear(5, 2, dtype=torch.float64))
    model2 = RNNWithHead(make_rnn("torch"), nn.Linear(5, 2, dtype=torch.float64))
    model2.load_state_dict(model.state_dict())
    log = train_tbptt(
        model,
        StatefulTBPTT(x, target, 4, backprop=12),
        F.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
        clip_grad_norm=10.0,
    )
    opt2, states, expected = torch.optim.SGD(model2.parameters(), lr=0.1), [None], []
    for s in range(0, 20, 4):
        w = max(0, s - 8)
        pred, h_n = model2(x[w : s + 4], states[w // 4])
        loss = F.mse_loss(pred[s - w :], target[s : s + 4])
        opt2.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model2.parameters(), 10.0)
        opt2.step()
        states.append(h_n.detach())
        expected.append(loss.item())
    torch.testing.assert_close(torch.tensor(log), torch.tensor(expected), **TOL64)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, **TOL64)


def test_k1_k2_full_reset_starts_the_windows_over():
    x, target = stream_data(T=24)
    driver = StatefulTBPTT(x, target, k=4, backprop=12)
    contexts, states = [], []
    for index, chunk in enumerate(driver):
        contexts.append(chunk.context)
        states.append(chunk.h)
        if index == 2:
            driver.reset()  # instead of carry: boundary 3 is zeros
        else:
            driver.carry(torch.full((1, 4, 5), float(index)))
    assert contexts == [0, 4, 8, 0, 4, 8]
    assert states[3] is None and states[4] is None and states[5] is None
    with pytest.raises(NotImplementedError, match=r"backprop=12 > k=4.*reset\(\) all"):
        driver.reset([1])


# ---- state reset -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", RNN_KINDS)
def test_reset_selected_streams_equals_restarting_them(kind):
    rnn = make_rnn(kind)
    x, target = stream_data(T=12, B=4, device=device_of(kind))
    driver = StatefulTBPTT(x, target, k=4)
    ys = []
    with torch.no_grad():
        for index, chunk in enumerate(driver):
            y, h_n = rnn(chunk.x, chunk.h)
            driver.carry(h_n)
            if index == 0:
                driver.reset(torch.tensor([False, True, False, True]))
            ys.append(y)
        y = torch.cat(ys)
        expected_kept, _ = rnn(x[:, [0, 2]], None)  # never reset
        expected_reset, _ = rnn(x[4:, [1, 3]], None)  # restarted at step 4
    torch.testing.assert_close(y[:, [0, 2]], expected_kept, **TOL64)
    torch.testing.assert_close(y[4:, [1, 3]], expected_reset, **TOL64)


def test_reset_all_and_by_index():
    x, target = stream_data(T=8, B=3)
    driver = StatefulTBPTT(x, target, k=4)
    it = iter(driver)
    next(it)
    h = torch.ones(2, 3, 5)
    driver.carry((h, h + 1))  # an LSTM-like (h, c) state
    driver.reset([2])
    for part, value in zip(driver.state, (1, 2)):
        assert torch.equal(part[:, :2], torch.full((2, 2, 5), float(value)))
        assert torch.equal(part[:, 2], torch.zeros(2, 5))
    assert torch.equal(h, torch.ones(2, 3, 5))  # the carried tensor itself is untouched
    driver.reset()
    assert next(it).h is None
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        driver.reset([3])


# ---- stateless windows -------------------------------------------------------------------------


def window_data(device="cpu"):
    g = torch.Generator().manual_seed(5)
    lengths = [30, 12, 50]
    xs = [torch.randn(n, 3, generator=g, dtype=torch.float64).to(device) for n in lengths]
    return xs, [x[:, :2] * 2 for x in xs]


@pytest.mark.parametrize("kind", RNN_KINDS)
def test_stateless_windows_start_from_zero_and_do_not_share_state(kind):
    rnn = make_rnn(kind)
    xs, targets = window_data(device_of(kind))
    driver = StatelessTBPTT(xs, targets, k=7, batch_size=5, num_batches=3, generator=0)
    with torch.no_grad():
        for chunk in driver:
            assert chunk.h is None and chunk.x.shape == (7, 5, 3)
            y, h_n = rnn(chunk.x, chunk.h)
            driver.carry(h_n)  # ignored: the next window still gets None
            for b in range(5):  # each window alone, from explicit zeros
                zeros = torch.zeros(1, 1, 5, dtype=torch.float64, device=chunk.x.device)
                alone, _ = rnn(chunk.x[:, b : b + 1], zeros)
                torch.testing.assert_close(y[:, b : b + 1], alone, **TOL64)


def test_stateless_windows_are_real_windows_and_reproducible():
    xs, targets = window_data()

    def draw(seed):
        driver = StatelessTBPTT(xs, targets, k=7, batch_size=8, num_batches=4, generator=seed)
        return [(c.x, c.target) for c in driver]

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    for x, target in first:
        torch.testing.assert_close(target, x[..., :2] * 2, rtol=0, atol=0)  # pairs stay aligned
        for b in range(8):  # each window is a contiguous slice of a sequence
            assert any(
                torch.equal(x[:, b], seq[s : s + 7]) for seq in xs for s in range(seq.shape[0] - 6)
            )
    batch_first = StatelessTBPTT(
        xs, targets, k=7, batch_size=8, num_batches=1, generator=0, batch_first=True
    )
    chunk = next(iter(batch_first))
    assert torch.equal(chunk.x, first[0][0].transpose(0, 1))
    assert torch.equal(chunk.target, first[0][1].transpose(0, 1))
    generator = torch.Generator().manual_seed(0)
    from_gen = StatelessTBPTT(xs, targets, k=7, batch_size=8, num_batches=4, generator=generator)
    assert torch.equal(next(iter(from_gen)).x, first[0][0])


def test_stateless_samples_every_window_uniformly():
    seqs = [torch.zeros(5, 1), torch.zeros(3, 1)]  # k = 3: windows 0..2 and 3
    driver = StatelessTBPTT(seqs, seqs, k=3, batch_size=4000, num_batches=1, generator=0)
    sequence, start = driver.sample_windows()
    window = torch.where(sequence == 0, start, 3)
    counts = torch.bincount(window, minlength=4).double() / 4000
    assert start.max() <= 2 and start[sequence == 1].max() == 0
    torch.testing.assert_close(
        counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0
    )


# ---- the training helper -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", RNN_KINDS)
def test_train_tbptt_equals_hand_written_sgd_loop(kind):
    """train_tbptt(rnn, ..., head=head): losses, parameters, gradient norms before clipping and
    the clipped flags equal a hand-written loop's."""
    x, target = stream_data(T=17, device=device_of(kind))
    rnn = make_rnn(kind)
    torch.manual_seed(3)
    head = nn.Linear(5, 2, dtype=torch.float64).to(device_of(kind))
    opt = torch.optim.SGD([*rnn.parameters(), *head.parameters()], lr=0.1)
    log = train_tbptt(
        rnn, StatefulTBPTT(x, target, 5), F.mse_loss, opt, head=head, clip_grad_norm=0.5
    )

    rnn2 = make_rnn("torch")  # the hand-written side: nn.RNN on the CPU
    torch.manual_seed(3)
    head2 = nn.Linear(5, 2, dtype=torch.float64)
    x, target = x.cpu(), target.cpu()
    params = [*rnn2.parameters(), *head2.parameters()]
    opt2, h, expected, norms = torch.optim.SGD(params, lr=0.1), None, [], []
    for start in range(0, 17, 5):
        pred, h = rnn2(x[start : start + 5], h)
        loss = F.mse_loss(head2(pred), target[start : start + 5])
        opt2.zero_grad()
        loss.backward()
        norms.append(torch.cat([p.grad.flatten() for p in params]).norm().item())
        nn.utils.clip_grad_norm_(params, 0.5)
        opt2.step()
        h = h.detach()
        expected.append(loss.item())
    assert isinstance(log, list) and len(log) == 4
    torch.testing.assert_close(torch.tensor(log), torch.tensor(expected), **TOL64)
    torch.testing.assert_close(torch.tensor(log.grad_norms), torch.tensor(norms), **TOL64)
    assert log.clipped == [n > 0.5 for n in norms] and any(log.clipped)
    for p, q in zip([*rnn.parameters(), *head.parameters()], params):
        torch.testing.assert_close(p.cpu(), q, **TOL64)


def test_train_tbptt_reports_norms_without_clipping():
    x, target = stream_data(T=12)
    model = RNNWithHead(make_rnn("torch"), nn.Linear(5, 2, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put
    log = train_tbptt(model, StatefulTBPTT(x, target, 4), F.mse_loss, opt)
    assert log.clipped == [False] * 3
    driver, norms = StatefulTBPTT(x, target, 4), []
    for chunk in driver:
        pred, h_n = model(chunk.x, chunk.h)
        grads = torch.autograd.grad(F.mse_loss(pred, chunk.target), list(model.parameters()))
        norms.append(torch.cat([g.flatten() for g in grads]).norm().item())
        driver.carry(h_n)
    torch.testing.assert_close(torch.tensor(log.grad_norms), torch.tensor(norms), **TOL64)
    with pytest.raises(ValueError, match=r"clip_grad_norm must be a positive number.*got 0"):
        train_tbptt(model, StatefulTBPTT(x, target, 4), F.mse_loss, opt, clip_grad_norm=0)


def test_train_tbptt_with_model_and_stateless_driver():
    xs, targets = window_data()
    model = RNNWithHead(make_rnn("torch"), nn.Linear(5, 2, dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = []
    losses = train_tbptt(
        model,
        StatelessTBPTT(xs, targets, 6, 4, 5, generator=0),
        F.mse_loss,
        opt,
        on_chunk=lambda i, loss: seen.append(i),
    )
    assert len(losses) == 5 and seen == list(range(5))
    assert all(math.isfinite(loss) for loss in losses)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, t: StatefulTBPTT(x, t, 0), r"k must be an int >= 1.*got 0"),
        (lambda x, t: StatefulTBPTT(x, t, 2.5), r"k must be an int >= 1.*got 2.5"),
        (
            lambda x, t: StatefulTBPTT(x, t, 13),
            r"12 steps long, shorter than the chunk length k=13",
        ),
        (lambda x, t: StatefulTBPTT(x, t[:-1], 4), r"same length.*\(12, 4, 3\).*\(11, 4, 2\)"),
        (lambda x, t: StatefulTBPTT(x, t[:, :3], 4), r"number of streams"),
        (lambda x, t: StatefulTBPTT(x[:, 0], t[:-1, 0], 4, num_streams=2), r"same length"),
        (lambda x, t: StatefulTBPTT(x[:, 0, 0], t[:, 0, 0], 4), r"without num_streams"),
        (
            lambda x, t: StatefulTBPTT(x[:, 0], t[:, 0], 4, num_streams=13),
            r"length 12 into 13 streams",
        ),
        (
            lambda x, t: StatefulTBPTT(x[:, 0], t[:, 0], 4, num_streams=4),
            r"3 steps long, shorter than the chunk length k=4",
        ),
        (lambda x, t: batchify(x, 0), r"num_streams must be an int >= 1"),
        (
            lambda x, t: StatelessTBPTT([x[:, 0], x[:5, 0]], [t[:, 0], t[:5, 0]], 6, 2, 1),
            r"sequence 1 is 5 steps long, shorter than the window length k=6",
        ),
        (lambda x, t: StatelessTBPTT([x[:, 0]], [t[:, 0], t[:, 1]], 4, 2, 1), r"got 1 and 2"),
        (lambda x, t: StatelessTBPTT(x[:, 0], t[:-1, 0], 4, 2, 1), r"same length"),
        (lambda x, t: StatelessTBPTT(x[:, 0], t[:, 0], 4, 0, 1), r"batch_size must be"),
        (
            lambda x, t: StatelessTBPTT([x[:, 0], x[:, 0, :2]], [t[:, 0]] * 2, 4, 2, 1),
            r"feature shape",
        ),
        (lambda x, t: StatelessTBPTT(x[:, 0], t[:, 0], -1, 2, 1), r"k must be an int >= 1"),
        (
            lambda x, t: StatefulTBPTT(x, t, 4, backprop=3),
            r"backprop .* must be an int >= k=4.*got 3",
        ),
        (lambda x, t: StatefulTBPTT(x, t, 4, backprop=True), r"int >= k=4.*got True"),
        (lambda x, t: StatefulTBPTT(x, t, 4, backprop=10), r"multiple of k=4.*got 10; use 8 or 12"),
    ],
)
def test_bad_input_errors(call, match):
    x, target = stream_data(T=12)
    with pytest.raises(ValueError, match=match):
        call(x, target)


def test_train_tbptt_rejects_a_bad_model_output_and_a_non_scalar_loss():
    x, target = stream_data(T=8)
    model = RNNWithHead(make_rnn("torch"), nn.Linear(5, 2, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError,
        match=r"train_tbptt: model\(x, h\) must return \(pred, h_n\)"
        r".*a Tensor \(chunk 0\)",
    ):
        train_tbptt(lambda x, h: model(x, h)[0], StatefulTBPTT(x, target, 4), F.mse_loss, opt)
    with pytest.raises(ValueError, match=r"train_tbptt: loss_fn must return a scalar.*\(4, 4, 2\)"):
        train_tbptt(model, StatefulTBPTT(x, target, 4), lambda p, t: (p - t) ** 2, opt)


def test_carry_rejects_a_state_of_the_wrong_batch():
    x, target = stream_data(T=12, B=4)
    driver = StatefulTBPTT(x, target, k=4)
    next(iter(driver))
    with pytest.raises(ValueError, match=r"4 streams at dim -2.*\(1, 3, 5\)"):
        driver.carry(torch.zeros(1, 3, 5))

"""The oracle itself: fused_bptt.reference against torch.nn.RNN, and its hand-written backward
against autograd. Everything else is tested against this file's subject."""

import pytest
import torch

from conftest import assert_close, make_layer_inputs
from fused_bptt import reference


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("T,B,I,H", [(1, 1, 1, 1), (7, 3, 5, 4), (20, 2, 3, 9)])
def test_reference_matches_nn_rnn_float64(T, B, I, H, bias, relu):
    torch.manual_seed(0)
    rnn = torch.nn.RNN(
        I, H, nonlinearity="relu" if relu else "tanh", bias=bias, dtype=torch.float64
    )
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    y_nn, hn_nn = rnn(x, h0)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0] + (
        [rnn.bias_ih_l0, rnn.bias_hh_l0] if bias else [None, None]
    )
    y = reference.rnn_forward(x, h0[0], *params, relu=relu)
    assert_close(y, y_nn, name="y")
    assert_close(y[-1], hn_nn[0], name="h_n")

    gy = torch.randn_like(y)
    leaves = [x, h0] + [p for p in params if p is not None]
    g_nn = torch.autograd.grad((y_nn * gy).sum(), leaves)
    g_ref = torch.autograd.grad((y * gy).sum(), leaves)
    for name, a, b in zip(["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"], g_ref, g_nn):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_hand_written_backward_matches_autograd(relu):
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(9, 4, 3, 6, torch.float64)
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    y = reference.rnn_forward(*leaves, relu=relu)
    gy = torch.randn_like(y)
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = torch.autograd.grad((y * gy).sum(), leaves)
    got = reference.rnn_backward(gy, x, h0, w_ih, w_hh, y.detach(), relu=relu)
    for name, a, b in zip(
        ["dx", "dh0", "dW_ih", "dW_hh", "db"], got, [dx, dh0, dw_ih, dw_hh, db_ih]
    ):
        assert_close(a, b, name=name)
    assert_close(db_hh, db_ih, name="db_hh == db_ih")


def test_reference_gradcheck():
    inputs = [t.requires_grad_() for t in make_layer_inputs(4, 2, 3, 3, torch.float64)]
    assert torch.autograd.gradcheck(lambda *a: reference.rnn_forward(*a), inputs)

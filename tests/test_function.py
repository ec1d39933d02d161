"""The functional API: backend choice, its errors, and the fallback when _C is missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fused_bptt
from conftest import assert_close, make_layer_inputs
from fused_bptt.function import resolve_backend


def test_available_backends_order_and_content():
    found = fused_bptt.available_backends()
    assert found[-1] == "reference"
    assert list(found) == [b for b in ("cuda", "cpp", "reference") if b in found]
    assert ("cuda" in found) == (torch.cuda.is_available() and fused_bptt._ops.has_kernel("CUDA"))


def test_auto_picks_the_compiled_backend_for_cpu_float():
    x = torch.zeros(2, 1, 1)
    assert resolve_backend("auto", x) == "cpp"
    assert resolve_backend("auto", x.double()) == "cpp"
    # The CPU kernels take bfloat16 and float16 too; dtypes no kernel takes go to the reference.
    assert resolve_backend("auto", x.bfloat16()) == "cpp"
    assert resolve_backend("auto", x.half()) == "cpp"
    assert resolve_backend("auto", x.to(torch.complex64)) == "reference"


def test_backend_errors():
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(3, 2, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of .* but got 'cudnn'"):
        fused_bptt.rnn_tanh(x, h0, w_ih, w_hh, backend="cudnn")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available here"):
            fused_bptt.rnn_tanh(x, h0, w_ih, w_hh, backend="cuda")
    with pytest.raises(
        TypeError, match="supports float32, float64, bfloat16, float16, but x is torch.complex64"
    ):
        c = [t.to(torch.complex64) for t in (x, h0, w_ih, w_hh)]
        fused_bptt.rnn_tanh(*c, backend="cpp")


def test_functional_argument_errors():
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(3, 2, 4, 5, torch.float32)
    cases = [
        (ValueError, r"x must be 3-D \[T, B, I\], but got shape \(2, 4\)", (x[0], h0, w_ih, w_hh)),
        (ValueError, r"h0 must have shape \(2, 5\), but got \(1, 5\)", (x, h0[:1], w_ih, w_hh)),
        (ValueError, r"weight_hh must be \[H, H\]", (x, h0, w_ih, w_hh[:, :2])),
        (ValueError, "at least one time step", (x[:0], h0, w_ih, w_hh)),
        (TypeError, "weight_ih must have dtype torch.float32", (x, h0, w_ih.double(), w_hh)),
        (TypeError, "h0 must be a Tensor, but got list", (x, [0.0], w_ih, w_hh)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            fused_bptt.rnn_tanh(*args)
    with pytest.raises(ValueError, match=r"bias_hh must have shape \(5,\), but got \(4,\)"):
        fused_bptt.rnn_tanh(x, h0, w_ih, w_hh, b_ih, b_hh[:4])


def test_relu_and_tanh_differ_and_match_reference():
    inputs = make_layer_inputs(5, 2, 3, 4, torch.float64)
    y_t, hn_t = fused_bptt.rnn_tanh(*inputs)
    y_r, hn_r = fused_bptt.rnn_relu(*inputs)
    assert torch.equal(hn_t, y_t[-1]) and torch.equal(hn_r, y_r[-1])
    assert (y_r >= 0).all() and (y_t < 0).any()
    assert_close(y_t, fused_bptt.reference.rnn_forward(*inputs), name="tanh y")
    assert_close(y_r, fused_bptt.reference.rnn_forward(*inputs, relu=True), name="relu y")


def test_h_n_does_not_alias_y():
    """A carried-over h_n must not keep the chunk's y alive (nor change when y is edited)."""
    y, hn = fused_bptt.rnn_tanh(*make_layer_inputs(4, 2, 3, 4, torch.float32))
    assert hn.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()


def test_package_imports_and_falls_back_without_the_extension():
    """With _C unloadable: import works, available_backends() is ('reference',), 'auto' runs the
    reference with one warning that names the reinstall command, and 'cpp' raises."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["fused_bptt._C"] = None  # makes importing it raise ImportError
        import torch, fused_bptt
        assert fused_bptt.available_backends() == ("reference",), fused_bptt.available_backends()
        x = torch.randn(3, 2, 4); h0 = torch.zeros(2, 5)
        w_ih = torch.randn(5, 4); w_hh = torch.randn(5, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y, hn = fused_bptt.rnn_tanh(x, h0, w_ih, w_hh)
            fused_bptt.rnn_tanh(x, h0, w_ih, w_hh)
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, messages
        assert "pip install --no-build-isolation" in messages[0], messages[0]
        ref = fused_bptt.reference.rnn_forward(x, h0, w_ih, w_hh)
        assert torch.equal(y, ref)
        try:
            fused_bptt.rnn_tanh(x, h0, w_ih, w_hh, backend="cpp")
        except RuntimeError as e:
            assert "did not load" in str(e), e
        else:
            raise AssertionError("backend='cpp' without _C must raise")
        print("fallback-ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "fallback-ok" in out.stdout, out.stderr


def test_inference_path_matches_training_path():
    """Under no_grad (or with no input requiring grad) the op runs without the autograd.Function."""
    inputs = [t.requires_grad_() for t in make_layer_inputs(6, 3, 4, 5, torch.float64)]
    y, hn = fused_bptt.rnn_tanh(*inputs)
    assert y.requires_grad and hn.requires_grad
    with torch.no_grad():
        y_inf, hn_inf = fused_bptt.rnn_tanh(*inputs)
    y_plain, _ = fused_bptt.rnn_tanh(*[t.detach() for t in inputs])
    assert not y_inf.requires_grad and not y_plain.requires_grad
    assert torch.equal(y_inf, y) and torch.equal(hn_inf, hn) and torch.equal(y_plain, y)

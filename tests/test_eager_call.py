"""fused_bptt._C.rnn_layer, FusedRNN's eager call of the rnn_layer op (csrc/eager_call.cpp), against
torch.ops.fused_bptt.rnn_layer: the same bits, gradients and flags where it calls the op itself;
torch.ops' own handling (torch function overrides and modes, argument errors) where it does not;
the op's errors as torch.ops raises them; the GIL released while the op runs."""

import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_bptt
from conftest import DEVICES, make_layer_inputs
from fused_bptt import _ops
from fused_bptt.module import _rnn_layer_op

pytestmark = pytest.mark.skipif(not _ops.loaded(), reason="fused_bptt._C is not built")

direct = getattr(_ops._C, "rnn_layer", None)
through_torch_ops = torch.ops.fused_bptt.rnn_layer.default


def test_fused_rnn_calls_the_direct_call():
    assert direct is not None, "fused_bptt._C has no rnn_layer: rebuild the extension"
    assert _rnn_layer_op() is direct


def _layer_args(device, dtype, bias, relu, bounds, lead, requires_grad):
    T, B, I, H = 5, 3, 4, 6
    x, h0, w_ih, w_hh, b_ih, b_hh = make_layer_inputs(T, B, I, H, dtype, device, bias=bias)
    if lead:
        h0 = h0.unsqueeze(0)  # a one-layer module's hx: [1, B, H]
    tensors = [
        t if t is None else t.requires_grad_(requires_grad) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)
    ]
    resets = lengths = None
    if bounds == "resets":
        resets = torch.zeros(T, B, dtype=torch.bool, device=device)
        resets[2, 1] = True
    elif bounds == "lengths":
        lengths = torch.tensor([5, 2, 4], device=device)
    return (*tensors, relu, resets, lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
@pytest.mark.parametrize("bounds", [None, "resets", "lengths"])
@pytest.mark.parametrize("lead", [False, True], ids=["h0_2d", "h0_3d"])
def test_direct_call_gives_torch_ops_bits_and_gradients(device, dtype, bias, relu, bounds, lead):
    args = _layer_args(device, dtype, bias, relu, bounds, lead, requires_grad=True)
    leaves = [t for t in args[:6] if t is not None]
    results = []
    for call in (direct, through_torch_ops):
        y, h_n = call(*args)
        grads = torch.autograd.grad((y * y.detach()).sum() + (3 * h_n).sum(), leaves)
        results.append((y, h_n, grads))
    (y, h_n, grads), (y_ref, h_n_ref, grads_ref) = results
    assert torch.equal(y, y_ref) and torch.equal(h_n, h_n_ref)
    assert h_n.shape == h_n_ref.shape == ((1,) if lead else ()) + (3, 6)
    assert y.grad_fn.name() == y_ref.grad_fn.name()
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)


@pytest.mark.parametrize("mode", ["no_grad", "inference", "no_requires_grad"])
def test_direct_call_without_a_graph(mode):
    """No graph wanted: the same outputs, neither requiring grad, inference tensors under
    inference_mode, as through torch.ops."""
    args = _layer_args("cpu", torch.float32, True, False, None, True, mode != "no_requires_grad")
    context = {"no_grad": torch.no_grad, "inference": torch.inference_mode}.get(mode)
    outputs = []
    for call in (direct, through_torch_ops):
        if context is None:
            outputs.append(call(*args))
        else:
            with context():
                outputs.append(call(*args))
    for got, want in zip(*outputs):
        assert torch.equal(got, want)
        assert not got.requires_grad and not want.requires_grad
        assert got.is_inference() == want.is_inference() == (mode == "inference")


class _Recording(torch.Tensor):
    """A tensor subclass whose __torch_function__ records each function it sees."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _RecordingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_direct_call_hands_overrides_to_torch_ops():
    """A tensor subclass (in any tensor argument) and a torch function mode see the op, as
    through torch.ops, and the results are the op's."""
    args = _layer_args("cpu", torch.float64, True, False, "lengths", False, requires_grad=False)
    want = through_torch_ops(*args)
    for i in range(6):
        _Recording.seen = []
        changed = list(args)
        changed[i] = args[i].as_subclass(_Recording)
        got = direct(*changed)
        assert through_torch_ops in _Recording.seen, f"argument {i}: the override was skipped"
        assert all(torch.equal(g.as_subclass(torch.Tensor), w) for g, w in zip(got, want))
    with _RecordingMode() as mode:
        got = direct(*args)
    assert through_torch_ops in mode.seen, "the torch function mode was skipped"
    assert all(torch.equal(g, w) for g, w in zip(got, want))


class _DispatchRecording(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_direct_call_under_a_dispatch_mode():
    """A torch dispatch mode (a Python kernel the dispatcher calls back, the GIL taken again)
    sees the same ops from the direct call as from torch.ops, and the results are theirs."""
    args = _layer_args("cpu", torch.float64, True, False, "resets", True, requires_grad=True)
    recorded = []
    for call in (direct, through_torch_ops):
        with _DispatchRecording() as mode:
            y, h_n = call(*args)
            (grad_x,) = torch.autograd.grad(y.sum() + h_n.sum(), args[0])
        recorded.append((mode.seen, y, h_n, grad_x))
    (seen, *got), (seen_ref, *want) = recorded
    assert seen == seen_ref and "fused_bptt.rnn_forward.default" in seen, seen
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def _assert_same_outcome(name, args, kwargs=None):
    """direct(*args, **kwargs) returns what torch.ops returns, or raises its error (class and
    message)."""
    kwargs = kwargs or {}
    try:
        want = through_torch_ops(*args, **kwargs)
    except Exception as expected:
        with pytest.raises(type(expected)) as got:
            direct(*args, **kwargs)
        assert str(got.value) == str(expected), name
        return
    got = direct(*args, **kwargs)
    assert len(got) == len(want) == 2, name
    assert all(torch.equal(g, w) for g, w in zip(got, want)), name


def test_direct_call_hands_other_arguments_to_torch_ops():
    """What the direct call does not take itself (keywords, defaults left out, other types) is
    torch.ops' to handle: the same results, or the same error class and message."""
    args = _layer_args("cpu", torch.float32, True, True, None, False, requires_grad=False)
    _assert_same_outcome("defaults left out", args[:7])
    _assert_same_outcome("keywords", args[:6], dict(relu=True, lengths=None))
    outcomes = {
        "relu an int": args[:6] + (1,) + args[7:],
        "relu a string": args[:6] + ("yes",) + args[7:],
        "x None": (None,) + args[1:],
        "weight_hh None": args[:3] + (None,) + args[4:],
        "x a list": ([[1.0]],) + args[1:],
        "too many": args + (None,),
        "too few": args[:5],
    }
    for name, call_args in outcomes.items():
        _assert_same_outcome(name, call_args)
    with pytest.raises((RuntimeError, TypeError, ValueError)):  # at least these are errors
        direct(*outcomes["x None"])
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        direct(*outcomes["too few"])


def test_direct_call_raises_the_ops_errors():
    """Errors from inside the op (its checks) reach Python as torch.ops gives them."""
    args = list(_layer_args("cpu", torch.float32, True, False, None, False, requires_grad=True))
    cases = {
        "h0 of another batch": {1: torch.randn(2, 6)},
        "weight_hh of another dtype": {3: torch.randn(6, 6, dtype=torch.float64)},
        "weight_hh on meta": {3: torch.randn(6, 6, device="meta")},
        "no steps": {0: torch.randn(0, 3, 4)},
        "lengths too long": {8: torch.tensor([6, 1, 1])},
    }
    for name, change in cases.items():
        call_args = [change.get(i, a) for i, a in enumerate(args)]
        with pytest.raises((RuntimeError, ValueError)):
            through_torch_ops(*call_args)
        _assert_same_outcome(name, call_args)


def test_fallback_must_be_set():
    """The library loaded on its own, outside the package that sets the fallback: a call it
    cannot take says so instead of crashing."""
    code = (
        "import importlib.machinery, importlib.util, torch\n"
        f"path = {_ops._C.__file__!r}\n"
        "loader = importlib.machinery.ExtensionFileLoader('standalone._C', path)\n"
        "spec = importlib.util.spec_from_file_location('standalone._C', path, loader=loader)\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "loader.exec_module(module)\n"
        "try:\n"
        "    module.rnn_layer(relu=True)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "raised: fused_bptt._C.rnn_layer: set_rnn_layer_fallback was not called" in run.stdout


def test_direct_call_releases_the_gil():
    """Another Python thread runs while the op does, as with torch.ops: the main thread's longest
    pause during a long call is a small part of it (holding the GIL, it would be all of it)."""
    torch.manual_seed(0)
    B, H = 4, 128
    h0, weights = torch.randn(B, H), (torch.randn(H, H) / H**0.5, torch.randn(H, H) / H**0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the op, one for the main thread
    try:
        T, duration = 2000, 0.0
        while duration < 0.1 and T < 1_000_000:  # a call long enough to tell, on any machine
            T *= 2
            x = torch.randn(T, B, H)
            started = time.perf_counter()
            direct(x, h0, *weights, None, None, False, None, None)
            duration = time.perf_counter() - started
        done = threading.Event()

        def call():
            direct(x, h0, *weights, None, None, False, None, None)
            done.set()

        worker = threading.Thread(target=call)
        last, longest = time.perf_counter(), 0.0
        worker.start()
        while not done.is_set():  # the worker takes the GIL from this loop to start its call
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert duration >= 0.1, f"the call took only {duration:.3f} s: too short to tell"
    assert longest < 0.5 * duration, (
        f"the main thread paused {longest:.3f} s during a {duration:.3f} s call"
    )


def test_fused_rnn_with_a_subclass_weight_goes_through_torch_ops():
    """A module whose weight is a tensor subclass (put in place of the parameter) still runs the
    override through the eager path, with the plain module's numbers."""
    torch.manual_seed(0)
    fused = fused_bptt.FusedRNN(3, 4, backend="cpp")
    x = torch.randn(5, 2, 3)
    want = fused(x)
    weight = fused.weight_hh_l0.detach().as_subclass(_Recording)
    del fused.weight_hh_l0
    fused.weight_hh_l0 = weight
    _Recording.seen = []
    got = fused(x)
    assert _Recording.seen, "the override was skipped"
    assert all(torch.equal(g.as_subclass(torch.Tensor), w) for g, w in zip(got, want))

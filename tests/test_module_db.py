"""PyTorch's own ModuleInfo entry for torch.nn.RNN (torch.testing._internal.common_modules), run
against FusedRNN: every sample input through forward parity with nn.RNN (float64, 1e-10),
gradcheck, gradgradcheck with batched grads, and every error input with nn.RNN's error.

The module_db samples are unbatched ([T, I] input), both nonlinearities, with and without bias,
batch_first and bidirectional, two layers; PackedSequence samples are left out until FusedRNN
takes packed input.
"""
import pytest
import torch

import fused_bptt
from fused_bptt import FusedRNN

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="PyTorch's module tests need the expecttest package (pip install expecttest)")
RNN_INFO = next(m for m in common_modules.module_db if m.module_cls is torch.nn.RNN)
BACKENDS = [b for b in fused_bptt.available_backends() if b != "cuda"]


def samples():
    return RNN_INFO.module_inputs_func(RNN_INFO, device="cpu", dtype=torch.float64,
                                       requires_grad=True, training=True)


def error_inputs():
    return RNN_INFO.module_error_inputs_func(RNN_INFO, device="cpu", dtype=torch.float64,
                                             requires_grad=False, training=True)


def sample_id(sample):
    kw = sample.constructor_input.kwargs
    return "-".join([kw["nonlinearity"], "bias" if kw["bias"] else "nobias",
                     "bf" if kw["batch_first"] else "tf", "bi" if kw["bidirectional"] else "uni",
                     "hx" if len(sample.forward_input.args) > 1 else "nohx"])


SAMPLES = samples()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sample", SAMPLES, ids=[sample_id(s) for s in SAMPLES])
def test_module_db_sample(sample, backend):
    ctor = sample.constructor_input
    torch.manual_seed(0)
    ref = torch.nn.RNN(*ctor.args, **ctor.kwargs, dtype=torch.float64)
    fused = FusedRNN(*ctor.args, **ctor.kwargs, dtype=torch.float64, backend=backend)
    fused.load_state_dict(ref.state_dict())
    args = sample.forward_input.args

    for got, want in zip(fused(*args), ref(*args)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    names = [n for n, _ in fused.named_parameters()]
    params = tuple(p.detach().requires_grad_() for p in fused.parameters())

    def functional(*inputs):
        forward_args, p = inputs[:len(args)], inputs[len(args):]
        return torch.func.functional_call(fused, dict(zip(names, p)), forward_args)

    assert torch.autograd.gradcheck(functional, (*args, *params), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(functional, (*args, *params), check_batched_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_db_error_inputs(backend):
    errors = error_inputs()
    assert errors
    for error in errors:
        inputs = error.module_error_input
        ctor = inputs.constructor_input
        with pytest.raises(error.error_type, match=error.error_regex):
            module = FusedRNN(*ctor.args, **ctor.kwargs, backend=backend)
            module(*inputs.forward_input.args, **inputs.forward_input.kwargs)

"""PyTorch's own ModuleInfo entry for torch.nn.RNN (torch.testing._internal.common_modules), run
against FusedRNN: every sample input through forward parity with nn.RNN (float64, 1e-10),
gradcheck, gradgradcheck with batched grads, and every error input with nn.RNN's error.

The module_db samples are unbatched ([T, I] input) and PackedSequence input, both nonlinearities,
with and without bias, batch_first and bidirectional, two layers.
"""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fused_bptt
from fused_bptt import FusedRNN

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules",
    reason="PyTorch's module tests need the expecttest package (pip install expecttest)",
)
RNN_INFO = next(m for m in common_modules.module_db if m.module_cls is torch.nn.RNN)
BACKENDS = [b for b in fused_bptt.available_backends() if b != "cuda"]


def samples():
    return RNN_INFO.module_inputs_func(
        RNN_INFO,
        device="cpu",
        dtype=torch.float64,
        requires_grad=True,
        training=True,
        with_packed_sequence=True,
    )


def error_inputs():
    return RNN_INFO.module_error_inputs_func(
        RNN_INFO, device="cpu", dtype=torch.float64, requires_grad=False, training=True
    )


def sample_id(sample):
    kw = sample.constructor_input.kwargs
    packed = isinstance(sample.forward_input.args[0], PackedSequence)
    return "-".join(
        [
            kw["nonlinearity"],
            "bias" if kw["bias"] else "nobias",
            "bf" if kw["batch_first"] else "tf",
            "bi" if kw["bidirectional"] else "uni",
            "hx" if len(sample.forward_input.args) > 1 else "nohx",
        ]
        + ([f"packed{sample.forward_input.args[0].batch_sizes[0].item()}"] if packed else [])
    )


SAMPLES = samples()


def tensors_of(output):
    """An RNN's (output, h_n) as tensors: a PackedSequence output by its data."""
    out, h_n = output
    return (out.data if isinstance(out, PackedSequence) else out), h_n


# The samples on the compiled backends (the reference is the oracle, tested against nn.RNN in
# tests/test_reference.py); the error inputs on every backend.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"] or ["reference"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[sample_id(s) for s in SAMPLES])
def test_module_db_sample(sample, backend):
    ctor = sample.constructor_input
    torch.manual_seed(0)
    ref = torch.nn.RNN(*ctor.args, **ctor.kwargs, dtype=torch.float64)
    fused = FusedRNN(*ctor.args, **ctor.kwargs, dtype=torch.float64, backend=backend)
    fused.load_state_dict(ref.state_dict())
    args = sample.forward_input.args

    for got, want in zip(tensors_of(fused(*args)), tensors_of(ref(*args))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    names = [n for n, _ in fused.named_parameters()]
    params = tuple(p.detach().requires_grad_() for p in fused.parameters())
    packed = args[0] if isinstance(args[0], PackedSequence) else None
    # gradcheck differentiates tensors: a PackedSequence enters by its data.
    tensor_args = (packed.data, *args[1:]) if packed is not None else args

    def functional(*inputs):
        forward_args, p = list(inputs[: len(args)]), inputs[len(args) :]
        if packed is not None:
            forward_args[0] = PackedSequence(
                forward_args[0], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
        return tensors_of(
            torch.func.functional_call(fused, dict(zip(names, p)), tuple(forward_args))
        )

    inputs = (*tensor_args, *params)
    assert torch.autograd.gradcheck(functional, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(functional, inputs, check_batched_grad=True)


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

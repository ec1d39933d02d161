"""The functional entry points and the autograd.Function over the compiled ops.

    rnn_tanh(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, resets=None,
             lengths=None, backend="auto") -> (y, h_n)
    x: [T, B, I] (time-major), h0: [B, H], weight_ih: [H, I], weight_hh: [H, H], bias_*: [H]
    resets: bool [T, B] (the state entering step t of row b is zero where true), lengths: int64
    [B] in 1..T (row b ends after lengths[b] steps; later steps output 0)
    y: [T, B, H], the hidden state after every step; h_n: [B, H], each row's last one.

Backends: "cuda" (CUDA tensors), "cpp" (CPU tensors), "reference" (pure PyTorch, any device/dtype).
"auto" takes the first of available_backends() that runs the given tensors.
"""

import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ops, reference
from ._checks import check_boundaries, check_layer_args
from .reference import last_state

BACKENDS = ("cuda", "cpp", "reference")
BACKEND_CHOICES = ("auto",) + BACKENDS
# The dtypes each compiled backend's kernels take (bfloat16/float16: float32 arithmetic inside).
_KERNEL_DTYPES = {
    "cpp": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_DEVICE_OF_BACKEND = {"cuda": "cuda", "cpp": "cpu"}


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_runnable_dtype(x: Tensor) -> None:
    """Integer, boolean and float8 tensors: no kernel takes them and the reference has no
    arithmetic for them, so say which dtypes run instead of failing deep inside an op."""
    if not (x.is_floating_point() or x.is_complex()) or x.element_size() < 2:
        raise TypeError(
            f"fused_bptt: x has dtype {x.dtype}, which no backend runs; the kernels "
            f"take {_dtype_names(_KERNEL_DTYPES['cpp'])} (cpp) and "
            f"{_dtype_names(_KERNEL_DTYPES['cuda'])} (cuda); convert the input"
        )


def _find_backends() -> Tuple[str, ...]:
    found = []
    if _ops.has_kernel("CUDA") and torch.cuda.is_available():
        found.append("cuda")
    if _ops.has_kernel("CPU"):
        found.append("cpp")
    found.append("reference")
    return tuple(found)


# Found once, at import: the compiled kernels and the CUDA driver do not come and go within a
# process, and torch.compile then reads a constant instead of tracing the lookup.
_AVAILABLE_BACKENDS = _find_backends()


def available_backends() -> Tuple[str, ...]:
    """The backends that really work here, in preference order."""
    return _AVAILABLE_BACKENDS


def check_backend_name(backend, who: str = "fused_bptt") -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(
            f"{who}: backend must be one of "
            f"{', '.join(repr(b) for b in BACKEND_CHOICES)}, but got {backend!r}"
        )


# resolve_backend's answers, by (backend, device, dtype): they cannot change within a
# process (the compiled kernels and the CUDA driver do not come and go), and an eager forward
# then costs a dict lookup instead of the checks. Errors are raised every time, never stored.
_RESOLVED = {}


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that will run `x`; raises ValueError/RuntimeError for one that cannot."""
    if torch.compiler.is_compiling():  # a traced graph holds the answer as a constant anyway
        return _resolve_backend(backend, x)
    found = resolved_backend(backend, x)
    if found is None:
        found = _RESOLVED[(backend, x.device, x.dtype)] = _resolve_backend(backend, x)
    return found


def resolved_backend(backend: str, x: Tensor) -> Optional[str]:
    """resolve_backend's stored answer for `x`, or None before its first call for x's device and
    dtype (the device itself is the key: cheaper to read than its type)."""
    return _RESOLVED.get((backend, x.device, x.dtype))


def _resolve_backend(backend: str, x: Tensor) -> str:
    check_backend_name(backend)
    _check_runnable_dtype(x)
    if backend == "reference":
        return backend
    if not _ops.loaded():
        _ops.warn_not_loaded()
        if backend == "auto":
            return "reference"
        raise RuntimeError(
            f"fused_bptt: backend {backend!r} is not available because the compiled "
            f"extension did not load ({_ops.LOAD_ERROR}). Rebuild it with: "
            f"{_ops.REINSTALL_COMMAND}"
        )
    available = available_backends()
    if backend == "auto":
        for name in available[:-1]:
            if x.device.type == _DEVICE_OF_BACKEND[name] and x.dtype in _KERNEL_DTYPES[name]:
                return name
        return "reference"
    if backend not in available:
        raise RuntimeError(
            f"fused_bptt: backend {backend!r} is not available here; available "
            f"backends: {available}"
        )
    wanted = _DEVICE_OF_BACKEND[backend]
    if x.device.type != wanted:
        raise ValueError(
            f"fused_bptt: backend {backend!r} runs {wanted} tensors, but x is on {x.device}"
        )
    if x.dtype not in _KERNEL_DTYPES[backend]:
        raise TypeError(
            f"fused_bptt: backend {backend!r} supports "
            f"{_dtype_names(_KERNEL_DTYPES[backend])}, but x is "
            f"{x.dtype}; use backend='reference' or convert the input"
        )
    return backend


def _needs_differentiable_ops(args) -> bool:
    """True where the autograd.Function cannot serve: inside a torch.func transform (grad, vmap,
    jvp, jacrev, ...; also autograd.grad(is_grads_batched=True)) or with forward-mode AD dual
    tensors. There the layer runs the reference's plain PyTorch ops, which every transform
    differentiates and batches exactly (slower, never wrong)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return any(
            t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
            for t in args
        )
    return False


def _forward_op(*args) -> Tensor:
    """The forward op, without the Python autograd kernel registered on it below (that one is for
    traced graphs; here no graph is wanted, and it would cost a Python round trip per call)."""
    if torch.compiler.is_compiling():
        return torch.ops.fused_bptt.rnn_forward(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fused_bptt.rnn_forward(*args)


def _differentiable_grads(saved, relu, grad_y, grad_h_n, resets, lengths):
    """(dx, dh0, dW_ih, dW_hh, db) of one layer made of differentiable ops: the reference
    recomputes the layer and runs its hand-written backward. Used where the backward must itself
    be differentiated (create_graph=True: double backward, gradient penalties, Hessian-vector
    products) or batched (autograd.grad(is_grads_batched=True) vmaps the backward)."""
    x, h0, weight_ih, weight_hh = saved[:4]
    with torch.enable_grad():
        y = reference.rnn_forward(*saved, relu, resets, lengths)
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    return reference.rnn_backward(
        grad_y, x, h0, weight_ih, weight_hh, y, relu, grad_h_n, resets, lengths
    )


def _grads(saved, y, relu, grad_y, grad_h_n, resets, lengths):
    """The backward of one layer: the 9 gradients of (x, h0, weight_ih, weight_hh, bias_ih,
    bias_hh, relu, resets, lengths) from the saved inputs and y; the compiled backward op adds
    grad_h_n at each row's last step."""
    # (torch.compile traces this backward once, with grad mode on, into a graph that is never
    # differentiated again: AOTAutograd refuses double backward itself.)
    if not torch.compiler.is_compiling() and (
        torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        dx, dh0, dw_ih, dw_hh, db = _differentiable_grads(
            saved, relu, grad_y, grad_h_n, resets, lengths
        )
    else:
        x, h0, weight_ih, weight_hh = saved[:4]
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        dx, dh0, dw_ih, dw_hh, db = torch.ops.fused_bptt.rnn_backward(
            grad_y, x, h0, weight_ih, weight_hh, y, relu, grad_h_n, resets, lengths
        )
    # The two biases get equal gradients; give each its own tensor so their .grad never alias.
    bias_ih, bias_hh = saved[4:]
    db_ih = db if bias_ih is not None else None
    db_hh = (db.clone() if bias_ih is not None else db) if bias_hh is not None else None
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None, None


def _rnn_layer_grads(
    grad_y, grad_h_n, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets=None, lengths=None
):
    """fused_bptt::rnn_layer_grads, which the C++ autograd of rnn_layer (csrc/autograd.cpp) calls
    for a differentiable backward; absent biases get an empty entry."""
    saved = (x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    dx, dh0, dw_ih, dw_hh, db = _differentiable_grads(
        saved, relu, grad_y, grad_h_n, resets, lengths
    )
    empty = x.new_empty(0)
    return [
        dx,
        dh0,
        dw_ih,
        dw_hh,
        db if bias_ih is not None else empty,
        (db.clone() if bias_ih is not None else db) if bias_hh is not None else empty,
    ]


class RNNLayerFunction(torch.autograd.Function):
    """One layer, one direction, through the compiled ops; returns (y, h_n). The autograd of
    rnn_layer (csrc/autograd.cpp) in Python, for the paths that need a Python Function: Dynamo
    traces it under torch.compile (the compiled graph is functional: an in-place change of y
    after the forward cannot reach the saved y), and saved-tensor hooks (activation checkpointing,
    offloading) see every tensor it saves.

    Saved for backward: x, h0, the weights and y, the layer's own output (no extra [T, B, H]
    tensor: the nonlinearity's derivative and h_{t-1} are both read off y), and resets/lengths
    when given. h_n is an output of its own (a copy of each row's last step of y, so a
    carried-over state does not keep the chunk's y alive); the backward op adds its gradient at
    that step itself.
    """

    @staticmethod
    def forward(
        ctx, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets=None, lengths=None
    ):
        y = _forward_op(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets, lengths)
        ctx.relu = relu
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, resets, lengths, y)
        return y, last_state(y, lengths)

    @staticmethod
    def backward(ctx, grad_y, grad_h_n):
        if grad_y is None and grad_h_n is None:
            return (None,) * 9
        *saved, resets, lengths, y = ctx.saved_tensors
        return _grads(saved, y, ctx.relu, grad_y, grad_h_n, resets, lengths)


def _op_setup_context(ctx, inputs, output):
    *args, relu, resets, lengths = inputs
    ctx.relu = relu
    ctx.save_for_backward(*args, resets, lengths, output)


def _op_backward(ctx, grad_y):
    *saved, resets, lengths, y = ctx.saved_tensors
    return _grads(saved, y, ctx.relu, grad_y, None, resets, lengths)


if _ops.loaded():
    # Autograd of the forward op itself, for code that calls it outside the autograd.Function:
    # a torch.jit.trace graph (which records the op) and direct calls of torch.ops.fused_bptt.
    torch.library.register_autograd(
        "fused_bptt::rnn_forward", _op_backward, setup_context=_op_setup_context
    )
    _LIBRARY = torch.library.Library("fused_bptt", "IMPL")
    _LIBRARY.impl("rnn_layer_grads", _rnn_layer_grads, "CompositeImplicitAutograd")


def layer_forward(
    backend: str,
    x: Tensor,
    h0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    relu: bool,
    resets: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One layer on a resolved backend, arguments already checked; returns (y, h_n). h0 may be
    [B, H] or [1, B, H] (a one-layer module's hx), and h_n then has the same shape: the C++ op
    takes either, and no view (an autograd node each) is taken on its eager training path."""
    compiling = torch.compiler.is_compiling()
    if (
        backend != "reference"
        and not compiling
        and torch.is_grad_enabled()
        and (x.requires_grad or h0.requires_grad or weight_ih.requires_grad)
        and not torch.jit.is_tracing()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        and not _needs_differentiable_ops((x, h0, weight_ih, weight_hh, bias_ih, bias_hh))
    ):
        # autograd in C++: eager training (the common case, tested first)
        return torch.ops.fused_bptt.rnn_layer(
            x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets, lengths
        )
    lead = h0.dim() == 3
    if lead:
        h0 = h0.squeeze(0)
    args = (x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    bounds = (resets, lengths)
    if backend == "reference" or (not compiling and _needs_differentiable_ops(args)):
        y = reference.rnn_forward(*args, relu, *bounds)
    elif torch.jit.is_tracing():
        # The op with its registered autograd: one graph for the trace, with or without grad.
        y = torch.ops.fused_bptt.rnn_forward(*args, relu, *bounds)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        # The Python Function: Dynamo traces it, and saved-tensor hooks see y through it; and
        # the C++ op where only a weight other than weight_ih requires grad.
        if compiling or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
            y, h_n = RNNLayerFunction.apply(*args, relu, *bounds)
        else:
            y, h_n = torch.ops.fused_bptt.rnn_layer(*args, relu, *bounds)
        return y, (h_n.unsqueeze(0) if lead else h_n)
    else:  # no graph is recorded: the op alone, without the autograd.Function's bookkeeping
        y = _forward_op(*args, relu, *bounds)
    # A copy, not a view: a carried-over h_n must not keep the whole chunk's y alive.
    h_n = last_state(y, lengths)
    return y, (h_n.unsqueeze(0) if lead else h_n)


def rnn_layer(
    x: Tensor,
    h0: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    *,
    relu: bool = False,
    resets: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One layer of a tanh (or relu) RNN over a whole chunk; returns (y [T,B,H], h_n [B,H])."""
    check_layer_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    # The range of lengths is read only in eager mode (a compiled graph would break on it; the
    # C++ kernels check it again).
    check_boundaries(x, resets, lengths, values=not torch.compiler.is_compiling())
    return layer_forward(
        resolve_backend(backend, x),
        x,
        h0,
        weight_ih,
        weight_hh,
        bias_ih,
        bias_hh,
        relu,
        resets,
        lengths,
    )


def _one_nonlinearity(name: str, relu: bool):
    """rnn_tanh and rnn_relu: rnn_layer with the nonlinearity fixed; their signature is
    rnn_layer's without `relu` (passing relu= to them is a TypeError)."""

    def layer(*args, **kwargs) -> Tuple[Tensor, Tensor]:
        return rnn_layer(*args, relu=relu, **kwargs)

    signature = inspect.signature(rnn_layer)
    layer.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "relu"]
    )
    layer.__name__ = layer.__qualname__ = name
    act = "relu" if relu else "tanh"
    layer.__doc__ = (
        f"h_t = {act}(x_t W_ih^T + b_ih + h_{{t-1}} W_hh^T + b_hh) over T steps; returns "
        "(y, h_n).\n    resets / lengths: see the module docstring."
    )
    return layer


rnn_tanh = _one_nonlinearity("rnn_tanh", relu=False)
rnn_relu = _one_nonlinearity("rnn_relu", relu=True)

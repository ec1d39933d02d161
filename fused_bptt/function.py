"""The functional entry points and the autograd.Function over the compiled ops.

    rnn_tanh(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, backend="auto") -> (y, h_n)
    x: [T, B, I] (time-major), h0: [B, H], weight_ih: [H, I], weight_hh: [H, H], bias_*: [H]
    y: [T, B, H], the hidden state after every step; h_n: [B, H], the last one.

Backends: "cuda" (CUDA tensors), "cpp" (CPU tensors), "reference" (pure PyTorch, any device/dtype).
"auto" takes the first of available_backends() that runs the given tensors.
"""
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops, reference

BACKENDS = ("cuda", "cpp", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def available_backends() -> Tuple[str, ...]:
    """The backends that really work here, in preference order.

    Computed once: the compiled kernels and the CUDA driver do not come and go within a process.
    """
    found = []
    if _ops.has_kernel("CUDA") and torch.cuda.is_available():
        found.append("cuda")
    if _ops.has_kernel("CPU"):
        found.append("cpp")
    found.append("reference")
    return tuple(found)


def _device_of_backend(backend: str) -> str:
    return {"cuda": "cuda", "cpp": "cpu"}[backend]


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that will run `x`; raises ValueError/RuntimeError for one that cannot."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"fused_bptt: backend must be one of 'auto', 'cuda', 'cpp', 'reference', "
                         f"but got {backend!r}")
    if backend == "reference":
        return backend
    if not _ops.loaded():
        _ops.warn_not_loaded()
        if backend == "auto":
            return "reference"
        raise RuntimeError(f"fused_bptt: backend {backend!r} is not available because the compiled "
                           f"extension did not load ({_ops.LOAD_ERROR}). Rebuild it with: "
                           f"{_ops.REINSTALL_COMMAND}")
    available = available_backends()
    if backend == "auto":
        for name in available[:-1]:
            if x.device.type == _device_of_backend(name) and x.dtype in _KERNEL_DTYPES:
                return name
        return "reference"
    if backend not in available:
        raise RuntimeError(f"fused_bptt: backend {backend!r} is not available here; available "
                           f"backends: {available}")
    wanted = _device_of_backend(backend)
    if x.device.type != wanted:
        raise ValueError(f"fused_bptt: backend {backend!r} runs {wanted} tensors, but x is on "
                         f"{x.device}")
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"fused_bptt: backend {backend!r} supports float32 and float64, but x is "
                        f"{x.dtype}; use backend='reference' or convert the input")
    return backend


class RNNLayerFunction(torch.autograd.Function):
    """One layer, one direction, through the compiled ops; returns (y, h_n).

    Saved for backward: x, h0, the weights and y, the layer's own output (no extra [T, B, H]
    tensor: the nonlinearity's derivative and h_{t-1} are both read off y).
    h_n is an output of its own (a copy of y[T-1], so a carried-over state does not keep the
    chunk's y alive); its gradient is folded into grad_y[T-1] here, which is cheaper than
    autograd's route through a select of y (a zero [T, B, H] tensor and a full add).
    """

    @staticmethod
    def forward(ctx, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu):
        y = torch.ops.fused_bptt.rnn_forward(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu)
        ctx.save_for_backward(x, h0, weight_ih, weight_hh, y)
        ctx.relu = relu
        ctx.bias_given = (bias_ih is not None, bias_hh is not None)
        ctx.set_materialize_grads(False)
        return y, y[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h_n):
        x, h0, weight_ih, weight_hh, y = ctx.saved_tensors
        if grad_y is None and grad_h_n is None:
            return (None,) * 7
        if grad_h_n is not None:
            # A contiguous copy of our own: the incoming grad_y is not ours to modify.
            grad_y = (torch.zeros_like(y) if grad_y is None
                      else grad_y.clone(memory_format=torch.contiguous_format))
            grad_y[-1] += grad_h_n
        dx, dh0, dw_ih, dw_hh, db = torch.ops.fused_bptt.rnn_backward(
            grad_y, x, h0, weight_ih, weight_hh, y, ctx.relu)
        has_ih, has_hh = ctx.bias_given
        # The two biases get equal gradients; give each its own tensor so their .grad never alias.
        db_ih = db if has_ih else None
        db_hh = (db.clone() if has_ih else db) if has_hh else None
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None


def _check_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh) -> None:
    """User-facing checks shared by every backend (the ops check again in C++)."""
    for name, t in (("x", x), ("h0", h0), ("weight_ih", weight_ih), ("weight_hh", weight_hh)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fused_bptt: {name} must be a Tensor, but got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"fused_bptt: x must be 3-D [T, B, I], but got shape {tuple(x.shape)}")
    T, B, I = x.shape
    if T < 1:
        raise ValueError("fused_bptt: x must hold at least one time step, but T = 0")
    if weight_hh.dim() != 2 or weight_hh.shape[0] != weight_hh.shape[1]:
        raise ValueError(f"fused_bptt: weight_hh must be [H, H], but got shape "
                         f"{tuple(weight_hh.shape)}")
    H = weight_hh.shape[0]
    expected = {"h0": (h0, (B, H)), "weight_ih": (weight_ih, (H, I)),
                "bias_ih": (bias_ih, (H,)), "bias_hh": (bias_hh, (H,))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"fused_bptt: {name} must have shape {shape}, but got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"fused_bptt: {name} must have dtype {x.dtype} (the dtype of x), "
                            f"but got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"fused_bptt: {name} must be on {x.device} (the device of x), "
                             f"but is on {t.device}")


def rnn_layer(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None, *,
              relu: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """One layer of a tanh (or relu) RNN over a whole chunk; returns (y [T,B,H], h_n [B,H])."""
    _check_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    name = resolve_backend(backend, x)
    args = (x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
    if name == "reference":
        y = reference.rnn_forward(*args, relu)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return RNNLayerFunction.apply(*args, relu)
    else:  # inference: the op alone, without the autograd.Function's bookkeeping
        y = torch.ops.fused_bptt.rnn_forward(*args, relu)
    # A copy, not a view: a carried-over h_n must not keep the whole chunk's y alive.
    return y, y[-1].clone()


def rnn_tanh(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
             bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None, *,
             backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) over T steps; returns (y, h_n)."""
    return rnn_layer(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu=False, backend=backend)


def rnn_relu(x: Tensor, h0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
             bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None, *,
             backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """h_t = relu(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) over T steps; returns (y, h_n)."""
    return rnn_layer(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu=True, backend=backend)

"""The argument checks of one fused RNN layer, in Python: shapes, dtypes and devices.

One function serves the functional entry point (fused_bptt.function) and the fake kernels of the
ops (fused_bptt._ops), so a shape error is caught the same way in eager mode, under FakeTensor and
under torch.compile (the checks compare sizes, which may be symbolic there: no size is turned into
a constant). The C++ kernels run the same checks again (csrc/checks.cpp).

    x: [T, B, I], h0: [B, H], weight_ih: [H, I], weight_hh: [H, H], bias_*: [H] or None
"""

import torch
from torch import Tensor


def _check_tensor(name, t, shape, x) -> None:
    """t must be a tensor of `shape` with x's dtype and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"fused_bptt: {name} must be a Tensor, but got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"fused_bptt: {name} must have shape {shape}, but got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(
            f"fused_bptt: {name} must have dtype {x.dtype} (the dtype of x), but got {t.dtype}"
        )
    if t.device != x.device:
        raise ValueError(
            f"fused_bptt: {name} must be on {x.device} (the device of x), but is on {t.device}"
        )


def check_layer_args(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None) -> None:
    """Raises TypeError/ValueError naming the argument, what was expected and what came."""
    for name, t in (("x", x), ("h0", h0), ("weight_ih", weight_ih), ("weight_hh", weight_hh)):
        if t is None:
            raise TypeError(f"fused_bptt: {name} is missing (got None); expected a Tensor")
        if not isinstance(t, Tensor):
            raise TypeError(f"fused_bptt: {name} must be a Tensor, but got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"fused_bptt: x must be 3-D [T, B, I], but got shape {tuple(x.shape)}")
    T, B, I = x.shape
    if T < 1:
        raise ValueError("fused_bptt: x must hold at least one time step, but T = 0")
    if weight_hh.dim() != 2 or weight_hh.shape[0] != weight_hh.shape[1]:
        raise ValueError(
            f"fused_bptt: weight_hh must be [H, H], but got shape {tuple(weight_hh.shape)}"
        )
    H = weight_hh.shape[0]
    for name, t, shape in (
        ("weight_hh", weight_hh, (H, H)),
        ("h0", h0, (B, H)),
        ("weight_ih", weight_ih, (H, I)),
        ("bias_ih", bias_ih, (H,)),
        ("bias_hh", bias_hh, (H,)),
    ):
        if t is not None:
            _check_tensor(name, t, shape, x)


def check_backward_args(grad_y, x, h0, weight_ih, weight_hh, y, grad_h_n=None) -> None:
    """The forward checks, plus grad_y and y [T, B, H] and grad_h_n [B, H] (when given)."""
    check_layer_args(x, h0, weight_ih, weight_hh)
    T, B, _ = x.shape
    H = weight_hh.shape[0]
    for name, t in (("y", y), ("grad_y", grad_y)):
        if t is None:
            raise TypeError(f"fused_bptt: {name} is missing (got None); expected a Tensor")
        _check_tensor(name, t, (T, B, H), x)
    if grad_h_n is not None:
        _check_tensor("grad_h_n", grad_h_n, (B, H), x)


def _check_boundary(name, t, dtype, layout, shape, meaning, x) -> None:
    """t (resets or lengths) must be a `dtype` tensor of `shape` (`layout` names its dims) on x's
    device; `meaning` says what its values are."""
    kind = f"{'an' if dtype == torch.int64 else 'a'} {str(dtype).replace('torch.', '')}"
    if not isinstance(t, Tensor):
        raise TypeError(
            f"fused_bptt: {name} must be {kind} Tensor {layout}, but got {type(t).__name__}"
        )
    if t.dtype != dtype:
        raise TypeError(
            f"fused_bptt: {name} must be {kind} tensor {layout} ({meaning}), but got dtype "
            f"{t.dtype}"
        )
    if tuple(t.shape) != shape:
        raise ValueError(
            f"fused_bptt: {name} must have shape {layout} = {shape}, but got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(
            f"fused_bptt: {name} must be on {x.device} (the device of x), but is on {t.device}"
        )


def check_boundaries(x, resets=None, lengths=None, *, values: bool = True) -> None:
    """resets: bool [T, B]; lengths: int64 [B] with values in 1..T, both on x's device.

    values=False skips the range check of lengths (it reads the data: not possible on fake
    tensors, and a device sync on CUDA that the C++ kernels do anyway)."""
    T, B = x.shape[0], x.shape[1]
    if resets is not None:
        meaning = "true where the state entering step t of row b is zero"
        _check_boundary("resets", resets, torch.bool, "[T, B]", (T, B), meaning, x)
    if lengths is not None:
        meaning = "the number of valid steps of each row"
        _check_boundary("lengths", lengths, torch.int64, "[B]", (B,), meaning, x)
        if values and B > 0:
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > T:
                raise ValueError(
                    f"fused_bptt: lengths must lie in 1..T = 1..{T}, but got values "
                    f"from {lo} to {hi}"
                )


def check_bool_layout(who, name, t, layout, expected, like, like_name, meaning="") -> None:
    """t must be a bool tensor of shape `expected` (`layout` names its dims, as the caller lays
    out `like`) on like's device: FusedRNN's resets, StatefulTBPTT's boundaries. `meaning`, when
    given, is appended to the layout in the dtype error ("..., true where ...")."""
    if not isinstance(t, Tensor) or t.dtype != torch.bool:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{who}: {name} must be a bool tensor {layout}{meaning}, but got {got}")
    if tuple(t.shape) != expected:
        raise ValueError(
            f"{who}: {name} must have shape {layout} = {expected} for {like_name} of shape "
            f"{tuple(like.shape)}, but got {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(
            f"{who}: {name} must be on {like.device} (the device of {like_name}), but is on "
            f"{t.device}"
        )

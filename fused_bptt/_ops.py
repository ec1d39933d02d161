"""Loads the compiled library fused_bptt._C (guarded) and registers the fake kernels of its ops.

If _C cannot be loaded the package still imports: every call then runs the pure-PyTorch reference,
and a warning naming the exact reinstall command is given once.
"""
import importlib
import warnings

import torch

from ._checks import check_backward_args, check_boundaries, check_layer_args

REINSTALL_COMMAND = ("pip install torch==2.13.0 ninja && "
                     "pip install --no-build-isolation --force-reinstall --no-deps .  "
                     "(from the fused_bptt source checkout)")

try:
    # Loading the library registers torch.ops.fused_bptt.* and its CPU/CUDA kernels.
    _C = importlib.import_module("fused_bptt._C")
    LOAD_ERROR = None
except ImportError as error:  # a missing or broken build: fall back, but say so
    _C = None
    LOAD_ERROR = error

_warned = False


def loaded() -> bool:
    return _C is not None


def warn_not_loaded() -> None:
    """Warns once that the compiled ops are missing and how to get them."""
    global _warned
    if _warned or LOAD_ERROR is None:
        return
    _warned = True
    warnings.warn(
        f"fused_bptt: the compiled extension fused_bptt._C could not be loaded ({LOAD_ERROR}); "
        f"using the slow pure-PyTorch reference backend. Rebuild it with: {REINSTALL_COMMAND}",
        RuntimeWarning, stacklevel=3)


def has_kernel(dispatch_key: str) -> bool:
    """Whether both ops have a kernel registered for `dispatch_key` ("CPU" or "CUDA")."""
    if not loaded():
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_bptt::{op}", dispatch_key)
               for op in ("rnn_forward", "rnn_backward"))


if loaded():
    # The fake (meta) kernels: the checks of the real kernels, in Python so that sizes may be
    # symbolic under torch.compile(dynamic=True), then outputs of the right shape. They also serve
    # as the Meta kernels, so a meta tensor among CPU tensors is a device error here, never
    # uninitialised memory.
    @torch.library.register_fake("fused_bptt::rnn_forward")
    def _rnn_forward_fake(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets=None,
                          lengths=None):
        check_layer_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
        check_boundaries(x, resets, lengths, values=False)
        return x.new_empty(x.shape[0], x.shape[1], weight_hh.shape[0])

    @torch.library.register_fake("fused_bptt::rnn_backward")
    def _rnn_backward_fake(grad_y, x, h0, weight_ih, weight_hh, y, relu, grad_h_n=None,
                           resets=None, lengths=None):
        check_backward_args(grad_y, x, h0, weight_ih, weight_hh, y, grad_h_n)
        check_boundaries(x, resets, lengths, values=False)
        return (x.new_empty(x.shape), x.new_empty(h0.shape), x.new_empty(weight_ih.shape),
                x.new_empty(weight_hh.shape), x.new_empty(weight_hh.shape[0]))

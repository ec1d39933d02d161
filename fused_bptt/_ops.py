"""Loads the compiled library fused_bptt._C (guarded) and registers the fake kernels of its ops.

If _C cannot be used the package still imports: every call then runs the pure-PyTorch reference,
and a warning saying why (not built; or built against another torch) and naming the rebuild
command is given once.
"""

import importlib
import importlib.util
import re
import warnings

import torch

from ._checks import check_backward_args, check_boundaries, check_layer_args

# No torch version in it: the package accepts a range, and the rebuild must use the torch installed.
REINSTALL_COMMAND = (
    "pip install ninja && pip install --no-build-isolation --force-reinstall --no-deps .  "
    "(from the fused_bptt source checkout, in the environment that runs it)"
)

# Put into the library by csrc/build_info.cpp, from setup.py.
_BUILD_INFO = re.compile(rb"fused_bptt built against torch ([^\0\s]+)\0")


def built_against(library_path):
    """The torch version the library file at `library_path` was compiled against, read from the
    marker csrc/build_info.cpp puts in it (no loading needed), or None where there is none."""
    try:
        with open(library_path, "rb") as f:
            found = _BUILD_INFO.search(f.read())
    except (OSError, TypeError):
        return None
    return found.group(1).decode() if found else None


def load_problem(error, library_path, running=torch.__version__):
    """Why fused_bptt._C is not used, in words that say what to do."""
    if library_path is None:
        return f"fused_bptt._C is not built ({error})"
    built = built_against(library_path)
    if built is not None and built != running:
        return (
            f"fused_bptt._C was built against torch {built}, running torch {running}: "
            f"it must be rebuilt"
        )
    return f"fused_bptt._C could not be loaded ({error})"


def _load():
    """(the _C module or None, None or the problem)."""
    try:
        # Loading the library registers torch.ops.fused_bptt.* and its CPU/CUDA kernels.
        module = importlib.import_module("fused_bptt._C")
    except ImportError as error:  # a missing build, or one for another torch (undefined symbols)
        spec = importlib.util.find_spec("fused_bptt._C")
        return None, load_problem(error, spec.origin if spec else None)
    # Torch's C++ ABI is not promised between releases, so a library that loads against another
    # torch is still not trusted with the math.
    built = built_against(module.__file__)
    if built is not None and built != torch.__version__:
        return None, load_problem("loaded, not used", module.__file__)
    return module, None


_C, LOAD_ERROR = _load()
_warned = False


def loaded() -> bool:
    return _C is not None


def warn_not_loaded() -> None:
    """Warns once that the compiled ops are not used, why, and how to get them."""
    global _warned
    if _warned or LOAD_ERROR is None:
        return
    _warned = True
    warnings.warn(
        f"fused_bptt: {LOAD_ERROR}; using the slow pure-PyTorch reference backend. "
        f"Rebuild it with: {REINSTALL_COMMAND}",
        RuntimeWarning,
        stacklevel=3,
    )


def has_kernel(dispatch_key: str) -> bool:
    """Whether both ops have a kernel registered for `dispatch_key` ("CPU" or "CUDA")."""
    if not loaded():
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_bptt::{op}", dispatch_key)
        for op in ("rnn_forward", "rnn_backward")
    )


if loaded():
    # FusedRNN's eager call of rnn_layer: fused_bptt._C.rnn_layer (csrc/eager_call.cpp), which
    # hands the arguments it does not take itself to the builtin that torch.ops'
    # OpOverload.__call__ calls (that handles them or raises); a library built without it: that
    # builtin.
    _overload = torch.ops.fused_bptt.rnn_layer.default
    _builtin = getattr(_overload, "_op", _overload)
    EAGER_RNN_LAYER = getattr(_C, "rnn_layer", None) or _builtin
    if EAGER_RNN_LAYER is not _builtin:
        _C.set_rnn_layer_fallback(_builtin)

    # The fake (meta) kernels: the checks of the real kernels, in Python so that sizes may be
    # symbolic under torch.compile(dynamic=True), then outputs of the right shape. They also serve
    # as the Meta kernels, so a meta tensor among CPU tensors is a device error here, never
    # uninitialised memory.
    @torch.library.register_fake("fused_bptt::rnn_forward")
    def _rnn_forward_fake(
        x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets=None, lengths=None
    ):
        check_layer_args(x, h0, weight_ih, weight_hh, bias_ih, bias_hh)
        check_boundaries(x, resets, lengths, values=False)
        return x.new_empty(x.shape[0], x.shape[1], weight_hh.shape[0])

    @torch.library.register_fake("fused_bptt::rnn_backward")
    def _rnn_backward_fake(
        grad_y, x, h0, weight_ih, weight_hh, y, relu, grad_h_n=None, resets=None, lengths=None
    ):
        check_backward_args(grad_y, x, h0, weight_ih, weight_hh, y, grad_h_n)
        check_boundaries(x, resets, lengths, values=False)
        return (
            x.new_empty(x.shape),
            x.new_empty(h0.shape),
            x.new_empty(weight_ih.shape),
            x.new_empty(weight_hh.shape),
            x.new_empty(weight_hh.shape[0]),
        )

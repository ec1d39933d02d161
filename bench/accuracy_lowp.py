"""Accuracy of FusedRNN in bfloat16 and float16 against float64, next to torch.nn.RNN's in the
same dtype.

    python bench/accuracy_lowp.py            # the table in the README, about a minute on 2 cores

One layer, input size = hidden size. For each dtype and T/B/H, the weights (nn.RNN's
initialisation), x ~ N(0, 1), h0 ~ N(0, 0.25) and the output gradients dL/dy, dL/dh_n ~ N(0, 1) are
drawn once and rounded to the dtype; then, from those same numbers,
    reference   one layer in float64 (fused_bptt.reference, differentiated by autograd)
    fused       FusedRNN(backend="cpp") in the dtype (float32 arithmetic, the carried state
                rounded to the dtype at every step: see csrc/cpu/rnn_cpu_lowp.cpp)
    nn          torch.nn.RNN in the dtype
    f32 state   the design not taken: the float32 kernels on the same numbers, outputs rounded to
                the dtype once at the end (the state stays float32 inside the call)
and each is compared with the reference:
    y:         max |y - y_ref| / max |y_ref|            (h_n is y[T-1])
    gradients: ||g - g_ref||_2 / ||g_ref||_2  for x, h0, W_ih, W_hh, b_ih, b_hh.
tests/test_lowp.py asserts with these same functions that fused <= 1.5x nn for every quantity.
"""

import argparse
import os

import torch

import fused_bptt
from fused_bptt import reference

DTYPES = (torch.bfloat16, torch.float16)
SHAPES = ((64, 16, 128), (32, 8, 512), (200, 4, 64))  # T, B, H: the shapes
QUANTITIES = ("y", "dx", "dh0", "dW_ih", "dW_hh", "db_ih", "db_hh")
IMPLS = ("fused", "nn", "f32 state")


def make_problem(dtype, T, B, H, seed=0, relu=False):
    """nn.RNN in `dtype` and its inputs and output gradients, all rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rnn = torch.nn.RNN(H, H, nonlinearity="relu" if relu else "tanh").to(dtype)
    x = torch.randn(T, B, H, generator=g).to(dtype)
    h0 = (0.5 * torch.randn(B, H, generator=g)).to(dtype)
    gy = torch.randn(T, B, H, generator=g).to(dtype)
    ghn = torch.randn(B, H, generator=g).to(dtype)
    return rnn, x, h0, gy, ghn


def _outputs_and_grads(run, x, h0, params, gy, ghn):
    """y and the gradients of (y * gy).sum() + (h_n * ghn).sum() for x, h0 and params."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, *params)]
    y, h_n = run(*leaves)
    grads = torch.autograd.grad((y * gy).sum() + (h_n * ghn).sum(), leaves)
    return [y.detach(), *grads]


def run_impl(impl, rnn, x, h0, gy, ghn, relu=False):
    """[y, dx, dh0, dW_ih, dW_hh, db_ih, db_hh] of one implementation, in float64."""
    params = [p.detach() for p in rnn.parameters()]  # weight_ih, weight_hh, bias_ih, bias_hh
    dtype = x.dtype
    if impl == "reference":
        up = lambda t: t.double()  # noqa: E731
        out = _outputs_and_grads(
            lambda x, h0, *w: _reference_layer(x, h0, w, relu),
            up(x),
            up(h0),
            [up(p) for p in params],
            up(gy),
            up(ghn),
        )
    elif impl == "fused":
        out = _outputs_and_grads(
            lambda x, h0, *w: fused_bptt.function.rnn_layer(x, h0, *w, relu=relu, backend="cpp"),
            x,
            h0,
            params,
            gy,
            ghn,
        )
    elif impl == "nn":

        def nn_run(x, h0, *w):
            y, h_n = (
                torch._VF.rnn_relu(x, h0[None], w, True, 1, 0.0, False, False, False)
                if relu
                else torch._VF.rnn_tanh(x, h0[None], w, True, 1, 0.0, False, False, False)
            )
            return y, h_n[0]

        out = _outputs_and_grads(nn_run, x, h0, params, gy, ghn)
    elif impl == "f32 state":
        f = lambda t: t.float()  # noqa: E731
        out = _outputs_and_grads(
            lambda x, h0, *w: fused_bptt.function.rnn_layer(x, h0, *w, relu=relu, backend="cpp"),
            f(x),
            f(h0),
            [f(p) for p in params],
            f(gy),
            f(ghn),
        )
        out = [t.to(dtype) for t in out]
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return [t.double() for t in out]


def _reference_layer(x, h0, w, relu):
    y = reference.rnn_forward(x, h0, *w, relu)
    return y, y[-1]


def errors(got, want):
    """{quantity: relative error} as the module docstring defines them."""
    out = {}
    for name, a, b in zip(QUANTITIES, got, want):
        if name == "y":
            out[name] = ((a - b).abs().max() / b.abs().max()).item()
        else:
            out[name] = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
    return out


def measure(dtype, T, B, H, impls=IMPLS, seed=0, relu=False):
    """{impl: {quantity: error against the float64 reference}} for one problem."""
    rnn, x, h0, gy, ghn = make_problem(dtype, T, B, H, seed, relu)
    want = run_impl("reference", rnn, x, h0, gy, ghn, relu)
    return {impl: errors(run_impl(impl, rnn, x, h0, gy, ghn, relu), want) for impl in impls}


def table(results):
    """Markdown lines: per dtype and shape, the errors of each implementation."""
    lines = [
        "| dtype | T / B / H | impl | " + " | ".join(QUANTITIES) + " | worst fused/nn |",
        "|---" * (len(QUANTITIES) + 4) + "|",
    ]
    for (dtype, shape), errs in results.items():
        worst = max(errs["fused"][q] / errs["nn"][q] for q in QUANTITIES)
        for i, impl in enumerate(errs):
            head = (
                (str(dtype).replace("torch.", ""), "/".join(map(str, shape)))
                if i == 0
                else ("", "")
            )
            cells = [
                *head,
                impl,
                *(f"{errs[impl][q]:.1e}" for q in QUANTITIES),
                f"{worst:.2f}" if impl == "fused" else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", "accuracy_lowp.md"
        ),
    )
    args = p.parse_args(argv)
    results = {(d, s): measure(d, *s) for d in DTYPES for s in SHAPES}
    lines = table(results)
    lines.append(
        f"\nstep kernel: FUSED_BPTT_CPU_ISA={os.environ.get('FUSED_BPTT_CPU_ISA', '')!r}"
        f", torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
    )
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

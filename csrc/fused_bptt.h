// fused_bptt.h: the contract every backend of the fused RNN ops implements.
//
// One layer, one direction, time-major:
//   x:         [T, B, I]  input of the chunk (T >= 1)
//   h0:        [B, H]     hidden state before step 0
//   weight_ih: [H, I]     input-to-hidden weights
//   weight_hh: [H, H]     hidden-to-hidden weights
//   bias_ih:   [H]        optional
//   bias_hh:   [H]        optional
//   y:         [T, B, H]  y_t = h_t, the output of every step; y[T-1] is h_n
//
// Forward:   z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh,   h_t = act(z_t),
//            act = tanh, or relu when `relu` is true.
//            The input projection of all T steps is one GEMM over the T*B rows; only the
//            recurrence h_{t-1} W_hh^T is sequential. The only tensor saved for backward is y:
//            act'(z_t) is 1 - y_t^2 (tanh) or [y_t > 0] (relu), and h_{t-1} is y_{t-1} (h0 at t = 0).
//
// Backward (one call, reverse time), given grad_y = dL/dy [T, B, H] and optionally
// grad_h_n = dL/dh_n [B, H] (h_n is y[T-1]; its gradient is added to grad_y[T-1] inside the op, so
// the caller never builds a [T, B, H] sum):
//            dz_t   = (grad_y_t + [t = T-1] grad_h_n + dz_{t+1} W_hh) * act'(z_t)   (dz_T = 0)
//            dh0    = dz_0 W_hh
//            dW_hh  = sum_t dz_t^T h_{t-1}      dW_ih = sum_t dz_t^T x_t
//            db     = sum_t sum_b dz_t           (the gradient of b_ih and of b_hh alike)
//            dx_t   = dz_t W_ih
//   returns (dx [T,B,I], dh0 [B,H], dW_ih [H,I], dW_hh [H,H], db [H]).
//
// Boundaries (both optional; the same semantics on every backend):
//   resets:  [T, B] bool. Where resets[t, b], the state entering step t of row b is zero:
//            z_t = x_t W_ih^T + b + 0 W_hh^T there, and no gradient crosses the reset (dh_{t-1} of
//            that row gets nothing from step t; dh0 of a row reset at t = 0 is zero).
//   lengths: [B] int64 on x's device, 1 <= lengths[b] <= T. Steps t >= lengths[b] output 0 and leave
//            row b's state unchanged (their dz is 0 whatever grad_y holds); h_n[b] is
//            y[lengths[b] - 1, b], so grad_h_n is added at step lengths[b] - 1 (T - 1 without
//            lengths). A reset at a step t >= lengths[b] changes nothing.
//   Neither costs an extra [T, B, H] tensor: act' and h_{t-1} are still read off y (h_{t-1} of an
//   active step t is y[t-1], or 0 where resets[t]).
//
// Inputs may be non-contiguous: every backend makes them contiguous itself.
// Supported dtypes: float32 and float64 on every backend, bfloat16 and float16 on the CPU (float32
// arithmetic inside: cpu/rnn_cpu_lowp.cpp); all tensors share one dtype and one device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace fused_bptt {

struct RnnShape {
  int64_t T, B, I, H;
};

// Validates the forward arguments (csrc/checks.cpp) (shapes, dtypes, devices) and returns the sizes.
// Errors say what was expected and what came.
RnnShape check_forward_inputs(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
                              const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                              const std::optional<at::Tensor>& bias_hh);

// Validates resets ([T, B] bool) and lengths ([B] int64, 1..T, on x's device) when given.
void check_boundaries(const at::Tensor& x, const std::optional<at::Tensor>& resets,
                      const std::optional<at::Tensor>& lengths);

// Validates the backward arguments: the forward ones plus grad_y and y, both [T, B, H], and
// grad_h_n [B, H] when given.
RnnShape check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                               const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                               const at::Tensor& y, const std::optional<at::Tensor>& grad_h_n);

using RnnGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

}  // namespace fused_bptt

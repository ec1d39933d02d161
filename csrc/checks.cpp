// checks.cpp: the input checks every backend of the fused RNN ops shares (see fused_bptt.h).
// Errors say what was expected and what came.
#include "fused_bptt.h"

#include <c10/util/Exception.h>

namespace fused_bptt {
namespace {

void check_float_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "fused_bptt: ", name, " must have dtype ", dtype,
              " (the dtype of x), but got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fused_bptt: ", name, " must be on ", x.device(),
              " (the device of x), but is on ", t.device());
}

void check_sizes(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "fused_bptt: ", name, " must have shape ", expected,
              ", but got ", t.sizes());
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x,
                  at::IntArrayRef expected) {
  TORCH_CHECK(t.defined(), "fused_bptt: ", name, " is missing (got None); expected a tensor of shape ",
              expected);
  check_sizes(t, name, expected);
  check_float_dtype(t, name, x.scalar_type());
  check_same_device(t, name, x);
}

}  // namespace

RnnShape check_forward_inputs(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
                              const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                              const std::optional<at::Tensor>& bias_hh) {
  TORCH_CHECK(x.defined(), "fused_bptt: x is missing (got None); expected a [T, B, I] tensor");
  TORCH_CHECK(weight_hh.defined(),
              "fused_bptt: weight_hh is missing (got None); expected an [H, H] tensor");
  TORCH_CHECK(x.dim() == 3, "fused_bptt: x must be 3-D [T, B, I], but got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  const bool low_precision = dtype == at::kBFloat16 || dtype == at::kHalf;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || low_precision,
              "fused_bptt: x must be float32, float64, bfloat16 or float16, but got ", dtype);
  TORCH_CHECK(x.size(0) >= 1, "fused_bptt: x must hold at least one time step (T >= 1), but T = ",
              x.size(0));
  TORCH_CHECK(weight_hh.dim() == 2, "fused_bptt: weight_hh must be 2-D [H, H], but got shape ",
              weight_hh.sizes());
  const RnnShape s{x.size(0), x.size(1), x.size(2), weight_hh.size(0)};
  check_tensor(weight_hh, "weight_hh", x, {s.H, s.H});
  check_tensor(weight_ih, "weight_ih", x, {s.H, s.I});
  check_tensor(h0, "h0", x, {s.B, s.H});
  if (bias_ih.has_value()) check_tensor(*bias_ih, "bias_ih", x, {s.H});
  if (bias_hh.has_value()) check_tensor(*bias_hh, "bias_hh", x, {s.H});
  return s;
}

void check_boundaries(const at::Tensor& x, const std::optional<at::Tensor>& resets,
                      const std::optional<at::Tensor>& lengths) {
  const int64_t T = x.size(0), B = x.size(1);
  if (resets.has_value()) {
    const at::Tensor& r = *resets;
    TORCH_CHECK(r.scalar_type() == at::kBool, "fused_bptt: resets must be a bool tensor [T, B] ",
                "(true where the state entering step t of row b is zero), but got dtype ",
                r.scalar_type());
    check_sizes(r, "resets", {T, B});
    TORCH_CHECK(r.device() == x.device(), "fused_bptt: resets must be on ", x.device(),
                " (the device of x), but is on ", r.device());
  }
  if (lengths.has_value()) {
    const at::Tensor& l = *lengths;
    TORCH_CHECK(l.scalar_type() == at::kLong, "fused_bptt: lengths must be an int64 tensor [B] ",
                "(the number of valid steps of each row), but got dtype ", l.scalar_type());
    check_sizes(l, "lengths", {B});
    TORCH_CHECK(l.device() == x.device(), "fused_bptt: lengths must be on ", x.device(),
                " (the device of x), but is on ", l.device());
    if (B > 0) {
      const int64_t lo = l.min().item<int64_t>(), hi = l.max().item<int64_t>();
      TORCH_CHECK(lo >= 1 && hi <= T, "fused_bptt: lengths must lie in 1..T = 1..", T,
                  ", but got values from ", lo, " to ", hi);
    }
  }
}

RnnShape check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                               const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                               const at::Tensor& y, const std::optional<at::Tensor>& grad_h_n) {
  const RnnShape s = check_forward_inputs(x, h0, weight_ih, weight_hh, std::nullopt, std::nullopt);
  check_tensor(y, "y", x, {s.T, s.B, s.H});
  check_tensor(grad_y, "grad_y", x, {s.T, s.B, s.H});
  if (grad_h_n.has_value()) check_tensor(*grad_h_n, "grad_h_n", x, {s.B, s.H});
  return s;
}

}  // namespace fused_bptt

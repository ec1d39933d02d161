// rnn_cpu_lowp.cpp: the CPU ops in bfloat16 and float16 (S): rnn_cpu.cpp's structure, with every
// tensor of the op's interface in S and all arithmetic in float32.
//
// Shapes and math as in rnn_cpu.cpp (x [T, B, I], h0 [B, H], W_ih [H, I], W_hh [H, H], y, grad_y
// [T, B, H]). Where the rounding to S happens, and why:
// - Forward: the input projection x W_ih^T of all T steps is one GEMM into a float32 [T*B, H]
//   buffer (freed on return; nothing extra is saved for backward). Each step adds b_ih + b_hh
//   (summed in float32), h_{t-1} W_hh^T (float32 accumulation) and takes act in float32; y_t is
//   the one rounding to S per element and step.
// - The state carried from step to step is y_t, rounded to S, as nn.RNN carries it: the next
//   step's product reads the same numbers the caller gets, the backward's act'(z_t) = 1 - y_t^2
//   and h_{t-1} = y_{t-1} are exactly the forward's, and the bf16 dot-product kernel and MKL's bf16
//   GEMM (both take S operands) serve the recurrence. Keeping a float32 state inside a call would
//   give errors a little lower than these (bench/accuracy_lowp.py measures both; README) but no
//   S-operand kernel could run the step.
// - Backward: dz_t = (grad_y_t + dz_{t+1} W_hh) * act'(y_t) in float32, rounded to S when stored
//   (dz is the S operand of the weight-gradient GEMMs, as in nn.RNN); grad_h_n is added in float32.
//   dh0, dW_hh, dW_ih and dx are float32-accumulated GEMMs, rounded once to S; db sums dz in
//   float64 and rounds once.
// - GEMMs: cpu_gemm.h's gemm_lowp (MKL's bf16/fp16 GEMM with float32 output, else ATen).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "cpu/rnn_cpu.h"
#include "cpu/rnn_step_kernel.h"

namespace fused_bptt {
namespace cpu {
namespace {

template <typename S>
bool use_blas_step_lowp(GemmMode mode, const StepKernels<S>& k, int64_t H) {
  return mode == GemmMode::kBlas || (mode == GemmMode::kAuto && blas_lowp_available<S>(mode) &&
                                     k.packed_bytes(H, H) > kKernelMaxWeightBytes);
}

// W_hh (or its transpose) in the layout the step kernel reads, 64-byte aligned.
template <typename S>
at::Tensor pack_weights(const StepKernels<S>& k, const at::Tensor& w_hh, bool transposed,
                        int64_t H) {
  at::Tensor packed = at::empty({k.packed_bytes(H, H)}, w_hh.options().dtype(at::kByte));
  k.pack(w_hh.data_ptr<S>(), transposed, H, H, packed.data_ptr());
  return packed;
}

at::Tensor float_buffer(int64_t rows, int64_t cols, const at::Tensor& like) {
  return at::empty({rows, cols}, like.options().dtype(at::kFloat));
}

}  // namespace

template <typename S>
void forward_lowp(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const std::optional<at::Tensor>& bias_ih,
                  const std::optional<at::Tensor>& bias_hh, at::Tensor& y, const RnnShape& s,
                  bool relu) {
  const int64_t T = s.T, B = s.B, H = s.H, BH = s.B * s.H;
  const GemmMode mode = gemm_mode_from_env();
  const StepKernels<S>& k = step_kernels<S>();
  std::vector<float> bias(H, 0.0f);  // b_ih + b_hh once, in float32
  for (const auto* b : {&bias_ih, &bias_hh}) {
    if (!b->has_value()) continue;
    const at::Tensor bc = (*b)->contiguous();
    const S* bp = bc.data_ptr<S>();
    for (int64_t j = 0; j < H; ++j) bias[j] += static_cast<float>(bp[j]);
  }
  const S* h0p = h0.data_ptr<S>();
  S* yp = y.data_ptr<S>();
  auto h_prev = [&](int64_t t) { return t == 0 ? h0p : yp + (t - 1) * BH; };

  at::Tensor xw = float_buffer(T * B, H, x);  // x W_ih^T over all T*B rows, float32
  float* xwp = xw.data_ptr<float>();
  gemm_lowp<S>(mode, false, true, T * B, H, s.I, x.data_ptr<S>(), s.I, w_ih.data_ptr<S>(), s.I, 0,
               xwp, H);
  if (use_blas_step_lowp(mode, k, H)) {
    const S* whh = w_hh.data_ptr<S>();
    for (int64_t t = 0; t < T; ++t) {
      float* xt = xwp + t * BH;
      gemm_lowp<S>(mode, false, true, B, H, H, h_prev(t), H, whh, H, 1, xt, H);
      parallel_rows(B, BH >= kParallelMinElements, [&](int64_t r0, int64_t r1) {
        k.forward(nullptr, nullptr, nullptr, bias.data(), xt + r0 * H, yp + t * BH + r0 * H,
                  r1 - r0, 0, H, relu);
      });
    }
    return;
  }
  const at::Tensor w = pack_weights(k, w_hh, /*transposed=*/true, H);  // w = W_hh^T
  const void* wp = w.data_ptr();
  std::vector<float> part(BH);
  parallel_rows(B, T * BH * H >= kParallelMinFma, [&](int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t o = t * BH + r0 * H;
      k.forward(h_prev(t) + r0 * H, wp, part.data() + r0 * H, bias.data(), xwp + o, yp + o,
                r1 - r0, H, H, relu);
    }
  });
}

template <typename S>
void backward_lowp(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                   const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const at::Tensor& y, const RnnShape& s, bool relu, at::Tensor& dx,
                   at::Tensor& dh0, at::Tensor& dw_ih, at::Tensor& dw_hh, at::Tensor& db) {
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, BH = s.B * s.H;
  const GemmMode mode = gemm_mode_from_env();
  const StepKernels<S>& k = step_kernels<S>();
  at::Tensor dz = at::empty_like(y);
  S* dzp = dz.data_ptr<S>();
  const S* yp = y.data_ptr<S>();
  const S* whh = w_hh.data_ptr<S>();
  // grad_y read in place, rows ld apart (see rnn_cpu.cpp); grad_h_n joins at t = T-1 as a
  // float32 addend, so grad_y_{T-1} + grad_h_n is never rounded to S.
  const S* gy = grad_y.data_ptr<S>();
  const int64_t gy_t = grad_y.stride(0), gy_ld = grad_y.stride(1);
  std::vector<float> last;
  if (grad_h_n.defined()) {
    const S* gh = grad_h_n.data_ptr<S>();
    last.assign(BH, 0.0f);
    for (int64_t i = 0; i < BH; ++i) last[i] = static_cast<float>(gh[i]);
  }
  auto add_at = [&](int64_t t) -> const float* {
    return t == T - 1 && !last.empty() ? last.data() : nullptr;
  };
  auto rows = [](const float* p, int64_t offset) { return p == nullptr ? p : p + offset; };

  if (use_blas_step_lowp(mode, k, H)) {
    std::vector<float> product(BH);  // dz_{t+1} W_hh, float32
    for (int64_t t = T - 1; t >= 0; --t) {
      const float* add = add_at(t);
      if (t + 1 < T) {  // (t < T-1: no grad_h_n to add)
        gemm_lowp<S>(mode, false, false, B, H, H, dzp + (t + 1) * BH, H, whh, H, 0,
                     product.data(), H);
        add = product.data();
      }
      parallel_rows(B, BH >= kParallelMinElements, [&](int64_t r0, int64_t r1) {
        k.backward(nullptr, nullptr, nullptr, gy + t * gy_t + r0 * gy_ld, gy_ld, rows(add, r0 * H),
                   yp + t * BH + r0 * H, dzp + t * BH + r0 * H, r1 - r0, 0, H, relu);
      });
    }
  } else {
    const at::Tensor w = pack_weights(k, w_hh, /*transposed=*/false, H);  // w = W_hh
    const void* wp = w.data_ptr();
    std::vector<float> part(BH);
    parallel_rows(B, T * BH * H >= kParallelMinFma, [&](int64_t r0, int64_t r1) {
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t o = t * BH + r0 * H, K = t + 1 < T ? H : 0;
        k.backward(dzp + o + BH, wp, part.data() + r0 * H, gy + t * gy_t + r0 * gy_ld, gy_ld,
                   rows(add_at(t), r0 * H), yp + o, dzp + o, r1 - r0, K, H, relu);
      }
    });
  }

  // The GEMMs over all T*B rows accumulate into float32 buffers, rounded once into the outputs.
  at::Tensor f_dh0 = float_buffer(B, H, x), f_dwhh = float_buffer(H, H, x);
  at::Tensor f_dwih = float_buffer(H, I, x), f_dx = float_buffer(T * B, I, x);
  float* dwhh = f_dwhh.data_ptr<float>();
  gemm_lowp<S>(mode, false, false, B, H, H, dzp, H, whh, H, 0, f_dh0.data_ptr<float>(), H);
  gemm_lowp<S>(mode, true, false, H, H, B, dzp, H, h0.data_ptr<S>(), H, 0, dwhh, H);
  gemm_lowp<S>(mode, true, false, H, H, (T - 1) * B, dzp + BH, H, yp, H, 1, dwhh, H);
  gemm_lowp<S>(mode, true, false, H, I, T * B, dzp, H, x.data_ptr<S>(), I, 0,
               f_dwih.data_ptr<float>(), I);
  gemm_lowp<S>(mode, false, false, T * B, I, H, dzp, H, w_ih.data_ptr<S>(), I, 0,
               f_dx.data_ptr<float>(), I);
  dh0.copy_(f_dh0);
  dw_hh.copy_(f_dwhh);
  dw_ih.copy_(f_dwih);
  dx.copy_(f_dx.view({T, B, I}));
  // db: column sums in a fixed row order (threads split columns), accumulated in float64.
  S* dbp = db.data_ptr<S>();
  at::parallel_for(0, H, 64, [&](int64_t j0, int64_t j1) {
    std::vector<double> acc(j1 - j0, 0.0);
    for (int64_t r = 0; r < T * B; ++r) {
      const S* row = dzp + r * H;
      for (int64_t j = j0; j < j1; ++j) acc[j - j0] += static_cast<float>(row[j]);
    }
    for (int64_t j = j0; j < j1; ++j) dbp[j] = static_cast<S>(static_cast<float>(acc[j - j0]));
  });
}

template void forward_lowp<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, at::Tensor&,
                                          const RnnShape&, bool);
template void forward_lowp<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const std::optional<at::Tensor>&,
                                      const std::optional<at::Tensor>&, at::Tensor&,
                                      const RnnShape&, bool);
template void backward_lowp<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const RnnShape&, bool, at::Tensor&,
                                           at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);
template void backward_lowp<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const RnnShape&, bool, at::Tensor&,
                                       at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&);

}  // namespace cpu
}  // namespace fused_bptt

// rnn_launch_lowp.h: the host side of the CUDA backend in bfloat16 and float16, written once for
// two devices, as rnn_launch.h is for float32/float64 (the same `Dev` interface: config(),
// co_resident_blocks(), launch_cooperative()); rnn_cuda.cu dispatches these dtypes here, and the
// tests' emulation (tests/emu/rnn_emu.cpp) runs this file as it is.
//
// Every tensor of the ops' interface is in S (bfloat16 or float16); the arithmetic is float32:
//   - the GEMMs over all T*B rows (input projection, dx, dW_ih, dW_hh, dh0) are ATen matmuls in
//     S, which accumulate in float32 (cuBLAS's default for these dtypes) and round once;
//   - the recurrence runs in the kernels of rnn_kernels_lowp.cuh (tensor-core mma, sm_80+), whose
//     header says where the rounding to S happens; db sums dz in float32.
// Paths: the persistent mma kernels where the device has bf16/fp16 mma (sm_80+), a block's part of
// W_hh and one tile of 16 staged rows fit in shared memory, every block can be resident at once
// and the device accepts the cooperative launch. Otherwise a per-step path of ATen ops in float32
// with the same rounding points (slower, always available). FUSED_BPTT_CUDA_PATH forces either;
// a forced persistent path that cannot run is an error that says why.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "fused_bptt.h"
#include "rnn_kernels_lowp.cuh"
#include "rnn_launch.h"

namespace fused_bptt {
namespace cuda_impl {

inline bool is_low_precision(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
}

struct LowpPlan {
  bool fits;     // a 16-row tile of the staged input and the W part fit in shared memory
  int grid;      // blocks = params.slices
  int64_t smem;  // bytes per block
  kernels_lowp::LowpParams params;
};

// Units per block J: a multiple of 8 (the mma's n), as few as the SMs allow (one block per SM,
// all co-resident). Rows staged per tile: all of B (rounded up to 16) if the shared memory left
// holds them, else as many 16-row tiles as it does.
inline LowpPlan plan_lowp(int64_t T, int64_t B, int64_t H, const DeviceConfig& cfg, bool relu) {
  using kernels_lowp::kMmaK;
  using kernels_lowp::kMmaM;
  using kernels_lowp::kMmaN;
  const int64_t Kp = (H + kMmaK - 1) / kMmaK * kMmaK, ld = kernels_lowp::lowp_row_stride(Kp);
  const int64_t n8 = (H + kMmaN - 1) / kMmaN;
  const int64_t max_slices = std::max<int64_t>(1, std::min<int64_t>(n8, cfg.num_sms));
  const int64_t J = (n8 + max_slices - 1) / max_slices * kMmaN, slices = (H + J - 1) / J;
  const int64_t room = cfg.max_smem_per_block / 2 - J * ld;  // elements left for staged rows
  const int64_t by_smem = std::max<int64_t>(room / ld, 0) / kMmaM * kMmaM;
  const int64_t b_tile = std::min((B + kMmaM - 1) / kMmaM * kMmaM, by_smem);
  const bool fits = b_tile >= kMmaM;
  const int64_t staged = std::max<int64_t>(b_tile, kMmaM);  // the plan reported when !fits
  const int64_t smem = kernels_lowp::lowp_smem_elements(J, staged, Kp) * 2;
  const kernels_lowp::LowpParams params{static_cast<int>(T),      static_cast<int>(B),
                                        static_cast<int>(H),      static_cast<int>(Kp),
                                        static_cast<int>(J),      static_cast<int>(slices),
                                        static_cast<int>(staged), relu};
  return {fits, static_cast<int>(slices), smem, params};
}

// Whether the persistent mma kernel `kernel` can run `plan`; with FUSED_BPTT_CUDA_PATH=persistent
// a "no" is an error saying why.
template <class Dev, class Kernel>
bool lowp_persistent_possible(const Dev& dev, const DeviceConfig& cfg, bool has_mma,
                              Kernel kernel, const LowpPlan& plan, const RnnShape& s) {
  const bool forced = cfg.path == PathChoice::Persistent;
  if (cfg.path == PathChoice::PerStep) return false;
  TORCH_CHECK(has_mma || !forced,
              "fused_bptt: the persistent CUDA kernel was forced, but its bfloat16/float16 "
              "tensor-core instructions (mma m16n8k16) need compute capability 8.0 or newer; "
              "unset FUSED_BPTT_CUDA_PATH to take the per-step path on this device");
  bool ok = has_mma && plan.fits && s.T * s.B * s.H < (int64_t(1) << 31) &&
            s.H * s.H < (int64_t(1) << 31);
  if (ok) ok = dev.co_resident_blocks(kernel, cfg.threads, plan.smem) >= plan.grid;
  TORCH_CHECK(ok || !forced,
              "fused_bptt: the persistent CUDA kernel was forced but cannot run this shape (B=",
              s.B, ", H=", s.H, "): it needs ", plan.grid, " co-resident blocks with ", plan.smem,
              " bytes of shared memory each, the device allows ", cfg.max_smem_per_block,
              " bytes");
  return ok;
}

// The optional boundaries as the kernels read them: contiguous, or nullptr.
struct LowpBounds {
  at::Tensor resets, lengths;
  const bool* resets_ptr() const {
    return resets.defined() ? resets.const_data_ptr<bool>() : nullptr;
  }
  const int64_t* lengths_ptr() const {
    return lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  }
};
inline LowpBounds lowp_bounds(const std::optional<at::Tensor>& resets,
                              const std::optional<at::Tensor>& lengths) {
  return {resets.has_value() ? resets->contiguous() : at::Tensor(),
          lengths.has_value() ? lengths->contiguous() : at::Tensor()};
}

// For the per-step path, bool [B, 1] masks of step t (undefined: true for every row): the row
// reads the state step t-1 left (active at t and not reset there), and the row is active at t.
// Applied with at::where, never by a multiplication, so that a NaN or inf left out stays out.
inline at::Tensor carries_into(const LowpBounds& bd, int64_t t) {
  at::Tensor keep;
  if (bd.resets.defined()) keep = bd.resets[t].logical_not().unsqueeze(1);
  if (bd.lengths.defined()) {
    const at::Tensor active = bd.lengths.gt(t).unsqueeze(1);
    keep = keep.defined() ? keep.logical_and(active) : active;
  }
  return keep;
}
inline at::Tensor active_at(const LowpBounds& bd, int64_t t) {
  return bd.lengths.defined() ? bd.lengths.gt(t).unsqueeze(1) : at::Tensor();
}
inline at::Tensor where_or_zero(const at::Tensor& mask, const at::Tensor& v) {
  return mask.defined() ? at::where(mask, v, at::zeros_like(v)) : v;
}

template <class Fmt, class Dev>
void forward_lowp_typed(const Dev& dev, const DeviceConfig& cfg, bool has_mma,
                        const RnnShape& s, const at::Tensor& h0, const at::Tensor& w_hh,
                        const at::Tensor& bias, at::Tensor& y, bool relu, const LowpBounds& bd) {
  auto kernel = &kernels_lowp::rnn_forward_mma_kernel<Fmt>;
  const LowpPlan plan = plan_lowp(s.T, s.B, s.H, cfg, relu);
  if (lowp_persistent_possible(dev, cfg, has_mma, kernel, plan, s)) {
    // A refused launch runs nothing: y still holds the projection the per-step path needs.
    if (dev.launch_cooperative(kernel, plan.grid, cfg.threads, plan.smem,
                               reinterpret_cast<const uint16_t*>(h0.const_data_ptr()),
                               reinterpret_cast<const uint16_t*>(w_hh.const_data_ptr()),
                               bias.defined() ? bias.const_data_ptr<float>() : nullptr,
                               reinterpret_cast<uint16_t*>(y.mutable_data_ptr()),
                               bd.resets_ptr(), bd.lengths_ptr(), plan.params))
      return;
    on_cooperative_launch_refused(cfg, plan.grid);
  }
  // Per step in float32: z = projection + bias + (h_{t-1} where it carries) W^T; y_t = act(z)
  // rounded to S, 0 past a row's length; the next step reads y_t in S, as the kernel does.
  const at::Tensor w_t = w_hh.to(at::kFloat).t();
  for (int64_t t = 0; t < s.T; ++t) {
    const at::Tensor h = (t == 0 ? h0 : y[t - 1]).to(at::kFloat);
    at::Tensor z = at::addmm(y[t].to(at::kFloat), where_or_zero(carries_into(bd, t), h), w_t);
    if (bias.defined()) z.add_(bias);
    z = relu ? z.relu() : z.tanh();
    y[t].copy_(where_or_zero(active_at(bd, t), z));
  }
}

// y [T, B, H] in S (see fused_bptt.h). has_mma: the device runs bf16/fp16 mma (sm_80+).
template <class Dev>
at::Tensor rnn_forward_lowp_impl(const Dev& dev, bool has_mma, const at::Tensor& x_in,
                                 const at::Tensor& h0_in, const at::Tensor& w_ih_in,
                                 const at::Tensor& w_hh_in,
                                 const std::optional<at::Tensor>& bias_ih,
                                 const std::optional<at::Tensor>& bias_hh, bool relu,
                                 const std::optional<at::Tensor>& resets,
                                 const std::optional<at::Tensor>& lengths) {
  const RnnShape s = check_forward_inputs(x_in, h0_in, w_ih_in, w_hh_in, bias_ih, bias_hh);
  check_boundaries(x_in, resets, lengths);
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor y = at::empty({s.T, s.B, s.H}, x.options());
  // The input projection of all T steps, written straight into y; b_ih + b_hh in float32.
  at::Tensor y2 = y.view({s.T * s.B, s.H});
  at::mm_out(y2, x.view({s.T * s.B, s.I}), w_ih.t());
  at::Tensor bias;
  if (bias_ih.has_value()) bias = bias_ih->to(at::kFloat);
  if (bias_hh.has_value()) {
    const at::Tensor b = bias_hh->to(at::kFloat);
    bias = bias.defined() ? bias + b : b;
  }
  if (y.numel() == 0) return y;
  const DeviceConfig cfg = dev.config();
  check_config(cfg);
  const LowpBounds bd = lowp_bounds(resets, lengths);
  if (x.scalar_type() == at::kBFloat16) {
    forward_lowp_typed<kernels_lowp::Bf16>(dev, cfg, has_mma, s, h0, w_hh, bias, y, relu, bd);
  } else {
    forward_lowp_typed<kernels_lowp::F16>(dev, cfg, has_mma, s, h0, w_hh, bias, y, relu, bd);
  }
  return y;
}

template <class Fmt, class Dev>
void backward_lowp_typed(const Dev& dev, const DeviceConfig& cfg, bool has_mma,
                         const RnnShape& s, const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                         const at::Tensor& w_hh, const at::Tensor& y, at::Tensor& dz, bool relu,
                         const LowpBounds& bd) {
  auto kernel = &kernels_lowp::rnn_backward_mma_kernel<Fmt>;
  const LowpPlan plan = plan_lowp(s.T, s.B, s.H, cfg, relu);
  if (lowp_persistent_possible(dev, cfg, has_mma, kernel, plan, s)) {
    if (dev.launch_cooperative(
            kernel, plan.grid, cfg.threads, plan.smem,
            reinterpret_cast<const uint16_t*>(grad_y.const_data_ptr()),
            grad_h_n.defined() ? reinterpret_cast<const uint16_t*>(grad_h_n.const_data_ptr())
                               : nullptr,
            reinterpret_cast<const uint16_t*>(w_hh.const_data_ptr()),
            reinterpret_cast<const uint16_t*>(y.const_data_ptr()),
            reinterpret_cast<uint16_t*>(dz.mutable_data_ptr()), bd.resets_ptr(),
            bd.lengths_ptr(), plan.params))
      return;
    on_cooperative_launch_refused(cfg, plan.grid);
  }
  // Per step in float32, dz_t rounded to S and read back as the next step's input, as the kernel
  // does: dz_t = (grad_y_t + [last step] grad_h_n + (dz_{t+1} where it carries) W) * act'(y_t).
  const at::Tensor w = w_hh.to(at::kFloat);
  const at::Tensor ghn = grad_h_n.defined() ? grad_h_n.to(at::kFloat) : at::Tensor();
  for (int64_t t = s.T - 1; t >= 0; --t) {
    at::Tensor g = grad_y[t].to(at::kFloat);
    if (ghn.defined() && bd.lengths.defined()) {  // grad_h_n joins at each row's last step
      g = g + where_or_zero(bd.lengths.eq(t + 1).unsqueeze(1), ghn);
    } else if (ghn.defined() && t == s.T - 1) {
      g = g + ghn;
    }
    if (t + 1 < s.T) {
      g = at::addmm(g, where_or_zero(carries_into(bd, t + 1), dz[t + 1].to(at::kFloat)), w);
    }
    const at::Tensor yt = y[t].to(at::kFloat);
    const at::Tensor d = relu ? at::where(yt <= 0, at::zeros_like(g), g) : g * (1 - yt * yt);
    dz[t].copy_(where_or_zero(active_at(bd, t), d));
  }
}

// (dx, dh0, dW_ih, dW_hh, db) in S from grad_y (+ grad_h_n at each row's last step) and the
// saved y (see fused_bptt.h).
template <class Dev>
RnnGrads rnn_backward_lowp_impl(const Dev& dev, bool has_mma, const at::Tensor& grad_y_in,
                                const at::Tensor& x_in, const at::Tensor& h0_in,
                                const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                                const at::Tensor& y_in, bool relu,
                                const std::optional<at::Tensor>& grad_h_n_in,
                                const std::optional<at::Tensor>& resets,
                                const std::optional<at::Tensor>& lengths) {
  const BackwardInputs in =
      backward_inputs(grad_y_in, x_in, h0_in, w_ih_in, w_hh_in, y_in, grad_h_n_in);
  check_boundaries(x_in, resets, lengths);
  if (in.empty()) return in.zero_grads();
  const RnnShape& s = in.s;
  const at::Tensor &grad_y = in.grad_y, &x = in.x, &h0 = in.h0, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const at::Tensor &y = in.y, &grad_h_n = in.grad_h_n;
  at::Tensor dz = at::empty({s.T, s.B, s.H}, x.options());
  const DeviceConfig cfg = dev.config();
  check_config(cfg);
  const LowpBounds bd = lowp_bounds(resets, lengths);
  if (x.scalar_type() == at::kBFloat16) {
    backward_lowp_typed<kernels_lowp::Bf16>(dev, cfg, has_mma, s, grad_y, grad_h_n, w_hh, y, dz,
                                            relu, bd);
  } else {
    backward_lowp_typed<kernels_lowp::F16>(dev, cfg, has_mma, s, grad_y, grad_h_n, w_hh, y, dz,
                                           relu, bd);
  }
  const at::Tensor dz2 = dz.view({s.T * s.B, s.H});
  const at::Tensor dx = at::mm(dz2, w_ih).view({s.T, s.B, s.I});
  const at::Tensor dw_ih = at::mm(dz2.t(), x.view({s.T * s.B, s.I}));
  const at::Tensor db = dz2.sum(0, false, at::kFloat).to(x.scalar_type());
  // dh0 and dW_hh take dz through h_{t-1}, a constant 0 where the state was reset: those rows of
  // dz are left out (dx, dW_ih and db above used them).
  const at::Tensor dz_h = bd.resets.defined() ? dz.masked_fill(bd.resets.unsqueeze(2), 0) : dz;
  const at::Tensor dh0 = at::mm(dz_h[0], w_hh);
  const at::Tensor h_prev =
      at::cat({h0.unsqueeze(0), y.narrow(0, 0, s.T - 1)}).view({s.T * s.B, s.H});
  const at::Tensor dw_hh = at::mm(dz_h.view({s.T * s.B, s.H}).t(), h_prev);
  return {dx, dh0, dw_ih, dw_hh, db};
}

}  // namespace cuda_impl
}  // namespace fused_bptt

// rnn_launch.h: the host side of the CUDA backend, written once for two devices.
//
// rnn_forward_impl / rnn_backward_impl run the GEMMs through ATen and the recurrence through the
// kernels of rnn_kernels.cuh. `Dev` supplies what differs between a GPU and the CPU emulation:
//   DeviceConfig config() const
//   int64_t co_resident_blocks(kernel, threads, smem_bytes) const   (after allowing smem_bytes)
//   void launch(kernel, grid, threads, smem_bytes, args...) const
//   void launch_cooperative(kernel, grid, threads, smem_bytes, args...) const
// rnn_cuda.cu implements it with the CUDA runtime on the current stream; tests/emu/rnn_emu.cpp
// with simt_emu.h on CPU tensors (ATen's CPU GEMMs), so the tests run this file as it is.
//
// Path choice: the persistent kernels (one launch for all T steps) when a block's W_hh slice (and,
// backward, its dW_hh slice) fits in shared memory and every block can be resident at once;
// otherwise one ATen GEMM plus one pointwise step per time step (always correct, slower).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "fused_bptt.h"
#include "rnn_kernels.cuh"

namespace fused_bptt {
namespace cuda_impl {

enum class PathChoice { Auto, Persistent, PerStep };

struct DeviceConfig {
  int num_sms;                 // multiprocessors: the persistent grid has at most one block per SM
  int64_t max_smem_per_block;  // dynamic shared memory one block may use (opt-in maximum), bytes
  int threads;                 // threads per block, a multiple of 32, <= kernels::kMaxThreads
  PathChoice path;             // Auto, or a forced path (tests, benchmarks)
};

// What the last call ran; the emulated build exposes it so tests can check which path they hit.
struct LaunchRecord {
  bool persistent = false;
  int grid = 0, J = 0, group = 0, b_tile = 0;
  int64_t smem = 0;
};

struct PersistentPlan {
  bool fits;  // the block's shared memory fits in cfg.max_smem_per_block
  int grid, J, b_tile, group;
  int64_t smem;  // bytes per block
};

// Slices of J = max(kTile, ceil(H / num_sms)) hidden units (H at most), one block each. The step's input rows are
// staged b_tile at a time: as many as the shared memory left over holds. `group` lanes per work
// item (a row b times kTile columns) so that even a few items keep the block's threads busy.
inline PersistentPlan plan_persistent(bool backward, int64_t B, int64_t H, int64_t elem_size,
                                      const DeviceConfig& cfg) {
  using kernels::smem_layout;
  // At least kTile units per block: a thread computes kTile columns anyway, and fewer blocks means
  // a cheaper grid barrier and less staging traffic (every block stages the whole input vector).
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(H, cfg.num_sms));
  const int J = static_cast<int>(std::max<int64_t>(std::min<int64_t>(kernels::kTile, H), (H + blocks - 1) / blocks));
  const int grid = static_cast<int>((H + J - 1) / J);
  const int b = static_cast<int>(B), h = static_cast<int>(H);
  // Without staging, and the widest staged row (group <= 32) to size b_tile.
  const int64_t fixed = smem_layout(backward, b, h, J, 0, 1).total;
  const int64_t row = smem_layout(backward, b, h, J, 1, 32).total - smem_layout(backward, b, h, J, 0, 32).total;
  const int64_t room = cfg.max_smem_per_block / elem_size - fixed;
  const int b_tile = static_cast<int>(std::min<int64_t>(B, std::max<int64_t>(room / row, 0)));
  const int64_t items = static_cast<int64_t>(std::max(b_tile, 1)) * ((J + kernels::kTile - 1) / kernels::kTile);
  int group = 1;
  while (group < 32 && group * 2 * items <= cfg.threads) group *= 2;
  const int64_t smem = smem_layout(backward, b, h, J, std::max(b_tile, 1), group).total * elem_size;
  return {b_tile >= 1 && smem <= cfg.max_smem_per_block, grid, J, std::max(b_tile, 1), group, smem};
}

inline void check_config(const DeviceConfig& cfg) {
  TORCH_INTERNAL_ASSERT(cfg.num_sms >= 1 && cfg.threads >= 32 && cfg.threads % 32 == 0 &&
                            cfg.threads <= kernels::kMaxThreads,
                        "fused_bptt: bad device config: ", cfg.num_sms, " SMs, ", cfg.threads, " threads");
}

// Decides the path; fills `rec` and returns whether the persistent kernel `kernel` will run.
template <class Dev, class Kernel>
bool choose_persistent(const Dev& dev, const DeviceConfig& cfg, Kernel kernel, const PersistentPlan& plan,
                       int64_t T, int64_t B, int64_t H, LaunchRecord* rec) {
  bool ok = cfg.path != PathChoice::PerStep && plan.fits && T * B * H < (int64_t(1) << 31) &&
            H * H < (int64_t(1) << 31);
  if (ok) ok = dev.co_resident_blocks(kernel, cfg.threads, plan.smem) >= plan.grid;
  TORCH_CHECK(ok || cfg.path != PathChoice::Persistent,
              "fused_bptt: the persistent CUDA kernel was forced but cannot run this shape (B=", B,
              ", H=", H, "): it needs ", plan.grid, " co-resident blocks with ", plan.smem,
              " bytes of shared memory each, the device allows ", cfg.max_smem_per_block, " bytes");
  if (rec) *rec = ok ? LaunchRecord{true, plan.grid, plan.J, plan.group, plan.b_tile, plan.smem} : LaunchRecord{};
  return ok;
}

// y [T, B, H] (see fused_bptt.h).
template <class Dev>
at::Tensor rnn_forward_impl(const Dev& dev, const at::Tensor& x_in, const at::Tensor& h0_in,
                            const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                            const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                            bool relu, LaunchRecord* rec = nullptr) {
  const RnnShape s = check_forward_inputs(x_in, h0_in, w_ih_in, w_hh_in, bias_ih, bias_hh);
  const at::Tensor x = x_in.contiguous(), h0 = h0_in.contiguous();
  const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  at::Tensor y = at::empty({s.T, s.B, s.H}, x.options());
  at::Tensor y2 = y.view({s.T * s.B, s.H});
  const at::Tensor x2 = x.view({s.T * s.B, s.I});
  // The input projection of all T steps, biases folded in, written straight into y.
  if (bias_ih.has_value() || bias_hh.has_value()) {
    const at::Tensor bias = bias_ih.has_value() && bias_hh.has_value() ? *bias_ih + *bias_hh
                            : bias_ih.has_value()                      ? *bias_ih
                                                                       : *bias_hh;
    at::addmm_out(y2, bias, x2, w_ih.t());
  } else {
    at::mm_out(y2, x2, w_ih.t());
  }
  if (rec) *rec = LaunchRecord{};
  if (y.numel() == 0) return y;

  const DeviceConfig cfg = dev.config();
  check_config(cfg);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_forward_cuda", [&] {
    auto kernel = &kernels::rnn_forward_persistent_kernel<scalar_t>;
    const PersistentPlan plan = plan_persistent(false, s.B, s.H, sizeof(scalar_t), cfg);
    if (choose_persistent(dev, cfg, kernel, plan, s.T, s.B, s.H, rec)) {
      dev.launch_cooperative(kernel, plan.grid, cfg.threads, plan.smem, h0.const_data_ptr<scalar_t>(),
                             w_hh.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                             static_cast<int>(s.T), static_cast<int>(s.B), static_cast<int>(s.H), plan.J,
                             plan.b_tile, plan.group, relu);
      return;
    }
    // Per step: y_t += h_{t-1} W_hh^T (a GEMM), then the activation in place.
    const at::Tensor w_hh_t = w_hh.t();
    for (int64_t t = 0; t < s.T; ++t) {
      at::Tensor y_t = y[t];
      y_t.addmm_(t == 0 ? h0 : y[t - 1], w_hh_t);
      relu ? y_t.relu_() : y_t.tanh_();
    }
  });
  return y;
}

// (dx, dh0, dW_ih, dW_hh, db) from grad_y (+ grad_h_n at step T-1) and the saved y (see fused_bptt.h).
template <class Dev>
RnnGrads rnn_backward_impl(const Dev& dev, const at::Tensor& grad_y_in, const at::Tensor& x_in,
                           const at::Tensor& h0_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                           const at::Tensor& y_in, bool relu, const std::optional<at::Tensor>& grad_h_n,
                           LaunchRecord* rec = nullptr) {
  const RnnShape s = check_backward_inputs(grad_y_in, x_in, h0_in, w_ih_in, w_hh_in, y_in, grad_h_n);
  at::Tensor grad_y = grad_y_in.contiguous(), x = x_in.contiguous(), h0 = h0_in.contiguous();
  if (grad_h_n.has_value()) {
    // h_n is y[T-1]: its gradient joins grad_y there (in a copy: grad_y is not ours to change).
    grad_y = grad_y.clone(at::MemoryFormat::Contiguous);
    grad_y[s.T - 1].add_(*grad_h_n);
  }
  const at::Tensor w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), y = y_in.contiguous();
  if (rec) *rec = LaunchRecord{};
  if (y.numel() == 0) {  // B == 0 or H == 0: every gradient is zero (or empty)
    return {at::zeros_like(x), at::zeros_like(h0), at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({s.H}, x.options())};
  }
  at::Tensor dz = at::empty({s.T, s.B, s.H}, x.options());
  at::Tensor dh0 = at::empty({s.B, s.H}, x.options());
  at::Tensor dw_hh = at::empty({s.H, s.H}, x.options());
  at::Tensor db = at::empty({s.H}, x.options());
  const at::Tensor dz2 = dz.view({s.T * s.B, s.H});

  const DeviceConfig cfg = dev.config();
  check_config(cfg);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_backward_cuda", [&] {
    auto kernel = &kernels::rnn_backward_persistent_kernel<scalar_t>;
    const PersistentPlan plan = plan_persistent(true, s.B, s.H, sizeof(scalar_t), cfg);
    if (choose_persistent(dev, cfg, kernel, plan, s.T, s.B, s.H, rec)) {
      dev.launch_cooperative(kernel, plan.grid, cfg.threads, plan.smem, grad_y.const_data_ptr<scalar_t>(),
                             h0.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(),
                             y.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<scalar_t>(),
                             dh0.mutable_data_ptr<scalar_t>(), dw_hh.mutable_data_ptr<scalar_t>(),
                             db.mutable_data_ptr<scalar_t>(), static_cast<int>(s.T), static_cast<int>(s.B),
                             static_cast<int>(s.H), plan.J, plan.b_tile, plan.group, relu);
      return;
    }
    // Per step: carry = dz_{t+1} W_hh (a GEMM), then dz_t = (grad_y_t + carry) * act'(y_t).
    const int64_t n = s.B * s.H;
    const int blocks = static_cast<int>(std::min<int64_t>((n + cfg.threads - 1) / cfg.threads, 4 * cfg.num_sms));
    at::Tensor carry = at::empty({s.B, s.H}, x.options());
    for (int64_t t = s.T - 1; t >= 0; --t) {
      if (t + 1 < s.T) at::mm_out(carry, dz[t + 1], w_hh);
      dev.launch(&kernels::rnn_backward_step_kernel<scalar_t>, blocks, cfg.threads, 0,
                 grad_y[t].const_data_ptr<scalar_t>(),
                 t + 1 < s.T ? carry.const_data_ptr<scalar_t>() : nullptr, y[t].const_data_ptr<scalar_t>(),
                 dz[t].mutable_data_ptr<scalar_t>(), n, relu);
    }
    at::mm_out(dh0, dz[0], w_hh);
    const at::Tensor h_prev = at::cat({h0.unsqueeze(0), y.narrow(0, 0, s.T - 1)}).view({s.T * s.B, s.H});
    at::mm_out(dw_hh, dz2.t(), h_prev);
    at::sum_out(db, dz2, {0});
  });
  const at::Tensor dw_ih = at::mm(dz2.t(), x.view({s.T * s.B, s.I}));
  const at::Tensor dx = at::mm(dz2, w_ih).view({s.T, s.B, s.I});
  return {dx, dh0, dw_ih, dw_hh, db};
}

}  // namespace cuda_impl
}  // namespace fused_bptt

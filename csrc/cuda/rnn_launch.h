// rnn_launch.h: the host side of the CUDA backend, written once for two devices.
//
// rnn_forward_impl / rnn_backward_impl run the GEMMs through ATen and the recurrence through the
// kernels of rnn_kernels.cuh. `Dev` supplies what differs between a GPU and the CPU emulation:
//   DeviceConfig config() const
//   int64_t co_resident_blocks(kernel, threads, smem_bytes) const   (after allowing smem_bytes)
//   void launch(kernel, grid, threads, smem_bytes, args...) const
//   bool launch_cooperative(kernel, grid, threads, smem_bytes, args...) const
//        false: the device refused the cooperative launch (nothing ran, no error left pending)
// rnn_cuda.cu implements it with the CUDA runtime on the current stream; the tests
// (tests/emu/rnn_emu.cpp) on CPU threads and CPU tensors, so they run this file as it is.
//
// Path choice: the persistent kernels (one launch for all T steps) when a block's W_hh slice (and,
// backward, its dW_hh slice) fits in shared memory, every block can be resident at once and the
// device accepts the cooperative launch; otherwise one ATen GEMM plus one pointwise step per time
// step (always correct, slower).
//
// Boundaries (resets [T, B] bool, lengths [B] int64; fused_bptt.h) are checked by the shared
// check_boundaries and handed to every kernel as two device pointers (kernels::SeqBounds): the
// kernels pick per row and step what it does. No [T, B, H] buffer and no host work per step.
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

struct PersistentPlan {
  bool fits;      // the block's shared memory fits in cfg.max_smem_per_block
  int grid;       // blocks: params.slices * batch groups
  int64_t smem;   // bytes per block
  kernels::PersistentParams params;
};

// Split the batch into groups of blocks only when every group keeps at least this many rows:
// each block then stages only its group's rows of h (fewer bytes per step) but holds a wider
// slice of W, so a small batch gains nothing.
constexpr int64_t kMinRowsPerGroup = 16;
constexpr int kMaxBatchGroups = 8;

// The plan with the batch in `groups` groups: slices of J units, J a multiple of kTile (no FMAs
// on padding columns but in the last slice), as many slices as the SMs left for each group allow.
// The step's input rows are staged b_tile at a time: as many as the shared memory left over holds
// and one work item per lane allows; with several groups, all of a group's rows at once. `group`
// lanes per work item so that even a few items keep the block's threads busy.
inline PersistentPlan plan_with_groups(bool backward, int64_t B, int64_t H, int64_t elem_size,
                                       const DeviceConfig& cfg, int groups) {
  using kernels::kRows;
  using kernels::kTile;
  const int64_t rows = (B + groups - 1) / groups, n_groups = (B + rows - 1) / rows;
  const int64_t max_slices = std::max<int64_t>(1, std::min<int64_t>(H, cfg.num_sms / groups));
  const int64_t J = ((H + max_slices - 1) / max_slices + kTile - 1) / kTile * kTile;
  const int64_t slices = (H + J - 1) / J, n_tiles = J / kTile;
  const int r = static_cast<int>(rows), h = static_cast<int>(H), j = static_cast<int>(J);
  const int64_t fixed = kernels::smem_layout(backward, r, h, j, 0).total;
  const int64_t room = cfg.max_smem_per_block / elem_size - fixed;
  const int64_t by_smem = std::max<int64_t>(room / kernels::stage_stride(h), 0);
  const int64_t by_items = kRows * (cfg.threads / n_tiles);
  const int b_tile = static_cast<int>(std::min({rows, by_smem, by_items}));
  const int64_t items = (b_tile + kRows - 1) / kRows * n_tiles;
  int group = 1;
  while (group < 32 && group * 2 * items <= cfg.threads) group *= 2;
  const int staged = std::max(b_tile, 1);
  const int64_t smem = kernels::smem_layout(backward, r, h, j, staged).total * elem_size;
  const bool fits =
      b_tile >= 1 && smem <= cfg.max_smem_per_block && (groups == 1 || b_tile == rows);
  const kernels::PersistentParams params{0, static_cast<int>(B), h, j, static_cast<int>(slices),
                                         r, staged, group, false};
  return {fits, static_cast<int>(slices * n_groups), smem, params};
}

// The largest batch split that fits, else the plan without one.
inline PersistentPlan plan_persistent(bool backward, int64_t B, int64_t H, int64_t elem_size,
                                      const DeviceConfig& cfg) {
  for (int groups = kMaxBatchGroups; groups >= 2; groups /= 2) {
    if (B / groups < kMinRowsPerGroup || groups > cfg.num_sms) continue;
    const PersistentPlan plan = plan_with_groups(backward, B, H, elem_size, cfg, groups);
    if (plan.fits) return plan;
  }
  return plan_with_groups(backward, B, H, elem_size, cfg, 1);
}

inline void check_config(const DeviceConfig& cfg) {
  TORCH_INTERNAL_ASSERT(cfg.num_sms >= 1 && cfg.threads >= 32 && cfg.threads % 32 == 0 &&
                            cfg.threads <= kernels::kMaxThreads,
                        "fused_bptt: bad device config: ", cfg.num_sms, " SMs, ", cfg.threads,
                        " threads");
}

// Whether the persistent kernel `kernel` can run `plan`: it fits, the indices fit in int, and every
// block can be resident at once. Forced with FUSED_BPTT_CUDA_PATH=persistent, "no" is an error.
template <class Dev, class Kernel>
bool persistent_possible(const Dev& dev, const DeviceConfig& cfg, Kernel kernel,
                         const PersistentPlan& plan, int64_t T, int64_t B, int64_t H) {
  bool ok = cfg.path != PathChoice::PerStep && plan.fits && T * B * H < (int64_t(1) << 31) &&
            H * H < (int64_t(1) << 31);
  if (ok) ok = dev.co_resident_blocks(kernel, cfg.threads, plan.smem) >= plan.grid;
  TORCH_CHECK(ok || cfg.path != PathChoice::Persistent,
              "fused_bptt: the persistent CUDA kernel was forced but cannot run this shape (B=", B,
              ", H=", H, "): it needs ", plan.grid, " co-resident blocks with ", plan.smem,
              " bytes of shared memory each, the device allows ", cfg.max_smem_per_block,
              " bytes");
  return ok;
}

// After a refused cooperative launch (MPS thread limits, a green context, ...): an error when the
// persistent path was forced, else a warning (once) and the caller takes the per-step path.
inline void on_cooperative_launch_refused(const DeviceConfig& cfg, int grid) {
  TORCH_CHECK(cfg.path != PathChoice::Persistent,
              "fused_bptt: the persistent CUDA kernel was forced but the device refused its "
              "cooperative launch of ",
              grid, " blocks (MPS or green-context limits?)");
  TORCH_WARN_ONCE("fused_bptt: the device refused a cooperative launch of ", grid,
                  " blocks (MPS or green-context limits?); taking the slower per-step CUDA path");
}

// resets and lengths, checked and made contiguous; `bounds()` their device pointers for the
// kernels (nullptr where absent). Kept alive by the caller for as long as the kernels run.
struct Boundaries {
  at::Tensor resets, lengths;

  Boundaries(const at::Tensor& x, const std::optional<at::Tensor>& resets_in,
             const std::optional<at::Tensor>& lengths_in) {
    check_boundaries(x, resets_in, lengths_in);
    if (resets_in.has_value()) resets = resets_in->contiguous();
    if (lengths_in.has_value()) lengths = lengths_in->contiguous();
  }
  kernels::SeqBounds bounds() const {
    return {resets.defined() ? resets.const_data_ptr<bool>() : nullptr,
            lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr};
  }
};

// The backward's inputs, checked (check_backward_inputs; boundaries are the caller's) and made
// contiguous; grad_h_n undefined where absent. Shared by rnn_backward_impl and
// rnn_backward_lowp_impl (rnn_launch_lowp.h).
struct BackwardInputs {
  RnnShape s;
  at::Tensor grad_y, x, h0, w_ih, w_hh, y, grad_h_n;

  // B == 0 or H == 0: no kernel to run, every gradient is zero (or empty).
  bool empty() const { return y.numel() == 0; }
  RnnGrads zero_grads() const {
    return {at::zeros_like(x), at::zeros_like(h0), at::zeros_like(w_ih), at::zeros_like(w_hh),
            at::zeros({s.H}, x.options())};
  }
};

inline BackwardInputs backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                                      const at::Tensor& h0, const at::Tensor& w_ih,
                                      const at::Tensor& w_hh, const at::Tensor& y,
                                      const std::optional<at::Tensor>& grad_h_n) {
  const RnnShape s = check_backward_inputs(grad_y, x, h0, w_ih, w_hh, y, grad_h_n);
  return {s, grad_y.contiguous(), x.contiguous(), h0.contiguous(), w_ih.contiguous(),
          w_hh.contiguous(), y.contiguous(),
          grad_h_n.has_value() ? grad_h_n->contiguous() : at::Tensor()};
}

// Blocks for an elementwise kernel over n entries: enough to cover them, at most 4 per SM.
inline int elementwise_blocks(int64_t n, const DeviceConfig& cfg) {
  return static_cast<int>(std::min<int64_t>((n + cfg.threads - 1) / cfg.threads, 4 * cfg.num_sms));
}

// y [T, B, H] (see fused_bptt.h).
template <class Dev>
at::Tensor rnn_forward_impl(const Dev& dev, const at::Tensor& x_in, const at::Tensor& h0_in,
                            const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                            const std::optional<at::Tensor>& bias_ih,
                            const std::optional<at::Tensor>& bias_hh, bool relu,
                            const std::optional<at::Tensor>& resets,
                            const std::optional<at::Tensor>& lengths) {
  const RnnShape s = check_forward_inputs(x_in, h0_in, w_ih_in, w_hh_in, bias_ih, bias_hh);
  const Boundaries bounds(x_in, resets, lengths);
  const kernels::SeqBounds sb = bounds.bounds();
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
  if (y.numel() == 0) return y;

  const DeviceConfig cfg = dev.config();
  check_config(cfg);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_forward_cuda", [&] {
    auto kernel = &kernels::rnn_forward_persistent_kernel<scalar_t>;
    PersistentPlan plan = plan_persistent(false, s.B, s.H, sizeof(scalar_t), cfg);
    plan.params.T = static_cast<int>(s.T);
    plan.params.relu = relu;
    if (persistent_possible(dev, cfg, kernel, plan, s.T, s.B, s.H)) {
      // A refused launch runs nothing: y still holds the projection the per-step path needs.
      if (dev.launch_cooperative(kernel, plan.grid, cfg.threads, plan.smem,
                                 h0.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(),
                                 y.mutable_data_ptr<scalar_t>(), sb, plan.params))
        return;
      on_cooperative_launch_refused(cfg, plan.grid);
    }
    // Per step: carry = h_{t-1} W_hh^T (a GEMM), then y_t = act(y_t + carry) in place, with the
    // rows' boundaries (rnn_forward_step_kernel).
    const at::Tensor w_hh_t = w_hh.t();
    at::Tensor carry = at::empty({s.B, s.H}, x.options());
    const int blocks = elementwise_blocks(s.B * s.H, cfg);
    for (int64_t t = 0; t < s.T; ++t) {
      at::mm_out(carry, t == 0 ? h0 : y[t - 1], w_hh_t);
      dev.launch(&kernels::rnn_forward_step_kernel<scalar_t>, blocks, cfg.threads, 0,
                 carry.const_data_ptr<scalar_t>(), y[t].mutable_data_ptr<scalar_t>(), sb,
                 static_cast<int>(t), static_cast<int>(s.T), static_cast<int>(s.B),
                 static_cast<int>(s.H), relu);
    }
  });
  return y;
}

// (dx, dh0, dW_ih, dW_hh, db) from grad_y (+ grad_h_n at each row's last step) and the saved y
// (see fused_bptt.h). grad_h_n is added inside the kernels where they read grad_y at that step:
// no copy of grad_y is made.
template <class Dev>
RnnGrads rnn_backward_impl(const Dev& dev, const at::Tensor& grad_y_in, const at::Tensor& x_in,
                           const at::Tensor& h0_in, const at::Tensor& w_ih_in,
                           const at::Tensor& w_hh_in, const at::Tensor& y_in, bool relu,
                           const std::optional<at::Tensor>& grad_h_n_in,
                           const std::optional<at::Tensor>& resets,
                           const std::optional<at::Tensor>& lengths) {
  const BackwardInputs in =
      backward_inputs(grad_y_in, x_in, h0_in, w_ih_in, w_hh_in, y_in, grad_h_n_in);
  const Boundaries bounds(x_in, resets, lengths);
  if (in.empty()) return in.zero_grads();
  const RnnShape& s = in.s;
  const at::Tensor &grad_y = in.grad_y, &x = in.x, &h0 = in.h0, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const at::Tensor &y = in.y, &grad_h_n = in.grad_h_n;
  const kernels::SeqBounds sb = bounds.bounds();
  at::Tensor dz = at::empty({s.T, s.B, s.H}, x.options());
  at::Tensor dh0 = at::empty({s.B, s.H}, x.options());
  at::Tensor dw_hh = at::empty({s.H, s.H}, x.options());
  at::Tensor db = at::empty({s.H}, x.options());
  at::Tensor dx, dw_ih;
  const at::Tensor dz2 = dz.view({s.T * s.B, s.H});
  // dW_ih and dx: GEMMs over all T*B rows of the full dz (reset rows included: a reset cuts only
  // the path through h_{t-1}).
  const auto input_grads = [&] {
    dw_ih = at::mm(dz2.t(), x.view({s.T * s.B, s.I}));
    dx = at::mm(dz2, w_ih).view({s.T, s.B, s.I});
  };

  const DeviceConfig cfg = dev.config();
  check_config(cfg);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_backward_cuda", [&] {
    const scalar_t* ghn = grad_h_n.defined() ? grad_h_n.const_data_ptr<scalar_t>() : nullptr;
    auto kernel = &kernels::rnn_backward_persistent_kernel<scalar_t>;
    PersistentPlan plan = plan_persistent(true, s.B, s.H, sizeof(scalar_t), cfg);
    plan.params.T = static_cast<int>(s.T);
    plan.params.relu = relu;
    if (persistent_possible(dev, cfg, kernel, plan, s.T, s.B, s.H)) {
      // With the batch in groups, each group's share of dW_hh and db, summed below in a fixed
      // order (deterministic).
      const int64_t groups = (s.B + plan.params.rows - 1) / plan.params.rows;
      at::Tensor dw_part = groups == 1 ? dw_hh : at::empty({groups, s.H, s.H}, x.options());
      at::Tensor db_part = groups == 1 ? db : at::empty({groups, s.H}, x.options());
      if (dev.launch_cooperative(
              kernel, plan.grid, cfg.threads, plan.smem, grad_y.const_data_ptr<scalar_t>(), ghn,
              h0.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(),
              y.const_data_ptr<scalar_t>(), dz.mutable_data_ptr<scalar_t>(),
              dh0.mutable_data_ptr<scalar_t>(), dw_part.mutable_data_ptr<scalar_t>(),
              db_part.mutable_data_ptr<scalar_t>(), sb, plan.params)) {
        if (groups > 1) {
          at::sum_out(dw_hh, dw_part, {0});
          at::sum_out(db, db_part, {0});
        }
        input_grads();
        return;
      }
      on_cooperative_launch_refused(cfg, plan.grid);
    }
    // Per step: carry = dz_{t+1} W_hh (a GEMM), then dz_t = (grad_y_t + carry) * act'(y_t), with
    // grad_h_n at each row's last step and the rows' boundaries (rnn_backward_step_kernel).
    const int blocks = elementwise_blocks(s.B * s.H, cfg);
    at::Tensor carry = at::empty({s.B, s.H}, x.options());
    for (int64_t t = s.T - 1; t >= 0; --t) {
      const bool last = t == s.T - 1;
      if (!last) at::mm_out(carry, dz[t + 1], w_hh);
      dev.launch(&kernels::rnn_backward_step_kernel<scalar_t>, blocks, cfg.threads, 0,
                 grad_y[t].const_data_ptr<scalar_t>(), ghn,
                 last ? nullptr : carry.const_data_ptr<scalar_t>(),
                 y[t].const_data_ptr<scalar_t>(), dz[t].mutable_data_ptr<scalar_t>(), sb,
                 static_cast<int>(t), static_cast<int>(s.T), static_cast<int>(s.B),
                 static_cast<int>(s.H), relu);
    }
    at::sum_out(db, dz2, {0});
    input_grads();
    // dh0 and dW_hh take dz through h_{t-1}, a constant 0 where the state was reset: zero those
    // rows of dz in place (db, dW_ih and dx have used them), no [T, B, H] mask.
    if (bounds.resets.defined()) dz.masked_fill_(bounds.resets.unsqueeze(-1), 0);
    at::mm_out(dh0, dz[0], w_hh);
    // dW_hh = dz^T [h0; y[:-1]] as two GEMMs: h0 is not stored next to y, and a concatenation
    // would be a [T, B, H] copy.
    at::mm_out(dw_hh, dz[0].t(), h0);
    const int64_t rest = (s.T - 1) * s.B;  // the rows of steps 1..T-1
    if (rest > 0) {
      dw_hh.addmm_(dz2.narrow(0, s.B, rest).t(), y.view({s.T * s.B, s.H}).narrow(0, 0, rest));
    }
  });
  return {dx, dh0, dw_ih, dw_hh, db};
}

}  // namespace cuda_impl
}  // namespace fused_bptt

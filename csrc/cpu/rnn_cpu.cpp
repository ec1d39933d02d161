// rnn_cpu.cpp: the CPU implementation of fused_bptt::rnn_forward and rnn_backward.
//
// Shapes (time-major, one layer; see fused_bptt.h):
//   x [T, B, I], h0 [B, H], weight_ih [H, I], weight_hh [H, H], bias_ih / bias_hh [H] or none,
//   y [T, B, H] (y[T-1] is h_n), grad_y [T, B, H].
// Forward:  z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh,   y_t = h_t = act(z_t)
// Backward: dz_t = (grad_y_t + [t = T-1] grad_h_n + dz_{t+1} W_hh) * act'(z_t), act' from y alone;
//           dh0 = dz_0 W_hh, dW_hh = dz^T [h0; y[:-1]], dW_ih = dz^T x, db = sum dz, dx = dz W_ih.
// Saved for backward: y only (the caller keeps it; nothing else is allocated for backward).
// Boundaries (resets [T, B] bool, lengths [B] int64; fused_bptt.h): inside the same loops. At each
// step the rows of a thread fall into runs of one kind (RowKind): a run that reads the previous
// state is one call of the step kernel with K = H, a run whose state entering the step is zero
// (a reset; in backward: the next step is reset or past the row's end) one with K = 0, and a
// padded run is zeros. In backward the reset rows of dz are zeroed in place once dx, dW_ih and db
// have been taken from dz, before dh0 and dW_hh: no extra [T, B, H] tensor either way.
//
// Structure, and why:
// - The input projection of all T steps is one GEMM over the T*B rows, written straight into y;
//   only h_{t-1} W_hh^T is sequential. The biases are added inside the step, not in a pass of
//   their own. Where it was measured faster (small H, a row tile per thread: rnn_cpu.h,
//   fuse_input_projection) the step kernel computes x_t W_ih^T itself instead, in the same
//   tile as h_{t-1} W_hh^T, and y is only written.
// - The sequential loop never enters ATen: an ATen op per step costs microseconds of dispatch and
//   allocation, which at H = 64 is more than the step's arithmetic. Each step is either
//     * a hand-written register-tiled kernel with the bias, activation (forward) or grad_y and
//       act' (backward) fused into its epilogue (rnn_step_kernel.inc), while W_hh is below the
//       size measured for the instruction set (rnn_cpu.h, use_blas_step: float32 H <= 512 with
//       AVX-512, H <= 2048 with AVX2): at small H a BLAS call's fixed overhead would dominate.
//       Threads split the batch rows and each runs all T steps on its own rows: rows of the batch
//       are independent sequences, so no thread ever waits for another (no barrier per step);
//     * or, for larger H, one BLAS GEMM (cpu_gemm.h: MKL's sgemm_ resolved at run time, threaded
//       by MKL) followed by the same kernel with K = 0 as the fused elementwise pass.
// - Backward runs the reverse loop producing dz [T, B, H], then every weight gradient and dx as a
//   single GEMM over all T*B rows (dW_hh as two, because h0 is not stored next to y); on two
//   threads up to H = 512 those GEMMs run side by side, one thread each (rnn_cpu.h,
//   concurrent_products), dx in quarters of the steps, part of it taken during the loop by the
//   thread that finishes its rows first (backward_recurrence_early_dx).
// - Small batches (one row tile; up to four at H <= 256 in the forward, two at small H in the
//   backward: rnn_cpu.h, overlap_chunk_steps), where splitting the rows among threads gains
//   little or nothing, or waits for the slower of two unevenly loaded cores: one thread runs the
//   recurrence over all rows while the others run, chunk by chunk of steps, the forward's input
//   projection ahead of it (and then, in the forward, take over half of the rows once every
//   chunk is projected) or the backward's dx (and dW_ih in partial sums) behind it.
// - Determinism: every output element is computed by one fixed sequence of operations; in the
//   recurrence threads split rows, never a reduction, so results are the same bits run after run
//   and, in the recurrence, for any thread count (the BLAS GEMMs and db's column sum may round
//   differently across thread counts, and so may the chunked GEMMs of the overlapped path and the
//   one-thread GEMMs of the concurrent products, which a thread count can switch on or off).
// - bfloat16 and float16 run the same structure in rnn_cpu_lowp.cpp (float32 arithmetic inside).
#include "cpu/rnn_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "cpu/rnn_step_kernel.h"
#include "fused_bptt.h"

namespace fused_bptt {
namespace cpu {
namespace {

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const std::vector<scalar_t>& bias, at::Tensor& y,
                  const RnnShape& s, bool relu, const Bounds& bounds) {
  const int64_t B = s.B, H = s.H, BH = s.B * s.H;
  const GemmMode mode = gemm_mode_from_env();
  const StepKernels<scalar_t>& k = step_kernels<scalar_t>();
  const scalar_t* b = bias.data();
  const scalar_t* h0p = h0.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  auto h_prev = [&](int64_t t) { return t == 0 ? h0p : yp + (t - 1) * BH; };

  const bool blas_step = use_blas_step<scalar_t>(k, mode, H);
  const bool fused_input = !blas_step && fuse_input_projection(k, s);
  const int64_t overlap =
      blas_step || fused_input ? 0 : overlap_chunk_steps(s, false, H * H * sizeof(scalar_t));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  // y = x W_ih^T over steps [t0, t1) (all T*B rows at once, or chunk by chunk when overlapped;
  // with fused_input, inside each step instead).
  auto project = [&](int64_t t0, int64_t t1) {
    gemm<scalar_t>(mode, false, true, (t1 - t0) * B, H, s.I, 1, xp + t0 * B * s.I, s.I,
                   w_ih.data_ptr<scalar_t>(), s.I, 0, yp + t0 * BH, H);
  };
  if (!fused_input && overlap == 0) project(0, s.T);
  if (blas_step) {
    const scalar_t* whh = w_hh.data_ptr<scalar_t>();
    blas_recurrence</*kReverse=*/false>(
        s, bounds, yp,
        [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
          if (kind != RowKind::kCarry) return;
          gemm<scalar_t>(mode, false, true, e - a, H, H, 1, h_prev(t) + a * H, H, whh, H, 1,
                         yp + t * BH + a * H, H);
        },
        [&](RowKind, int64_t t, int64_t a, int64_t e) {
          k.forward(nullptr, nullptr, nullptr, b, yp + t * BH + a * H, e - a, 0, H, relu, nullptr,
                    0, nullptr);
        });
    return;
  }
  // The kernel's w: W_hh^T (and W_ih^T), packed once per call.
  std::vector<scalar_t> w_t(H * H), w_ih_t(fused_input ? s.I * H : 0);
  k.pack(w_hh.data_ptr<scalar_t>(), H, H, 1, H, w_t.data());
  if (fused_input) k.pack(w_ih.data_ptr<scalar_t>(), s.I, H, 1, s.I, w_ih_t.data());
  std::vector<scalar_t> part(BH);
  auto step = [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
    const bool carry = kind == RowKind::kCarry;
    k.forward(carry ? h_prev(t) + a * H : nullptr, w_t.data(), part.data() + a * H, b,
              yp + t * BH + a * H, e - a, carry ? H : 0, H, relu,
              fused_input ? xp + (t * B + a) * s.I : nullptr, s.I,
              fused_input ? w_ih_t.data() : nullptr);
  };
  if (overlap == 0) return kernel_recurrence</*kReverse=*/false>(s, bounds, yp, step);
  // One thread runs the steps; the others project chunks of x ahead of it (rnn_cpu.h).
  overlapped_forward(s, bounds, yp, overlap, step, project);
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                   const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const at::Tensor& y, const RnnShape& s, bool relu, const Bounds& bounds,
                   at::Tensor& dx, at::Tensor& dh0, at::Tensor& dw_ih, at::Tensor& dw_hh,
                   at::Tensor& db, bool grad_y_is_ours) {
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, BH = s.B * s.H;
  const GemmMode mode = gemm_mode_from_env();
  const StepKernels<scalar_t>& k = step_kernels<scalar_t>();
  // dz overwrites grad_y when grad_y is a dense copy of our own: each element of dz_t is written
  // where grad_y_t's was just read, and nothing reads grad_y_t after that (the grad_h_n sum
  // below reads it first). One [T, B, H] buffer fewer.
  at::Tensor dz = grad_y_is_ours ? grad_y : at::empty_like(y);
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* whh = w_hh.data_ptr<scalar_t>();
  // The incoming gradient of step t, read in place: grad_y may be strided (rows of a transposed
  // batch_first gradient are T * H apart; the caller made its last dimension dense), so step t
  // is rows of H elements, ld apart. At a row's last step grad_h_n joins it (h_n is y[T-1], or
  // y[lengths[b]-1, b]), summed into a [B, H] buffer of our own rather than into a copy of all
  // of grad_y.
  const scalar_t* gy = grad_y.data_ptr<scalar_t>();
  const int64_t gy_t = grad_y.stride(0), gy_ld = grad_y.stride(1);
  std::vector<scalar_t> last;
  if (grad_h_n.defined()) {
    const scalar_t* gh = grad_h_n.data_ptr<scalar_t>();
    last.resize(BH);
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* g = gy + (bounds.len[b] - 1) * gy_t + b * gy_ld;
      for (int64_t j = 0; j < H; ++j) last[b * H + j] = g[j] + gh[b * H + j];
    }
  }
  const bool at_last = !last.empty();
  // The incoming gradient of a run of rows of one kind, and its row stride.
  auto grad_at = [&](RowKind kind, int64_t t, int64_t row) {
    return kind == RowKind::kLast && at_last ? last.data() + row * H : gy + t * gy_t + row * gy_ld;
  };
  const auto grad_ld = [&](RowKind kind) { return kind == RowKind::kLast && at_last ? H : gy_ld; };
  auto zero_rows = [&](scalar_t* p, int64_t rows) { std::fill(p, p + rows * H, scalar_t(0)); };

  // Over the steps [t0, t1): dx = dz W_ih, and dz^T x (dW_ih, or its part of it) into out.
  auto dx_rows = [&](int64_t t0, int64_t t1) {
    gemm<scalar_t>(mode, false, false, (t1 - t0) * B, I, H, 1, dzp + t0 * BH, H,
                   w_ih.data_ptr<scalar_t>(), I, 0, dx.data_ptr<scalar_t>() + t0 * B * I, I);
  };
  auto dw_ih_rows = [&](int64_t t0, int64_t t1, scalar_t* out) {
    gemm<scalar_t>(mode, true, false, H, I, (t1 - t0) * B, 1, dzp + t0 * BH, H,
                   x.data_ptr<scalar_t>() + t0 * B * I, I, 0, out, I);
  };
  const bool blas_step = use_blas_step<scalar_t>(k, mode, H);
  // > 0: dx is computed along with the recurrence (overlapped), and dW_ih too, in partial sums,
  // when dw_ih_parts is not empty.
  const int64_t overlap = blas_step ? 0 : overlap_chunk_steps(s, true, H * H * sizeof(scalar_t));
  std::vector<scalar_t> dw_ih_parts;
  // The products after the loop side by side (rnn_cpu.h, concurrent_products); then a thread that
  // finishes its rows of the loop early starts on dx, which is left to compute over [0, dx_from).
  const bool concurrent = overlap == 0 && concurrent_products(s, blas_step);
  const bool early_dx = concurrent && early_dx_on();
  int64_t dx_from = T;

  // dz_{T-1} = grad_y_{T-1} * act'; earlier steps add dz_{t+1} W_hh (K = H) to grad_y_t.
  if (blas_step) {
    // dz_t := the incoming gradient, += dz_{t+1} W_hh (one GEMM per run that carries), then the
    // elementwise pass in place.
    blas_recurrence</*kReverse=*/true>(
        s, bounds, dzp,
        [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
          if (kind == RowKind::kPadded) return;
          scalar_t* dzt = dzp + t * BH;
          for (int64_t row = a; row < e; ++row) {
            const scalar_t* g = grad_at(kind, t, row);
            if (g != dzt + row * H) std::memcpy(dzt + row * H, g, sizeof(scalar_t) * H);
          }
          if (kind != RowKind::kCarry) return;
          gemm<scalar_t>(mode, false, false, e - a, H, H, 1, dzt + BH + a * H, H, whh, H, 1,
                         dzt + a * H, H);
        },
        [&](RowKind, int64_t t, int64_t a, int64_t e) {
          const int64_t o = t * BH + a * H;
          k.backward(nullptr, nullptr, nullptr, dzp + o, H, yp + o, dzp + o, e - a, 0, H, relu);
        });
  } else {
    std::vector<scalar_t> w(H * H), part(BH);  // the kernel's w: W_hh, packed
    k.pack(whh, H, H, H, 1, w.data());
    auto step = [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
      const int64_t o = t * BH + a * H;
      const bool carry = kind == RowKind::kCarry;
      k.backward(carry ? dzp + o + BH : nullptr, w.data(), part.data() + a * H, grad_at(kind, t, a),
                 grad_ld(kind), yp + o, dzp + o, e - a, carry ? H : 0, H, relu);
    };
    if (early_dx) {  // (implies overlap == 0)
      dx_from = backward_recurrence_early_dx(s, bounds, dzp, step, dx_rows);
    } else if (overlap == 0) {
      kernel_recurrence</*kReverse=*/true>(s, bounds, dzp, step);
    } else {
      // One thread runs the steps (t = T-1 .. 0); the others take dx of each chunk it finishes,
      // and on chunks of enough rows dW_ih too, as one [H, I] partial sum per chunk (added up in
      // order below).
      StepChunks chunks(T, overlap);
      if (overlap * B >= kOverlapMinPartialRows) dw_ih_parts.resize(chunks.count() * H * I);
      std::atomic<int64_t> finished{0};  // chunks whose dz the recurrence has written
      auto dx_chunk = [&](int64_t c) {
        StepChunks::spin_until([&] { return finished.load(std::memory_order_acquire) > c; });
        const int64_t t0 = T - chunks.last(c), t1 = T - chunks.first(c);  // its times
        dx_rows(t0, t1);
        if (!dw_ih_parts.empty()) dw_ih_rows(t0, t1, dw_ih_parts.data() + c * H * I);
      };
      auto help = [&] {
        while (chunks.run_next(dx_chunk)) {
        }
      };
      overlapped(
          [&](bool) {
            try {
              recurrence_rows</*kReverse=*/true>(s, bounds, dzp, 0, B, step, [&](int64_t i) {
                if (i % overlap == 0 || i == T) {
                  finished.store((i + overlap - 1) / overlap, std::memory_order_release);
                }
              });
            } catch (...) {  // nothing may wait on it then
              finished.store(chunks.count(), std::memory_order_release);
              throw;
            }
            help();
          },
          help);
    }
  }

  // Everything else is one GEMM over all T*B rows (or a column sum), after the loop; with
  // concurrent products (rnn_cpu.h) each GEMM on one thread, side by side.
  scalar_t* dwhh = dw_hh.data_ptr<scalar_t>();
  // dh0 = dz_0 W_hh and dW_hh = dz^T [h0; y[:-1]] (two GEMMs: h0 is not stored next to y). Where
  // the state was reset, h_{t-1} is a constant 0: dz must have those rows zeroed first (below).
  auto dh0_and_dw_hh = [&] {
    gemm<scalar_t>(mode, false, false, B, H, H, 1, dzp, H, whh, H, 0, dh0.data_ptr<scalar_t>(), H);
    gemm<scalar_t>(mode, true, false, H, H, B, 1, dzp, H, h0.data_ptr<scalar_t>(), H, 0, dwhh, H);
    gemm<scalar_t>(mode, true, false, H, H, (T - 1) * B, 1, dzp + BH, H, yp, H, 1, dwhh, H);
  };
  // db: ATen's column sum (vectorised for the CPU it runs on, cascade-summed for accuracy; the
  // same bits for the same thread count, like the GEMMs).
  auto column_sum = [&] { at::sum_out(db, dz.view({T * B, H}), {0}); };
  const bool resets = bounds.reset != nullptr;
  if (concurrent) {
    products_side_by_side(
        dx_from, resets, [&] { dw_ih_rows(0, T, dw_ih.data_ptr<scalar_t>()); }, dh0_and_dw_hh,
        dx_rows, column_sum);
  } else {
    if (overlap == 0) dx_rows(0, T);
    if (dw_ih_parts.empty()) {
      dw_ih_rows(0, T, dw_ih.data_ptr<scalar_t>());
    } else {  // the chunks' partial sums of dW_ih, added in a fixed order
      scalar_t* d = dw_ih.data_ptr<scalar_t>();
      const int64_t n = H * I, parts = static_cast<int64_t>(dw_ih_parts.size()) / n;
      std::copy_n(dw_ih_parts.data(), n, d);
      for (int64_t c = 1; c < parts; ++c) {
        const scalar_t* p = dw_ih_parts.data() + c * n;
        for (int64_t j = 0; j < n; ++j) d[j] += p[j];
      }
    }
    column_sum();
  }
  // dh0 and dW_hh take dz through h_{t-1}, which is a constant 0 where the state was reset: zero
  // those rows of dz (dx, dW_ih and db have used them already).
  if (resets) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        if (bounds.reset_at(t, b)) zero_rows(dzp + t * BH + b * H, 1);
      }
    }
  }
  if (!concurrent || resets) dh0_and_dw_hh();
}

at::Tensor rnn_forward_cpu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
                           const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                           const std::optional<at::Tensor>& bias_hh, bool relu,
                           const std::optional<at::Tensor>& resets,
                           const std::optional<at::Tensor>& lengths) {
  const RnnShape s = check_forward_inputs(x, h0, weight_ih, weight_hh, bias_ih, bias_hh);
  check_boundaries(x, resets, lengths);
  const at::Tensor r = resets.has_value() ? resets->contiguous() : at::Tensor();
  const at::Tensor l = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const Bounds bounds(s, r, l);
  at::Tensor y = at::empty({s.T, s.B, s.H}, x.options());
  if (at::isReducedFloatingType(x.scalar_type())) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_forward_cpu", [&] {
      forward_lowp<scalar_t>(x.contiguous(), h0.contiguous(), weight_ih.contiguous(),
                             weight_hh.contiguous(), bias_ih, bias_hh, y, s, relu, bounds);
    });
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_forward_cpu", [&] {
    // b_ih + b_hh once, so the step adds one bias vector.
    std::vector<scalar_t> bias(s.H, scalar_t(0));
    for (const auto* b : {&bias_ih, &bias_hh}) {
      if (!b->has_value()) continue;
      const at::Tensor bc = (*b)->contiguous();
      const scalar_t* bp = bc.data_ptr<scalar_t>();
      for (int64_t j = 0; j < s.H; ++j) bias[j] += bp[j];
    }
    forward_impl<scalar_t>(x.contiguous(), h0.contiguous(), weight_ih.contiguous(),
                           weight_hh.contiguous(), bias, y, s, relu, bounds);
  });
  return y;
}

RnnGrads rnn_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const at::Tensor& y, bool relu, const std::optional<at::Tensor>& grad_h_n,
                          const std::optional<at::Tensor>& resets,
                          const std::optional<at::Tensor>& lengths) {
  const RnnShape s = check_backward_inputs(grad_y, x, h0, weight_ih, weight_hh, y, grad_h_n);
  check_boundaries(x, resets, lengths);
  const at::Tensor r = resets.has_value() ? resets->contiguous() : at::Tensor();
  const at::Tensor l = lengths.has_value() ? lengths->contiguous() : at::Tensor();
  const Bounds bounds(s, r, l);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dh0 = at::empty_like(h0, at::MemoryFormat::Contiguous);
  at::Tensor dw_ih = at::empty_like(weight_ih, at::MemoryFormat::Contiguous);
  at::Tensor dw_hh = at::empty_like(weight_hh, at::MemoryFormat::Contiguous);
  at::Tensor db = at::empty({s.H}, x.options());
  // grad_y is read in place when its last dimension is dense (a transposed batch_first gradient
  // is); one value everywhere (the gradient of y.sum() or y.mean(), a scalar expanded) is read as
  // one row of H (strides 0, 0, 1); anything else is made dense.
  const bool dense_rows = grad_y.stride(2) == 1 || s.H == 1;
  const bool one_value = !dense_rows && grad_y.numel() > 0 && grad_y.stride(0) == 0 &&
                         grad_y.stride(1) == 0 && grad_y.stride(2) == 0;
  const at::Tensor gy = dense_rows ? grad_y
                        : one_value
                            ? grad_y.select(0, 0).select(0, 0).contiguous().expand({s.T, s.B, s.H})
                            : grad_y.contiguous();
  const bool grad_y_is_ours = !dense_rows && !one_value;
  const at::Tensor ghn = grad_h_n.has_value() ? grad_h_n->contiguous() : at::Tensor();
  if (at::isReducedFloatingType(x.scalar_type())) {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_backward_cpu", [&] {
      backward_lowp<scalar_t>(gy, ghn, x.contiguous(), h0.contiguous(), weight_ih.contiguous(),
                              weight_hh.contiguous(), y.contiguous(), s, relu, bounds, dx, dh0,
                              dw_ih, dw_hh, db);
    });
    return {dx, dh0, dw_ih, dw_hh, db};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_bptt_rnn_backward_cpu", [&] {
    backward_impl<scalar_t>(gy, ghn, x.contiguous(), h0.contiguous(), weight_ih.contiguous(),
                            weight_hh.contiguous(), y.contiguous(), s, relu, bounds, dx, dh0, dw_ih,
                            dw_hh, db, grad_y_is_ours);
  });
  return {dx, dh0, dw_ih, dw_hh, db};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fused_bptt, CPU, m) {
  m.impl("rnn_forward", &cpu::rnn_forward_cpu);
  m.impl("rnn_backward", &cpu::rnn_backward_cpu);
}

}  // namespace fused_bptt

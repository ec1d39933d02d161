// rnn_cpu.h: what the float32/float64 (rnn_cpu.cpp) and bfloat16/float16 (rnn_cpu_lowp.cpp)
// implementations of the CPU ops share: the size thresholds of their paths, the row split, the
// sequence boundaries (resets, lengths), and the low-precision entry points that rnn_cpu.cpp
// dispatches to. Shapes and math: rnn_cpu.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "cpu/rnn_step_kernel.h"
#include "fused_bptt.h"

namespace fused_bptt {
namespace cpu {

// The hand-written step streams all of W_hh from cache every step: it wins while W_hh fits in a
// core's L2 (2 MiB on the machines measured; 1 MiB and more on current x86 server cores). From
// there on (float32, and the widened weights of bfloat16/float16: H > 512) a step is one BLAS
// call, whose blocking and threads do better and whose call overhead no longer matters.
constexpr int64_t kKernelMaxWeightBytes = 1 << 20;
// Below this much work a call stays on one thread: starting the others costs microseconds.
constexpr int64_t kParallelMinFma = 1 << 18;       // multiply-adds of a whole recurrence
constexpr int64_t kParallelMinElements = 1 << 14;  // elements of one elementwise pass

// Whether a step is one BLAS call rather than the hand-written kernel, whose weights are W
// (float32 for bfloat16/float16 too). FUSED_BPTT_CPU_GEMM=blas takes the BLAS step at every size.
template <typename W>
bool use_blas_step(GemmMode mode, int64_t H) {
  return mode == GemmMode::kBlas ||
         (mode == GemmMode::kAuto && blas_available(mode) &&
          H * H * static_cast<int64_t>(sizeof(W)) > kKernelMaxWeightBytes);
}

// Runs fn(r0, r1) on parts of the batch rows [0, B), one per thread, in whole register tiles.
// Row b of every step depends on row b of the step before alone, so a thread can run all T steps
// of its rows without waiting for the others: no barrier per step.
template <typename Fn>
void parallel_rows(int64_t B, bool worth_threads, const Fn& fn) {
  const int64_t tiles = (B + kStepRows - 1) / kStepRows;
  at::parallel_for(0, tiles, worth_threads ? 1 : tiles, [&](int64_t p0, int64_t p1) {
    fn(p0 * kStepRows, std::min(B, p1 * kStepRows));
  });
}

// What step t does with row b.
enum class RowKind { kCarry, kFresh, kLast, kPadded };

// resets and lengths as plain arrays; without them every row is T long and never reset.
struct Bounds {
  int64_t T, B;
  const bool* reset = nullptr;  // [T, B]
  std::vector<int64_t> len;     // [B]

  Bounds(const RnnShape& s, const at::Tensor& resets, const at::Tensor& lengths)
      : T(s.T), B(s.B), len(s.B, s.T) {
    if (resets.defined()) reset = resets.data_ptr<bool>();
    if (lengths.defined()) std::copy_n(lengths.data_ptr<int64_t>(), B, len.begin());
  }
  bool reset_at(int64_t t, int64_t b) const { return reset != nullptr && reset[t * B + b]; }
  // Forward: does step t of row b read h_{t-1}?
  RowKind forward_kind(int64_t t, int64_t b) const {
    if (t >= len[b]) return RowKind::kPadded;
    return reset_at(t, b) ? RowKind::kFresh : RowKind::kCarry;
  }
  // Backward: does dz_t of row b receive dz_{t+1} W_hh, and is grad_h_n added here?
  RowKind backward_kind(int64_t t, int64_t b) const {
    if (t >= len[b]) return RowKind::kPadded;
    if (t == len[b] - 1) return RowKind::kLast;
    return reset_at(t + 1, b) ? RowKind::kFresh : RowKind::kCarry;
  }
};

// Calls fn(kind, a, e) for each maximal run [a, e) of rows of [r0, r1) with the same kind_of(b).
template <typename KindOf, typename Fn>
void for_each_run(int64_t r0, int64_t r1, const KindOf& kind_of, const Fn& fn) {
  while (r0 < r1) {
    const RowKind kind = kind_of(r0);
    int64_t e = r0 + 1;
    while (e < r1 && kind_of(e) == kind) ++e;
    fn(kind, r0, e);
    r0 = e;
  }
}

// The ops for S = c10::BFloat16 or c10::Half (rnn_cpu_lowp.cpp). Arguments checked, contiguous
// (grad_y: dense rows, ld = stride(1)), outputs allocated; grad_h_n may be undefined.
template <typename S>
void forward_lowp(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const std::optional<at::Tensor>& bias_ih,
                  const std::optional<at::Tensor>& bias_hh, at::Tensor& y, const RnnShape& s,
                  bool relu, const Bounds& bounds);

template <typename S>
void backward_lowp(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                   const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const at::Tensor& y, const RnnShape& s, bool relu, const Bounds& bounds,
                   at::Tensor& dx, at::Tensor& dh0, at::Tensor& dw_ih, at::Tensor& dw_hh,
                   at::Tensor& db);

}  // namespace cpu
}  // namespace fused_bptt

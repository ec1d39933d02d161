// rnn_cpu.h: what the float32/float64 (rnn_cpu.cpp) and bfloat16/float16 (rnn_cpu_lowp.cpp)
// implementations of the CPU ops share: the size thresholds of their paths, the row split, the
// sequence boundaries (resets, lengths), the loops over time of both paths (step kernel, BLAS),
// and the low-precision entry points that rnn_cpu.cpp dispatches to. Shapes and math: rnn_cpu.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <thread>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "cpu/rnn_step_kernel.h"
#include "env.h"
#include "fused_bptt.h"

namespace fused_bptt {
namespace cpu {

// The hand-written step streams all of W_hh from cache every step; beyond a size a step is one
// BLAS call instead (float32, and the widened weights of bfloat16/float16). Measured per machine,
// the only guide there is, and keyed by the instruction set of the kernels:
// - AVX-512 (Xeon, 2 MiB L2; before w was packed per strip): the kernel won while W_hh fitted in
//   L2, so 1 MiB (float32 H <= 512).
// - AVX2 (Zen 3, 512 KiB L2, 32 MiB L3; packed w): the kernel beat the BLAS step (MKL) from L3 up
//   to H = 2048 float32, 16 MiB. Paired, interleaved calls, kernel / BLAS step time, fwd and bwd:
//   float32 H = 1024 0.90/0.90 at B = 64, 0.59/0.73 at B = 8; H = 2048 0.92/0.96 at B = 64,
//   0.84/0.70 at B = 8; bfloat16 H = 1024 0.86/0.93 at B = 64, 0.46/0.69 at B = 8; float64 H = 1024
//   1.06/1.00 at B = 64, 0.59/0.82 at B = 8. At H = 4096 (64 MiB, beyond L3) it lost: 1.24/1.04
//   at B = 64. SSE2 takes the AVX2 figure (not measured apart).
constexpr int64_t kKernelMaxWeightBytesAvx512 = 1 << 20;
constexpr int64_t kKernelMaxWeightBytesAvx2 = 16 << 20;

// Below this much work a call stays on one thread: starting the others costs microseconds.
constexpr int64_t kParallelMinFma = 1 << 18;       // multiply-adds of a whole recurrence
constexpr int64_t kParallelMinElements = 1 << 14;  // elements of one elementwise pass

// Whether the recurrence of shape s has the work to split its rows among threads.
inline bool recurrence_threaded(const RnnShape& s) {
  return s.T * s.B * s.H * s.H >= kParallelMinFma;
}

// Register tiles of kStepRows rows (the last one partial) that B rows make.
inline int64_t row_tiles(int64_t B) {
  return (B + kStepRows - 1) / kStepRows;
}
// The overlapped recurrence (overlap_chunk_steps): two row tiles overlap in the backward while
// W_hh (as the kernel reads it) is at most this big; up to four tiles in the forward while it is
// at most the second size; dW_ih goes in per-chunk partial sums when a chunk has at least this
// many rows.
constexpr int64_t kOverlapMaxWeightBytes = 16 << 10;
constexpr int64_t kOverlapForwardMaxTiles = 4;
constexpr int64_t kOverlapForwardMaxWeightBytes = 256 << 10;
constexpr int64_t kOverlapMinPartialRows = 128;
constexpr int64_t kOverlapForwardChunkRows = 64;

// Whether k (a StepKernels table of any dtype) is the AVX-512 one.
template <typename Kernels>
bool avx512_kernels(const Kernels& k) {
  return std::strcmp(k.isa, "avx512") == 0;
}

// Whether a step is one BLAS call rather than the hand-written kernel k of the call, whose
// weights are W (float32 for bfloat16/float16 too). FUSED_BPTT_CPU_GEMM=blas takes the BLAS step
// at every size.
template <typename W, typename Kernels>
bool use_blas_step(const Kernels& k, GemmMode mode, int64_t H) {
  if (mode == GemmMode::kBlas) return true;
  if (mode != GemmMode::kAuto || !blas_available(mode)) return false;
  const int64_t limit = avx512_kernels(k) ? kKernelMaxWeightBytesAvx512 : kKernelMaxWeightBytesAvx2;
  return H * H * static_cast<int64_t>(sizeof(W)) > limit;
}

// Whether the float32/float64 forward computes x_t W_ih^T inside the step kernel (the tile runs
// k over I, then over H, before one epilogue) instead of as one GEMM over all T*B rows before the
// loop. The input term does not wait for h_{t-1}, so its multiply-adds fill the time the
// recurrence would spend waiting on the previous step's epilogue, and y is written once instead
// of written and read back. It pays where the recurrence has that slack and every thread has whole
// tiles: measured on AVX-512 (2 cores, float32 and float64), the forward ran 18% faster at
// T/B/I/H 256/8/64/64 and 1-5% at 128/{8,16,32}/128/128, 10% at 128/16/1024/128, but 7% slower at
// 64/8/256/256, 25-30% with one row tile (B <= 4 on 2 threads: the GEMM used both cores) and
// 14% with AVX2 at H = 128. On Zen 3 (AVX2, 2 cores, packed w) it ran 23% slower at 256/8/64/64,
// 40% at 128/16/128/128 and 57% at 64/32/256/256 (paired, interleaved calls): MKL's GEMM there does
// the input projection at about twice the step kernel's rate. FUSED_BPTT_CPU_INPUT = gemm | kernel
// forces either path (tests).
template <typename T>
bool fuse_input_projection(const StepKernels<T>& k, const RnnShape& s) {
  enum { kAuto, kGemm, kKernel };
  const int want = env_choice("FUSED_BPTT_CPU_INPUT", {"auto", "gemm", "kernel"});
  if (want != kAuto) return want == kKernel;
  const int64_t row_bytes = s.H * static_cast<int64_t>(sizeof(T));
  const int64_t threads = recurrence_threaded(s) ? at::get_num_threads() : 1;
  return avx512_kernels(k) && row_bytes >= 256 &&  // whole 4-vector tiles
         s.H * row_bytes <= (64 << 10) &&          // W_hh^T in 64 KiB
         s.I * row_bytes <= (512 << 10) &&         // W_ih^T in 512 KiB
         s.B >= kStepRows * threads;               // a row tile per thread
}

// Runs fn(r0, r1) on parts of the batch rows [0, B), one per thread, in whole register tiles.
// Row b of every step depends on row b of the step before alone, so a thread can run all T steps
// of its rows without waiting for the others: no barrier per step.
template <typename Fn>
void parallel_rows(int64_t B, bool worth_threads, const Fn& fn) {
  const int64_t tiles = row_tiles(B);
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

// The two loops over time of every op and dtype (rnn_cpu.cpp, rnn_cpu_lowp.cpp): kReverse = false
// runs t = 0 .. T-1 (forward), true T-1 .. 0 (backward). At each step the rows fall into runs of
// one RowKind (bounds); the rows of a padded run in out_t (out: y or dz, [T, B, H]) are zeroed,
// every other run [a, e) of step t goes to the caller's callbacks as (kind, t, a, e).
template <bool kReverse>
RowKind kind_at(const Bounds& bounds, int64_t t, int64_t row) {
  return kReverse ? bounds.backward_kind(t, row) : bounds.forward_kind(t, row);
}

// Rows [a, e) of out_t [B, H]: the output of a padded run.
template <typename Out>
void zero_run(Out* out_t, int64_t a, int64_t e, int64_t H) {
  std::fill(out_t + a * H, out_t + e * H, Out(0));
}

// The i-th step of the loop's order (kReverse: t = T-1-i, else t = i) on rows [r0, r1).
template <bool kReverse, typename Out, typename Step>
void recurrence_step(const RnnShape& s, const Bounds& bounds, Out* out, int64_t i, int64_t r0,
                     int64_t r1, const Step& step) {
  const int64_t t = kReverse ? s.T - 1 - i : i;
  const auto kind_of = [&](int64_t row) { return kind_at<kReverse>(bounds, t, row); };
  for_each_run(r0, r1, kind_of, [&](RowKind kind, int64_t a, int64_t e) {
    if (kind == RowKind::kPadded) return zero_run(out + t * s.B * s.H, a, e, s.H);
    step(kind, t, a, e);
  });
}

// All T steps of rows [r0, r1) on this thread, in the loop's order: before(i) runs before the
// i-th step of that order, and before(T) after the last.
template <bool kReverse, typename Out, typename Step, typename Before>
void recurrence_rows(const RnnShape& s, const Bounds& bounds, Out* out, int64_t r0, int64_t r1,
                     const Step& step, const Before& before) {
  for (int64_t i = 0; i < s.T; ++i) {
    before(i);
    recurrence_step<kReverse>(s, bounds, out, i, r0, r1, step);
  }
  before(s.T);
}

// The step-kernel path: threads split the batch rows and each runs all T steps of its own rows
// (no barrier per step); step(kind, t, a, e) runs the kernel on rows [a, e) of step t.
template <bool kReverse, typename Out, typename Step>
void kernel_recurrence(const RnnShape& s, const Bounds& bounds, Out* out, const Step& step) {
  parallel_rows(s.B, recurrence_threaded(s), [&](int64_t r0, int64_t r1) {
    recurrence_rows<kReverse>(s, bounds, out, r0, r1, step, [](int64_t) {});
  });
}

// Overlapping the recurrence with the GEMMs around it. The recurrence's threads split the batch
// rows in whole tiles, so a batch of one tile (B <= kStepRows) runs its recurrence on one thread
// while the others wait, and a split of two tiles gains little at small H: on Zen 3 (2 threads,
// AVX2) two threads ran a step of 8 rows at H = 64 only 1.2x faster than one, where MKL's GEMMs
// ran 1.75x faster on two. There, one thread runs the recurrence over all rows while the others
// compute, in chunks of steps, products that are independent from chunk to chunk: the forward's
// input projection x W_ih^T (the recurrence waits for the chunk it reaches, or computes it itself
// if nobody has taken it), the backward's dx = dz W_ih and its partial sums of dW_ih (a chunk
// waits until the recurrence has finished it). Every element of y and dx is still one dot product
// over I or H; dW_ih is summed chunk by chunk, in a fixed order.
// Measured there (paired, interleaved calls, overlapped / split time): one tile, forward 0.80 at
// T/B/H 256/4/64, 0.84 at 256/1/64, 0.86 at 256/1/256, 0.91 at 64/4/256, 0.88 at 32/2/512;
// backward 0.86 at 256/4/64, 0.91 at 256/1/64, 0.92 at 256/1/256. Two tiles, backward 0.89-0.94
// at 256/8/64 and 0.88 at 512/8/32, but 1.03 at H = 96 and 1.04 at 128/8/128 (four tiles: 1.14
// at 128/16/128): the backward overlaps two tiles only while W_hh fits kOverlapMaxWeightBytes.
// The forward with two to four tiles depends on the machine's state. That VM has quiet spells,
// where one thread runs a step of 8 rows at H = 128 in 3.6 us, and contended ones (neighbours on
// the host), where the same step takes 5-7 us, often on one of the two threads more than on the
// other; split rows then wait for the slower thread, and so do MKL's statically split GEMMs.
// Forward, overlapped / split, in runs of paired calls minutes apart: 256/8/64 0.70-0.85 in 8
// runs of 9 (1.10 in one quiet run), 128/8/128 0.78, 64/8/256 0.89-0.90, 256/16/64 0.78 and
// 1.06 (quiet), 64/16/64 0.81 and 1.05 (quiet), 128/16/128 0.82-0.97 in 7 runs of 11, 1.01-1.10
// in 4, 128/16/256 0.90-0.92 and 1.05; at H = 512, 1.00-1.04 at 64/8/512 and 64/16/512; at
// B = 32 0.87-0.90 at 128/32/128 but 1.14 at 64/32/128. So the forward overlaps up to
// kOverlapForwardMaxTiles tiles while W_hh fits kOverlapForwardMaxWeightBytes (H <= 256 in
// float32): at most 6% slower in a quiet spell, up to 30% faster in a contended one.
// Those figures are for about 8 chunks of at most 256 rows each, and a helper that waited idle
// for the end of the recurrence once it had projected the last chunk. The forward now takes
// chunks of at most kOverlapForwardChunkRows rows (the recurrence waits for the first one: 150 us
// of a 1.7 ms forward at 128/16/128 with 256-row chunks) and hands half of the row tiles to the
// helper once it runs out of chunks (overlapped_forward). Forward op, paired against the former
// rule in three runs minutes apart: 128/16/128 0.90, 0.97, 0.97; 256/8/64 0.92, 0.97, 1.00;
// 128/8/128 0.87, 0.87, 0.87; 256/4/64 (one tile: smaller chunks only) 0.91, 0.91, 0.92.
// Chunks of 16 rows ran 1.17-1.22x slower (a BLAS call's fixed cost), of 32 rows 0.96-1.08, of
// 128 rows 0.95-0.99. Against the split rows then: 0.86-0.88 at 128/16/128, 256/8/64, 256/4/64.
// Per-chunk partials of dW_ih pay where chunks have at least kOverlapMinPartialRows rows (at
// 32/2/512, 8 rows a chunk, they made the backward 2x slower).

// Chunks of `per` consecutive steps of the recurrence's order, each run by one thread.
class StepChunks {
 public:
  StepChunks(int64_t T, int64_t per)
      : T_(T), per_(per), count_((T + per - 1) / per), done_(count_) {}
  int64_t count() const { return count_; }
  // The chunk's step indices [first, last).
  int64_t first(int64_t c) const { return c * per_; }
  int64_t last(int64_t c) const { return std::min(T_, (c + 1) * per_); }

  // Takes the next chunk nobody has taken (only up to chunk `upto`), runs work(c) and marks it
  // done; false when there was none to take.
  template <typename Work>
  bool run_next(const Work& work, int64_t upto = INT64_MAX) {
    int64_t c = next_.load(std::memory_order_relaxed);
    do {
      if (c >= count_ || c > upto) return false;
    } while (!next_.compare_exchange_weak(c, c + 1, std::memory_order_relaxed));
    try {
      work(c);
    } catch (...) {  // whoever waits on it goes on; parallel_for rethrows this
      done_[c].store(true, std::memory_order_release);
      throw;
    }
    done_[c].store(true, std::memory_order_release);
    return true;
  }
  // Returns once chunk c is done, meanwhile running on this thread the chunks up to c that nobody
  // has taken. A chunk taken is being run, so this never waits on work nobody does.
  template <typename Work>
  void wait_for(int64_t c, const Work& work) {
    for (int spins = 0; !done_[c].load(std::memory_order_acquire);) {
      if (!run_next(work, c)) spin_pause(spins);
    }
  }

  // Busy-waits (spin_pause) until ready() is true.
  template <typename Ready>
  static void spin_until(const Ready& ready) {
    for (int spins = 0; !ready();) spin_pause(spins);
  }

  // A busy wait's pause: the CPU's spin hint, and after a while the scheduler's turn to others
  // (more threads than cores).
  static void spin_pause(int& spins) {
    if (++spins < 4096) {
#if FUSED_BPTT_X86
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }

 private:
  int64_t T_, per_, count_;
  std::atomic<int64_t> next_{0};
  std::vector<std::atomic<bool>> done_;  // value-initialized: false
};

// Runs rec(beside) on one thread and help() on each other thread of the pool, at the same time;
// beside: help() runs on another thread while rec() does. If there is only one thread (nested in
// a parallel region, or a pool of one), that thread runs rec(false) first and then help(): rec()
// must not wait on help() then (StepChunks::wait_for never does).
template <typename Rec, typename Help>
void overlapped(const Rec& rec, const Help& help) {
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      if (p == 0) {
        rec(p1 == 1 && at::get_num_threads() > 1);
      } else {
        help();
      }
    }
  });
}

// The forward's overlapped recurrence (overlap_chunk_steps): one thread runs the steps
// t = 0 .. T-1 on all rows, waiting before each chunk of `per` steps for its input projection,
// project(t0, t1) (y_t = x_t W_ih^T over the steps [t0, t1)), which the other threads compute
// ahead of it (or which it computes itself where nobody has taken the chunk yet); step(kind, t,
// a, e) as in kernel_recurrence. The projection is the lighter of the two, so its thread runs out
// of chunks first and would then wait idle for the end of the recurrence: instead the first
// helper that runs out takes over the upper half of the row tiles from the next step the
// recurrence starts, and runs those rows to the end itself (a batch of one row tile has nothing
// to hand over). Rows are independent, and every output element is the same sequence of
// operations in whichever tile or thread computes it, so the handover changes no bits.
// FUSED_BPTT_CPU_HANDOFF = auto | half: half (tests) makes the recurrence wait at step T/2 for a
// helper running beside it to ask, so that the handover happens there.
template <typename Out, typename Step, typename Project>
void overlapped_forward(const RnnShape& s, const Bounds& bounds, Out* out, int64_t per,
                        const Step& step, const Project& project) {
  const int64_t T = s.T, B = s.B, tiles = row_tiles(B);
  const int64_t split = tiles >= 2 ? tiles / 2 * kStepRows : B;  // rows [split, B) can move
  const bool at_half = env_choice("FUSED_BPTT_CPU_HANDOFF", {"auto", "half"}) == 1;
  StepChunks chunks(T, per);
  auto project_chunk = [&](int64_t c) { project(chunks.first(c), chunks.last(c)); };
  std::atomic<bool> asked{false};
  std::atomic<int64_t> handed{-1};  // the first step of rows [split, B) on the helper; T: none
  overlapped(
      [&](bool beside) {
        int64_t r1 = B;
        try {
          for (int64_t i = 0; i < T; ++i) {
            if (i % per == 0) chunks.wait_for(i / per, project_chunk);
            if (at_half && beside && i == T / 2 && r1 > split) {
              StepChunks::spin_until([&] { return asked.load(std::memory_order_acquire); });
            }
            if (r1 > split && asked.load(std::memory_order_acquire)) {
              r1 = split;
              handed.store(i, std::memory_order_release);
            }
            recurrence_step</*kReverse=*/false>(s, bounds, out, i, 0, r1, step);
          }
        } catch (...) {  // nobody may wait for the rows then
          if (r1 > split) handed.store(T, std::memory_order_release);
          throw;
        }
        if (r1 > split) handed.store(T, std::memory_order_release);
      },
      [&] {
        try {
          while (chunks.run_next(project_chunk)) {
          }
        } catch (...) {  // the recurrence may be waiting for a request (half)
          asked.store(true, std::memory_order_release);
          throw;
        }
        if (split == B || asked.exchange(true, std::memory_order_acq_rel)) return;
        int64_t from;
        StepChunks::spin_until(
            [&] { return (from = handed.load(std::memory_order_acquire)) >= 0; });
        // Every chunk is taken by now, but another helper may still be running one.
        for (int64_t c = from / per; c < chunks.count(); ++c) chunks.wait_for(c, project_chunk);
        for (int64_t i = from; i < T; ++i) {
          recurrence_step</*kReverse=*/false>(s, bounds, out, i, split, B, step);
        }
      });
}

// The backward's split-row recurrence (kernel_recurrence, reverse order) when its products run
// side by side (concurrent_products): a thread that finishes its rows before the others computes
// dx(t0, t1) = dz W_ih over steps that every row has finished, latest first, in blocks of at
// least kEarlyDxMinRows rows and at most about half the steps the slowest rows have left (a
// bigger block would hold up the end of the loop), until the others are done; returns t_lo, dx
// having been computed over the steps [t_lo, T) (T: none), the rest left to the products. On
// the VM of the figures above, whose cores often slow down unevenly, the split rows otherwise
// leave the faster thread idle at the end of the loop. Each block of dx is one GEMM over rows of
// dz whose values are final, as after the loop. Float32 backward op, early dx / none, paired, in
// runs minutes apart: 128/16/128 0.93-0.99 (5 runs), 64/32/256 0.94-1.00 (5), 128/64/256
// 0.97-0.99 (5), 128/32/128 0.97-0.98 (3), but 32/64/512 1.02 (1); with 1% resets 0.97 at
// 128/64/256 and 1.02 at 128/16/128. A small gain, often none: without the cap on the block it
// lost (1.01, 1.06, 1.18 at the first three shapes).
// FUSED_BPTT_CPU_EARLY_DX = on | off (unset: on).
constexpr int64_t kEarlyDxMinRows = 64;

inline bool early_dx_on() {
  return env_choice("FUSED_BPTT_CPU_EARLY_DX", {"on", "off"}) == 0;
}

template <typename Out, typename Step, typename Dx>
int64_t backward_recurrence_early_dx(const RnnShape& s, const Bounds& bounds, Out* out,
                                     const Step& step, const Dx& dx) {
  const int64_t T = s.T;
  // progress[tile]: how many steps (T-1 down) that row tile has finished; value-initialized: 0.
  std::vector<std::atomic<int64_t>> progress(row_tiles(s.B));
  std::atomic<int64_t> t_lo{T};
  const int64_t rows = std::max<int64_t>(s.B, 1);  // (B = 0: no rows, nothing to wait for)
  const int64_t min_steps = std::max<int64_t>(1, (kEarlyDxMinRows + rows - 1) / rows);
  parallel_rows(s.B, recurrence_threaded(s), [&](int64_t r0, int64_t r1) {
    const int64_t p0 = r0 / kStepRows, p1 = row_tiles(r1);
    auto publish = [&](int64_t i) {
      for (int64_t p = p0; p < p1; ++p) progress[p].store(i, std::memory_order_release);
    };
    try {
      recurrence_rows</*kReverse=*/true>(s, bounds, out, r0, r1, step, publish);
    } catch (...) {  // nobody may wait on these rows then
      publish(T);
      throw;
    }
    for (int spins = 0;;) {
      int64_t done = T;  // steps finished by every row
      for (const auto& p : progress) done = std::min(done, p.load(std::memory_order_acquire));
      if (done == T) return;
      int64_t hi = t_lo.load(std::memory_order_relaxed);
      const int64_t lo = std::max(T - done, hi - std::max(min_steps, (T - done) / 2));
      if (hi - lo >= min_steps && t_lo.compare_exchange_strong(hi, lo)) {
        dx(lo, hi);
        spins = 0;
      } else {
        StepChunks::spin_pause(spins);
      }
    }
  });
  return t_lo.load();
}

// How many steps a chunk of the overlapped recurrence has (above), 0 for the split rows.
// FUSED_BPTT_CPU_OVERLAP = auto | on | off; "on" overlaps at any size and thread count (tests).
inline int64_t overlap_chunk_steps(const RnnShape& s, bool backward, int64_t weight_bytes) {
  enum { kAuto, kOn, kOff };
  const int want = env_choice("FUSED_BPTT_CPU_OVERLAP", {"auto", "on", "off"});
  if (want == kOff || s.B == 0 || s.T == 0) return 0;
  if (want == kAuto) {
    const int64_t tiles = row_tiles(s.B);
    const bool shape_gains =
        tiles == 1 || (backward ? tiles == 2 && weight_bytes <= kOverlapMaxWeightBytes
                                : tiles <= kOverlapForwardMaxTiles &&
                                      weight_bytes <= kOverlapForwardMaxWeightBytes);
    if (!shape_gains || s.T < 2 || at::get_num_threads() < 2 || at::in_parallel_region() ||
        !recurrence_threaded(s)) {
      return 0;
    }
  }
  // About 8 chunks, of at most 256 rows in the backward, kOverlapForwardChunkRows in the forward
  // (whose recurrence waits for the first one).
  const int64_t rows = backward ? 256 : kOverlapForwardChunkRows;
  return std::max<int64_t>(std::min((s.T + 7) / 8, (rows + s.B - 1) / s.B), 1);
}

// The backward's products after its recurrence: dW_ih, dW_hh (and dh0), and dx in parts of the
// steps (two when the figures below were measured, four since: products_side_by_side), each GEMM on
// one thread, side by side (a BLAS call inside a parallel region runs on its own thread), instead
// of one after the other on all threads. With resets, dW_hh and dh0 wait for the reset rows of dz
// to be zeroed, and then run as before. On Zen 3 (2 threads, AVX2, MKL) GEMMs of these shapes ran
// on one thread at about 75 GFLOP/s, and on two at about 110, not 150. Measured there, backward op,
// paired interleaved calls, side by side / one after the other: T/B/H 256/16/64 0.85-0.87,
// 128/16/128 0.92-0.96, 128/32/128 0.93, 128/64/256 0.93-0.94, 64/32/256 0.96-0.98, 64/8/512 0.97,
// 64/32/512 0.98, but 32/64/1024 1.01-1.04 (MKL's threads pay on GEMMs of 4 GFLOP); with 1% resets
// 0.95 at 128/16/128, 0.98-1.01 at 128/64/256; bfloat16 (GEMMs on operands widened to float32,
// rnn_cpu_lowp.cpp) 0.91 at 256/16/64, 0.92 at 128/16/128, 0.97 at 128/64/256, 0.98 at 64/32/256,
// 0.99 at 32/64/512; float16 0.93 at 128/16/128, 0.96 at 64/32/256. (The forward's one GEMM, the
// input projection, in two halves side by side: 0.98-1.02, so it stays whole.) auto takes it with
// exactly two threads, the only count measured, up to kConcurrentMaxH, on the step-kernel path
// without the overlapped recurrence (which runs its own GEMMs beside it). FUSED_BPTT_CPU_PRODUCTS =
// auto | concurrent | serial.
constexpr int64_t kConcurrentMaxH = 512;

inline bool concurrent_products(const RnnShape& s, bool blas_step) {
  enum { kAuto, kConcurrent, kSerial };
  const int want = env_choice("FUSED_BPTT_CPU_PRODUCTS", {"auto", "concurrent", "serial"});
  if (want != kAuto) return want == kConcurrent;
  return !blas_step && s.H <= kConcurrentMaxH && s.T >= 2 && at::get_num_threads() == 2 &&
         !at::in_parallel_region();
}

// Runs every task once, each on one thread, the pool's threads taking them in order as they
// become free (one thread alone runs them in order). A task that throws ends its thread's share;
// parallel_for rethrows it once the others are done.
inline void run_concurrently(const std::vector<std::function<void()>>& tasks) {
  std::atomic<size_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < tasks.size();) tasks[i]();
  });
}

// The backward's products side by side (concurrent_products), the biggest first: dw_ih(), then
// dh0_and_dw_hh() unless there are resets (the caller runs it once the reset rows of dz are
// zeroed), then dx(t0, t1) over each quarter of the steps [0, dx_steps), then db() (a column sum,
// on one thread like the rest, where it would otherwise run alone after them). dx in quarters
// rather than halves leaves less for one thread to finish alone when the other is slower (the VM of
// concurrent_products' figures often runs one core 10-30% slower than the other): float32 backward
// op, quarters / halves, paired, in runs minutes apart: 128/16/128 0.96-0.99 (4 runs), 64/32/256
// 0.97-1.00 (4), 128/64/256 0.95-0.99 (3), 128/32/128 0.985; eighths gained nothing more.
constexpr int64_t kDxParts = 4;

template <typename DwIh, typename DwHh, typename Dx, typename Db>
void products_side_by_side(int64_t dx_steps, bool resets, const DwIh& dw_ih,
                           const DwHh& dh0_and_dw_hh, const Dx& dx, const Db& db) {
  std::vector<std::function<void()>> tasks{dw_ih};
  if (!resets) tasks.emplace_back(dh0_and_dw_hh);
  for (int64_t p = 0; p < kDxParts; ++p) {
    const int64_t t0 = dx_steps * p / kDxParts, t1 = dx_steps * (p + 1) / kDxParts;
    tasks.emplace_back([&dx, t0, t1] { dx(t0, t1); });
  }
  tasks.emplace_back(db);
  run_concurrently(tasks);
}

// The BLAS path, step by step: first, on this thread, gemm(kind, t, a, e) for every run of the
// step (the BLAS GEMM threads itself), then, threads splitting the rows, pass(kind, t, a, e) for
// every run that is not padded: the fused elementwise pass.
template <bool kReverse, typename Out, typename Gemm, typename Pass>
void blas_recurrence(const RnnShape& s, const Bounds& bounds, Out* out, const Gemm& gemm,
                     const Pass& pass) {
  const int64_t T = s.T, B = s.B, H = s.H, BH = s.B * s.H;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = kReverse ? T - 1 - i : i;
    const auto kind_of = [&](int64_t row) { return kind_at<kReverse>(bounds, t, row); };
    for_each_run(0, B, kind_of, [&](RowKind kind, int64_t a, int64_t e) { gemm(kind, t, a, e); });
    parallel_rows(B, BH >= kParallelMinElements, [&](int64_t r0, int64_t r1) {
      for_each_run(r0, r1, kind_of, [&](RowKind kind, int64_t a, int64_t e) {
        if (kind == RowKind::kPadded) return zero_run(out + t * BH, a, e, H);
        pass(kind, t, a, e);
      });
    });
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

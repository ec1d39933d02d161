// rnn_step_kernel.h: one time step of the recurrence, fused with its elementwise work, for the
// widest instruction set this CPU has (AVX-512, AVX2+FMA, or SSE2), picked at run time.
//
// On B rows of an [B, N] output, with acc = a @ w, a: [B, K], w: [K, N] row-major:
//   forward:  y_t  = act(y_t + bias + acc)        a = h_{t-1}, w = W_hh^T, y_t = x_t W_ih^T on entry
//   backward: dz_t = (dy_t + acc) * act'(y_t)     a = dz_{t+1}, w = W_hh; dy_t's rows are ldy apart
// K = 0 makes acc = 0 (the elementwise pass alone, after a BLAS step).
// part: [B, N] scratch for partial sums when K > 128 (unused, may be nullptr, otherwise).
// Row i of the output depends on row i of a alone, and each element is computed the same way
// whichever rows share a call: threads may split the batch rows any way, the bits stay the same.
#pragma once

#include <cstdint>

namespace fused_bptt {
namespace cpu {

// Rows per register tile: row ranges given to threads are best multiples of it.
constexpr int kStepRows = 4;

template <typename T>
struct StepKernels {
  void (*forward)(const T* a, const T* w, T* part, const T* bias, T* y_t, int64_t B, int64_t K,
                  int64_t N, bool relu);
  void (*backward)(const T* a, const T* w, T* part, const T* dy_t, int64_t ldy, const T* y_t,
                   T* dz_t, int64_t B, int64_t K, int64_t N, bool relu);
  const char* isa;  // "avx512", "avx2", "sse2"
};

// The kernels of the best instruction set the CPU supports. FUSED_BPTT_CPU_ISA=avx2 or sse2
// caps the choice (read on every call, for tests; an unsupported request is an error).
template <typename T>
const StepKernels<T>& step_kernels();

}  // namespace cpu
}  // namespace fused_bptt

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
//
// Low precision (S = bfloat16 or float16; StepKernels<S> below): a, dy_t, y_t and dz_t are in S,
// everything else is float32, and so is all arithmetic (the products of S values are exact in
// float32, the sums are float32). w is packed once per call by `pack` into the layout the kernel
// reads (float32 [K, N]; or, for the AVX512-BF16 kernel, bf16 pairs of consecutive k, the layout
// its dot-product instruction wants):
//   forward:  y_t  = S(act(add + bias + acc))     add: [B, N] float32, the input projection x_t
//                                                 W_ih^T (plus h_{t-1} W_hh^T after a BLAS step)
//   backward: dz_t = S((dy_t + add + acc) * act'(y_t))   add: [B, N] float32 or nullptr (the
//                                                 BLAS step's product, or grad_h_n at t = T-1)
// S(v) rounds to nearest even, as torch's .to(dtype) does.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fused_bptt {
namespace cpu {

// Rows per register tile: row ranges given to threads are best multiples of it.
constexpr int kStepRows = 4;

template <typename T>
inline constexpr bool kIsLowPrecision =
    std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

template <typename T>
struct StepKernels {
  void (*forward)(const T* a, const T* w, T* part, const T* bias, T* y_t, int64_t B, int64_t K,
                  int64_t N, bool relu);
  void (*backward)(const T* a, const T* w, T* part, const T* dy_t, int64_t ldy, const T* y_t,
                   T* dz_t, int64_t B, int64_t K, int64_t N, bool relu);
  const char* isa;  // "avx512", "avx2", "sse2"
};

// The kernels of one instruction set for bfloat16 or float16 (S) storage.
template <typename S>
struct LowPrecisionStepKernels {
  // Bytes `pack` writes for a [K, N] w.
  int64_t (*packed_bytes)(int64_t K, int64_t N);
  // w [K, N] from src: w[k, n] = src[k * N + n], or src[n * K + k] when `transposed`.
  void (*pack)(const S* src, bool transposed, int64_t K, int64_t N, void* out);
  void (*forward)(const S* a, const void* w, float* part, const float* bias, const float* add,
                  S* y_t, int64_t B, int64_t K, int64_t N, bool relu);
  void (*backward)(const S* a, const void* w, float* part, const S* dy_t, int64_t ldy,
                   const float* add, const S* y_t, S* dz_t, int64_t B, int64_t K, int64_t N,
                   bool relu);
  const char* isa;  // "avx512_bf16" (bf16 dot products), "avx512", "avx2", "sse2"
};

template <>
struct StepKernels<c10::BFloat16> : LowPrecisionStepKernels<c10::BFloat16> {};
template <>
struct StepKernels<c10::Half> : LowPrecisionStepKernels<c10::Half> {};

// The kernels of the best instruction set the CPU supports. FUSED_BPTT_CPU_ISA=avx2 or sse2
// caps the choice (read on every call, for tests; an unsupported request is an error).
// bfloat16 at the avx512 level runs the AVX512-BF16 dot-product kernel where the CPU has that
// extension, otherwise the widening AVX-512 kernel; float16 has no float32-accumulating dot
// product before AVX10.2, so every level widens its operands to float32.
template <typename T>
const StepKernels<T>& step_kernels();

}  // namespace cpu
}  // namespace fused_bptt

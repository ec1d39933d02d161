// rnn_step_kernel.h: one time step of the recurrence, fused with its elementwise work, for the
// widest instruction set this CPU has (AVX-512, AVX2+FMA, or SSE2), picked at run time.
//
// On B rows of an [B, N] output, with acc = a @ w, a: [B, K] row-major, w: [K, N] as the same
// table's pack() lays it out (once per call; packed panels, see rnn_step_kernel.inc):
//   forward:  y_t  = act(y_t + bias + acc)        a = h_{t-1}, w = W_hh^T, y_t = x_t W_ih^T on entry
//             y_t  = act(bias + x_t W_ih^T + acc) with x_t ([B, I], rows I apart) and w_ih_t =
//                                                 W_ih^T ([I, N], packed) given: y_t is then only
//                                                 written
//   backward: dz_t = (dy_t + acc) * act'(y_t)     a = dz_{t+1}, w = W_hh; dy_t's rows are ldy apart
// K = 0 makes acc = 0 (the elementwise pass alone, after a BLAS step).
// part: [B, N] scratch for partial sums when K > 128 (unused, may be nullptr, otherwise).
// Row i of the output depends on row i of a alone, and each element is computed the same way
// whichever rows share a call: threads may split the batch rows any way, the bits stay the same.
//
// Low precision (S = bfloat16 or float16; StepKernels<S> below): the forward's a and y_t, and the
// backward's dy_t and y_t, are in S; everything else (w, the weights widened once per call by the
// caller; bias; add; the backward's a = dz_{t+1} and dz_t) is float32, and so is all arithmetic
// (products of S values are exact in float32):
//   forward:  y_t  = S(act(add + bias + acc))     add: [B, N], the input projection x_t W_ih^T
//                                                 (plus h_{t-1} W_hh^T after a BLAS step)
//   backward: dz_t = (dy_t + add + acc) * act'(y_t)      add: [B, N] or nullptr (the BLAS step's
//                                                 product, or grad_h_n at t = T-1)
// S(v) rounds to nearest even, as torch's .to(dtype) does. The kernels widen a to float32 and run
// the float32 tile: FMAs on float32 do twice the multiply-adds per cycle of AVX512-BF16's
// VDPBF16PS on the CPUs measured (Xeon with AVX512-BF16 and -FP16: 5.4 FMA vs 1.3 VDPBF16PS
// instructions per ns on one core; a VDPBF16PS kernel ran at 72 GFLOP/s where this one runs
// 119, float32 127). float16 has no float32-accumulating dot product before AVX10.2 anyway.
#pragma once

// The AVX-512 and AVX2 variants (target pragmas, intrinsics, __builtin_cpu_supports) exist on x86
// only; every CPU has the baseline variant.
#if defined(__x86_64__) || defined(__i386__)
#define FUSED_BPTT_X86 1
#else
#define FUSED_BPTT_X86 0
#endif

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
                  int64_t N, bool relu, const T* x_t, int64_t I, const T* w_ih_t);
  void (*backward)(const T* a, const T* w, T* part, const T* dy_t, int64_t ldy, const T* y_t,
                   T* dz_t, int64_t B, int64_t K, int64_t N, bool relu);
  // out (K * N elements) = the w of a [K, N] matrix whose element (k, n) is src[k * sk + n * sn]:
  // sk = N, sn = 1 for a row-major [K, N]; sk = 1, sn = K for the transpose of a row-major [N, K].
  void (*pack)(const T* src, int64_t K, int64_t N, int64_t sk, int64_t sn, T* out);
  const char* isa;  // "avx512", "avx2", "sse2"
};

// The kernels of one instruction set for bfloat16 or float16 (S) storage.
template <typename S>
struct LowPrecisionStepKernels {
  void (*forward)(const S* a, const float* w, float* part, const float* bias, const float* add,
                  S* y_t, int64_t B, int64_t K, int64_t N, bool relu);
  void (*backward)(const float* a, const float* w, float* part, const S* dy_t, int64_t ldy,
                   const float* add, const S* y_t, float* dz_t, int64_t B, int64_t K, int64_t N,
                   bool relu);
  // As StepKernels<T>::pack, widening the weights to float32 (exactly) on the way.
  void (*pack)(const S* src, int64_t K, int64_t N, int64_t sk, int64_t sn, float* out);
  const char* isa;  // "avx512", "avx2", "sse2"
};

template <>
struct StepKernels<c10::BFloat16> : LowPrecisionStepKernels<c10::BFloat16> {};
template <>
struct StepKernels<c10::Half> : LowPrecisionStepKernels<c10::Half> {};

// The kernels of the best instruction set the CPU supports. FUSED_BPTT_CPU_ISA=avx2 or sse2
// caps the choice (read on every call, for tests; an unsupported request is an error).
template <typename T>
const StepKernels<T>& step_kernels();

}  // namespace cpu
}  // namespace fused_bptt

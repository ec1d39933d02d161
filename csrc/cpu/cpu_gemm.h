// cpu_gemm.h: the one GEMM entry point the CPU ops use for their large matrix products.
//
//   C [M, N] = alpha * op(A) @ op(B) + beta * C       all row-major, op(X) = X or X^T
//   A: op(A) is [M, K], stored with row stride lda;  B: op(B) is [K, N], row stride ldb;
//   C: row stride ldc. beta == 0 ignores what C held (NaN included).
//
// Backends, picked per call:
//   blas: the Fortran sgemm_/dgemm_ that the torch CPU wheel's libtorch_cpu exports (MKL), found
//         with dlsym at first use. Calling it directly costs well under a microsecond, where an
//         ATen op costs several (dispatch, a Tensor per operand, the output allocation).
//   aten: at::addmm_ on from_blob views of the same memory, for torch builds that export no BLAS.
// The environment variable FUSED_BPTT_CPU_GEMM selects the path for tests and benchmarks:
//   unset / "auto": blas when available, otherwise aten; the recurrence picks its own kernel by size.
//   "aten":  as on a torch without an exported BLAS (aten GEMMs, hand-written recurrence kernel).
//   "blas":  the recurrence goes through this GEMM at every size too (blas, else aten).
//
// Low precision (gemm_lowp): bfloat16 or float16 A and B, float32 C, float32 accumulation:
//   blas: MKL's gemm_bf16bf16f32_ / gemm_f16f16f32_ from the same library, found the same way
//         (MKL picks AMX, AVX512-BF16 or AVX512-FP16 code by the CPU);
//   aten: at::mm in the low precision (oneDNN where torch has it: float32 accumulation inside,
//         the product rounded once to the dtype), added to C in float32. ATen has no CPU matmul
//         from bfloat16 operands to a float32 result, so this path rounds where the BLAS one does
//         not.
// Where MKL's low-precision GEMM is not the faster one, the ops instead widen their operands to
// float32 once per call and run gemm<float> (lowp_gemms_in_float32): exact products of the same
// numbers, float32 sums, as MKL's. With FUSED_BPTT_CPU_GEMM=auto that is everywhere but bfloat16
// on CPUs with AMX-BF16. On one core of a Xeon with AVX512-BF16 and AVX512-FP16 but no AMX, MKL's
// bfloat16 GEMM ran at 85 GFLOP/s and its sgemm at 157 (AVX512-BF16's dot product does half the
// multiply-adds per cycle of float32 FMAs there); its float16 GEMM at 151, but the float16 ops
// ran 5-10% faster widened (and their backward then never rounds dz). aten and blas always run
// gemm_lowp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fused_bptt {
namespace cpu {

enum class GemmMode { kAuto, kAten, kBlas };

// Reads FUSED_BPTT_CPU_GEMM (once per op call, so a test can switch it between calls).
GemmMode gemm_mode_from_env();

// True when a BLAS sgemm_/dgemm_ was found and `mode` allows it.
bool blas_available(GemmMode mode);

template <typename scalar_t>
void gemm(GemmMode mode, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, scalar_t alpha,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb, scalar_t beta, scalar_t* C,
          int64_t ldc);

// True when, under `mode`, the S ops should run their GEMMs as gemm<float> on operands widened
// to float32 rather than through gemm_lowp (see above).
template <typename S>
bool lowp_gemms_in_float32(GemmMode mode);

// C [M, N] = op(A) @ op(B) + beta * C, A and B in S (bfloat16 or float16), C in float32.
template <typename S>
void gemm_lowp(GemmMode mode, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               const S* A, int64_t lda, const S* B, int64_t ldb, float beta, float* C,
               int64_t ldc);

}  // namespace cpu
}  // namespace fused_bptt

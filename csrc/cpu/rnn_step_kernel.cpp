// rnn_step_kernel.cpp: compiles rnn_step_kernel.inc once per instruction set and picks one at run
// time. setup.py builds without -march, so wider instructions are enabled only inside these target
// regions and used only where __builtin_cpu_supports says the CPU has them. On a CPU that is not
// x86 (aarch64, ...) only the baseline variant is built: the same source in 16-byte GCC vectors,
// which the compiler maps to that CPU's own SIMD (NEON).
#include "cpu/rnn_step_kernel.h"
#include "env.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <type_traits>

// Vectors wider than the baseline ISA passed between inlined helpers: no ABI is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's F16C intrinsics start from a self-initialized "undefined" vector, which it then reports.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <vector>

#if FUSED_BPTT_X86
// The intrinsics of every level (declared for any target; each is used only inside its region).
#include <immintrin.h>
#endif

namespace fused_bptt {
namespace cpu {

#if FUSED_BPTT_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,f16c")
namespace avx512 {
constexpr int kVecBytes = 64;
#include "cpu/rnn_step_kernel.inc"
#include "cpu/rnn_step_lowp.inc"
}  // namespace avx512
#pragma GCC pop_options

// F16C (float16 <-> float32) came before AVX2 on every x86 CPU that has AVX2.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int kVecBytes = 32;
#include "cpu/rnn_step_kernel.inc"
#include "cpu/rnn_step_lowp.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The baseline: SSE2 on x86-64, 16-byte vectors of the CPU's own SIMD elsewhere.
namespace sse2 {
constexpr int kVecBytes = 16;
#include "cpu/rnn_step_kernel.inc"
#include "cpu/rnn_step_lowp.inc"
}  // namespace sse2

namespace {

template <typename T>
const StepKernels<T> kSse2 = sse2::kernel_table<T>("sse2");

#if FUSED_BPTT_X86
template <typename T>
const StepKernels<T> kAvx512 = avx512::kernel_table<T>("avx512");
template <typename T>
const StepKernels<T> kAvx2 = avx2::kernel_table<T>("avx2");

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return has;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_avx2() { return false; }
#endif

}  // namespace

template <typename T>
const StepKernels<T>& step_kernels() {
  enum { kDetect, kWantAvx512, kWantAvx2, kWantSse2 };  // the order of the list below
  const int want = env_choice("FUSED_BPTT_CPU_ISA", {"auto", "avx512", "avx2", "sse2"});
  if (want == kDetect) {
#if FUSED_BPTT_X86
    if (cpu_has_avx512()) return kAvx512<T>;
    if (cpu_has_avx2()) return kAvx2<T>;
#endif
    return kSse2<T>;
  }
  if (want == kWantSse2) return kSse2<T>;
  const bool avx512 = want == kWantAvx512;
  TORCH_CHECK(avx512 ? cpu_has_avx512() : cpu_has_avx2(), "fused_bptt: FUSED_BPTT_CPU_ISA=",
              avx512 ? "avx512" : "avx2", " but this CPU does not support it");
#if FUSED_BPTT_X86
  return avx512 ? kAvx512<T> : kAvx2<T>;
#else
  return kSse2<T>;  // not reached: the check above fails off x86
#endif
}

template const StepKernels<float>& step_kernels<float>();
template const StepKernels<double>& step_kernels<double>();
template const StepKernels<c10::BFloat16>& step_kernels<c10::BFloat16>();
template const StepKernels<c10::Half>& step_kernels<c10::Half>();

}  // namespace cpu
}  // namespace fused_bptt

// mma.cuh: the tensor-core instruction and the 16-bit conversions the bfloat16/float16 kernels
// (rnn_kernels_lowp.cuh) use, on raw 16-bit patterns (uint16_t), so that the kernel source needs
// neither CUDA's nor torch's 16-bit types:
//
//   fb::bf16_to_float(u16) / fb::float_to_bf16(f)   exact widening / round to nearest even
//   fb::half_to_float(u16) / fb::float_to_half(f)
//   fb::mma_m16n8k16<kBf16>(d, a, b)                d += A B for one warp, per the PTX ISA:
//       mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, A [16 x 16],
//       B [16 x 8], D [16 x 8] float32. Every lane of the warp must call it (it is .aligned).
//       With groupID g = lane >> 2 and q = lane % 4, each lane holds (ISA section "Matrix
//       Fragments for mma.m16n8k16 with floating point type"):
//         a[4]: 2 elements each, low half first: a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..],
//               a[2] = A[g][2q+8..], a[3] = A[g+8][2q+8..]
//         b[2]: b[0] = B[2q..2q+1][g], b[1] = B[2q+8..2q+9][g]
//         d[4]: d[0], d[1] = D[g][2q], D[g][2q+1]; d[2], d[3] = D[g+8][2q], D[g+8][2q+1]
//
// nvcc compiles the inline PTX below (sm_80+: bf16 mma has no earlier form; the launcher keeps
// lower architectures off these kernels). The tests compile the kernels against
// tests/emu/mma_emu.h instead, which defines FB_MMA_EMULATION and these names on the CPU: each
// emulated lane holds exactly its registers above and the instruction exchanges them across the
// warp.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fb {

__device__ __forceinline__ float bf16_to_float(uint16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v) << 16);
}
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}
__device__ __forceinline__ float half_to_float(uint16_t v) {
  return __half2float(__ushort_as_half(v));
}
__device__ __forceinline__ uint16_t float_to_half(float f) {
  return __half_as_ushort(__float2half_rn(f));
}

template <bool kBf16>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // unreachable: the launcher refuses devices below sm_80 for these kernels
#endif
}

}  // namespace fb

#elif !defined(FB_MMA_EMULATION)
#error "mma.cuh: compile it with nvcc, or include tests/emu/mma_emu.h before it"
#endif

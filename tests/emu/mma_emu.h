// mma_emu.h: the names of csrc/cuda/mma.cuh on CPU threads, for the SIMT emulation (test-only).
// Include after simt_emu.h and before the kernels.
//
//   fb::bf16_to_float / float_to_bf16, fb::half_to_float / float_to_half: bit-exact IEEE
//       conversions (round to nearest even; NaN stays NaN), as the CUDA intrinsics do.
//   fb::mma_m16n8k16<kBf16>(d, a, b): the warp-wide tensor-core instruction. Each emulated lane
//       passes exactly the registers the PTX ISA gives it (mma.cuh lists the layout); the
//       instruction gathers every lane's a and b registers through three warp exchanges (so a
//       partial warp, or a lane that skips the call, aborts as on the GPU), rebuilds A [16 x 16]
//       and B [16 x 8], and hands each lane its four elements of D = A B + C.
//   Arithmetic: the products of two bf16 / fp16 numbers are exact in float32; each D element is
//   C plus the 16 products, summed in double precision and rounded once to float32. The ISA does
//   not specify the hardware's internal order and rounding of that sum; it may differ from this
//   by a few float32 ulps, far below the bf16/fp16 rounding the kernels add afterwards.
#pragma once

#ifndef FB_SIMT_EMULATION
#error "include tests/emu/simt_emu.h before mma_emu.h"
#endif

#define FB_MMA_EMULATION 1

#include <cstdint>
#include <cstring>

namespace fb {

inline float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

// GCC and Clang on x86-64 and aarch64 have IEEE binary16 as _Float16, converted with round to
// nearest even.
inline float half_to_float(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
}
inline uint16_t float_to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t v;
  std::memcpy(&v, &h, 2);
  return v;
}

namespace mma_detail {
struct Pair {
  uint32_t lo, hi;
};
// Every lane's pair, gathered through one warp exchange (simt_emu.h checks the mask against the
// warp's live lanes: all 32 must take part).
inline void gather(Pair mine, Pair (&all)[32]) {
  simt::warp_exchange(0xffffffffu, mine, [&](simt::Warp& w) {
    for (int lane = 0; lane < 32; ++lane) std::memcpy(&all[lane], w.slot[lane], sizeof(Pair));
    return mine;
  });
}
template <bool kBf16>
float element(uint32_t reg, int high) {
  const uint16_t bits = static_cast<uint16_t>(high ? reg >> 16 : reg & 0xffffu);
  return kBf16 ? bf16_to_float(bits) : half_to_float(bits);
}
}  // namespace mma_detail

template <bool kBf16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using mma_detail::element;
  using mma_detail::Pair;
  Pair a01[32], a23[32], bb[32];
  mma_detail::gather(Pair{a[0], a[1]}, a01);
  mma_detail::gather(Pair{a[2], a[3]}, a23);
  mma_detail::gather(Pair{b[0], b[1]}, bb);
  // A and B rebuilt from the registers of every lane, per the ISA's fragment layout.
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    const uint32_t regs[4] = {a01[lane].lo, a01[lane].hi, a23[lane].lo, a23[lane].hi};
    for (int i = 0; i < 8; ++i) {  // element a_i is half (i & 1) of register i / 2
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = 2 * q + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element<kBf16>(regs[i / 2], i & 1);
    }
    const uint32_t bregs[2] = {bb[lane].lo, bb[lane].hi};
    for (int i = 0; i < 4; ++i) {  // b_i: row 2q + (i & 1) (+ 8 for i >= 2), column g
      B[2 * q + (i & 1) + (i >= 2 ? 8 : 0)][g] = element<kBf16>(bregs[i / 2], i & 1);
    }
  }
  const int lane = static_cast<int>(simt::lane_id()), g = lane >> 2, q = lane & 3;
  for (int i = 0; i < 4; ++i) {  // d_i: row g (+ 8 for i >= 2), column 2q + (i & 1)
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * q + (i & 1);
    double sum = d[i];
    for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
    d[i] = static_cast<float>(sum);
  }
}

}  // namespace fb

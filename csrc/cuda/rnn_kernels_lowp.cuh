// rnn_kernels_lowp.cuh: the bfloat16 / float16 kernels of the CUDA backend: the per-step product
// on tensor cores (mma.sync m16n8k16, float32 accumulation; mma.cuh), everything else in float32
// registers. No torch include: nvcc compiles it into rnn_cuda.cu; the tests compile the same text
// for CPU threads (tests/emu/simt_emu.h and mma_emu.h).
//
// Tensors hold 16-bit patterns (uint16_t); Fmt (Bf16 or F16) says which format. Shapes (see
// fused_bptt.h), all contiguous, row-major:
//   y  [T, B, H]   on entry to the forward kernel y_t holds x_t W_ih^T (one GEMM, rounded to S)
//   W  [H, H]      weight_hh
//   dz [T, B, H]   the backward kernel's output, for the GEMMs afterwards (dx, dW_ih, dW_hh, dh0)
//   resets [T, B] bool, lengths [B] int64: optional (nullptr), semantics of fused_bptt.h
//
// Rounding (the same choices as the CPU's csrc/cpu/rnn_cpu_lowp.cpp):
//   forward   z_t = proj_t + (b_ih + b_hh in float32) + h_{t-1} W^T (float32 accumulation);
//             y_t = act(z_t) rounded to S once. The carried state is y_t in S, as nn.RNN carries
//             it: the backward's act' = 1 - y_t^2 and h_{t-1} = y_{t-1} are exactly the forward's,
//             and the next step's mma takes it as its S operand.
//   backward  dz_t = (grad_y_t [+ grad_h_n at the row's last step] + dz_{t+1} W) * act'(y_t) in
//             float32, rounded to S once: dz_{t+1} is the mma's S operand (as it is the S operand
//             of the CPU's low-precision GEMMs).
//
// Work split: a cooperative launch of `slices` blocks; block s owns hidden units
// [s*J, s*J + nj) (J a multiple of 8, the mma's n) for every batch row, and keeps W's part for
// them in shared memory for the whole launch, as wsl[n][k] (n: its unit, k: the reduction index,
// zero-padded to Kp, a multiple of 16). Each step, the step's input rows (h_{t-1} or dz_{t+1};
// zero for a row that does not carry its state into the step) are staged in shared memory b_tile
// rows at a time, and every warp computes 16 x 8 output tiles (rows x units) with Kp / 16 mmas
// each. One grid barrier between steps.
#pragma once

#include <cstdint>

#include "simt.cuh"  // FB_DYNAMIC_SHARED, the grid barrier, fb::load_as
#include "mma.cuh"

namespace fused_bptt {
namespace kernels_lowp {

struct Bf16 {
  static constexpr bool kIsBf16 = true;
  __device__ __forceinline__ static float widen(uint16_t v) { return fb::bf16_to_float(v); }
  __device__ __forceinline__ static uint16_t round(float f) { return fb::float_to_bf16(f); }
};
struct F16 {
  static constexpr bool kIsBf16 = false;
  __device__ __forceinline__ static float widen(uint16_t v) { return fb::half_to_float(v); }
  __device__ __forceinline__ static uint16_t round(float f) { return fb::float_to_half(f); }
};

constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 16;

struct LowpParams {
  int T, B, H;
  int Kp;      // H rounded up to kMmaK: the reduction length of the mma
  int J;       // units per block, a multiple of kMmaN (the last block may own fewer)
  int slices;  // blocks
  int b_tile;  // rows staged at a time, a multiple of kMmaM
  bool relu;
};

// Row stride of wsl and of the staged rows, in elements: Kp + 8. The 8 rows a fragment load
// reads (one per groupID) then start 4 * odd 32-bit words apart modulo 32 banks, so with the 4
// words along a row the 32 lanes hit 32 distinct banks.
__host__ __device__ inline int lowp_row_stride(int Kp) { return Kp + 8; }

// Shared memory of both kernels, in elements: wsl [J][stride], then stage [b_tile][stride].
__host__ __device__ inline int64_t lowp_smem_elements(int J, int b_tile, int Kp) {
  return static_cast<int64_t>(J + b_tile) * lowp_row_stride(Kp);
}

// The boundaries of fused_bptt.h, read per row.
struct RowBounds {
  const bool* resets;      // [T, B] or nullptr
  const int64_t* lengths;  // [B] or nullptr
  int T, B;
  __device__ __forceinline__ int length(int b) const {
    return lengths != nullptr ? static_cast<int>(lengths[b]) : T;
  }
  __device__ __forceinline__ bool reset(int t, int b) const {
    return resets != nullptr && resets[static_cast<int64_t>(t) * B + b];
  }
  // Whether step t of row b reads the state step t-1 left (forward: h_{t-1} is read; backward:
  // dz_{t-1} receives dz_t W): t is an active step of b and its state is not reset there.
  __device__ __forceinline__ bool carries_into(int t, int b) const {
    return t < length(b) && !reset(t, b);
  }
};

// The A fragment (a 16 x 16 tile, row-major at p, row stride ld elements) and the B fragment
// (B[k][n] = p[n * ld + k], 16 x 8) of this lane, per the layout in mma.cuh: two consecutive
// elements of a row are one aligned 32-bit word.
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint16_t* p, int ld,
                                                int lane) {
  const uint16_t* r0 = p + (lane >> 2) * ld + 2 * (lane & 3);
  const uint16_t* r8 = r0 + 8 * ld;
  a[0] = fb::load_as<uint32_t>(r0);
  a[1] = fb::load_as<uint32_t>(r8);
  a[2] = fb::load_as<uint32_t>(r0 + 8);
  a[3] = fb::load_as<uint32_t>(r8 + 8);
}
__device__ __forceinline__ void load_b_fragment(uint32_t (&b)[2], const uint16_t* p, int ld,
                                                int lane) {
  const uint16_t* r = p + (lane >> 2) * ld + 2 * (lane & 3);
  b[0] = fb::load_as<uint32_t>(r);
  b[1] = fb::load_as<uint32_t>(r + 8);
}

// Copies the block's part of W into shared wsl [J][stride], zero past nj units and past H:
//   transposed = false (forward):  wsl[n][k] = W[j0 + n][k]
//   transposed = true  (backward): wsl[n][k] = W[k][j0 + n]
__device__ __forceinline__ void load_w_part(const uint16_t* __restrict__ w_hh, uint16_t* wsl,
                                            int H, int ld, int J, int j0, int nj,
                                            bool transposed) {
  const int n_all = J * ld, step = static_cast<int>(blockDim.x);
  for (int e = static_cast<int>(threadIdx.x); e < n_all; e += step) {
    const int n = e / ld, k = e - n * ld;
    uint16_t v = 0;
    if (n < nj && k < H)
      v = transposed ? w_hh[static_cast<int64_t>(k) * H + j0 + n]
                     : w_hh[static_cast<int64_t>(j0 + n) * H + k];
    wsl[e] = v;
  }
}

// Stages rows b0 .. b0 + b_tile of v [B, H] (written by other blocks in this launch: read from
// L2 only) into stage [b_tile][ld]; a row that does not carry (carries(b) false), a row past B
// and the columns past H are zero, so they add nothing to the products. When every row of v
// starts 16-byte aligned (H % 8 == 0 and v aligned; the choice is uniform over the block), 8
// elements at a time by asynchronous 16-byte copies (cp.async.cg on sm_80+), all of a thread's
// copies in flight until one wait; otherwise one element at a time with __ldcg. ld is a multiple
// of 8 and the stage starts 16-byte aligned, so every 8-element chunk of it is aligned.
template <class Carries>
__device__ __forceinline__ void stage_rows_lowp(const uint16_t* v, int B, int H, int ld, int b0,
                                                int b_tile, uint16_t* stage, Carries carries) {
  const int step = static_cast<int>(blockDim.x);
  if (H % 8 == 0 && reinterpret_cast<std::uintptr_t>(v) % 16 == 0) {
    const int chunks = ld / 8, n_all = b_tile * chunks;
    for (int e = static_cast<int>(threadIdx.x); e < n_all; e += step) {
      const int r = e / chunks, k = (e - r * chunks) * 8, b = b0 + r;
      uint16_t* dst = stage + r * ld + k;
      if (k < H && b < B && carries(b)) {
        fb::copy_async_16(dst, v + static_cast<int64_t>(b) * H + k);
      } else {
        fb::store_as(dst, float4{0.0f, 0.0f, 0.0f, 0.0f});
      }
    }
    fb::copy_async_wait();
    return;
  }
  const int n_all = b_tile * ld;
  for (int e = static_cast<int>(threadIdx.x); e < n_all; e += step) {
    const int r = e / ld, k = e - r * ld, b = b0 + r;
    stage[e] = (k < H && b < B && carries(b)) ? __ldcg(v + static_cast<int64_t>(b) * H + k)
                                              : uint16_t(0);
  }
}

// acc = (the staged rows of tile mt) x (the W part's units of tile nt) over Kp: Kp / 16 mmas.
// Every lane of the warp calls it.
template <class Fmt>
__device__ __forceinline__ void tile_product(const uint16_t* stage, const uint16_t* wsl, int ld,
                                             int Kp, int mt, int nt, int lane, float (&acc)[4]) {
  const uint16_t* a_at = stage + mt * kMmaM * ld;
  const uint16_t* b_at = wsl + nt * kMmaN * ld;
  for (int k0 = 0; k0 < Kp; k0 += kMmaK) {
    uint32_t a[4], b[2];
    load_a_fragment(a, a_at + k0, ld, lane);
    load_b_fragment(b, b_at + k0, ld, lane);
    fb::mma_m16n8k16<Fmt::kIsBf16>(acc, a, b);
  }
}

// For every (row, unit) output of the rows staged at b0: acc = the product of the staged row with
// the unit's part of W, handed to finish(b, n, acc) (b: batch row, n: unit within the block) by
// the lane that holds it in its accumulator fragment. Warps take the 16 x 8 tiles in turn.
template <class Fmt, class Finish>
__device__ __forceinline__ void block_product(const uint16_t* stage, const uint16_t* wsl,
                                              const LowpParams& p, int b0, int nj,
                                              Finish finish) {
  const int ld = lowp_row_stride(p.Kp), lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5, warps = static_cast<int>(blockDim.x) >> 5;
  const int nb = p.B - b0 < p.b_tile ? p.B - b0 : p.b_tile;
  const int m_tiles = (nb + kMmaM - 1) / kMmaM, n_tiles = (nj + kMmaN - 1) / kMmaN;
  for (int item = warp; item < m_tiles * n_tiles; item += warps) {  // uniform per warp
    const int mt = item / n_tiles, nt = item - mt * n_tiles;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    tile_product<Fmt>(stage, wsl, ld, p.Kp, mt, nt, lane, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // the accumulator layout of mma.cuh
      const int r = mt * kMmaM + (lane >> 2) + (i >= 2 ? 8 : 0);
      const int n = nt * kMmaN + 2 * (lane & 3) + (i & 1);
      if (r < nb && n < nj) finish(b0 + r, n, acc[i]);
    }
  }
}

// What a block of either kernel owns: units [j0, j0 + nj) and its shared memory, wsl [J][ld]
// with its part of W (loaded here; the first staging barrier orders the loads before any read),
// then stage [b_tile][ld].
struct MmaBlock {
  uint16_t* wsl;
  uint16_t* stage;
  int ld, j0, nj;
};
__device__ __forceinline__ MmaBlock mma_block(uint16_t* smem, const uint16_t* w_hh,
                                              const LowpParams& p, bool transposed) {
  const int ld = lowp_row_stride(p.Kp), j0 = static_cast<int>(blockIdx.x) * p.J;
  const MmaBlock blk{smem, smem + static_cast<int64_t>(p.J) * ld, ld, j0,
                     p.H - j0 < p.J ? p.H - j0 : p.J};
  load_w_part(w_hh, blk.wsl, p.H, ld, p.J, j0, blk.nj, transposed);
  return blk;
}

__device__ __forceinline__ float activation_lowp(float z, bool relu) {
  if (relu) return z < 0.0f ? 0.0f : z;  // NaN passes through, as torch.relu
  return tanhf(z);
}

// Forward, all T steps in one cooperative launch.
//   h0 [B, H], w_hh [H, H]: in; bias [H] float32 (b_ih + b_hh) or nullptr;
//   y [T, B, H]: in, the input projection; out, h_1..h_T (0 at steps past a row's length).
//   Step t: y_t[b, j] = act(y_t[b, j] + bias[j] + sum_k h_{t-1}[b, k] W[j, k]), h_{t-1} = y_{t-1}
//   (h0 at t = 0), zero where resets[t, b]. Between steps one grid barrier.
template <class Fmt>
__global__ void __launch_bounds__(256, 1)
    rnn_forward_mma_kernel(const uint16_t* __restrict__ h0, const uint16_t* __restrict__ w_hh,
                           const float* __restrict__ bias, uint16_t* y, const bool* resets,
                           const int64_t* lengths, LowpParams p) {
  FB_DYNAMIC_SHARED(uint16_t, smem);
  const MmaBlock blk = mma_block(smem, w_hh, p, false);
  const RowBounds rb{resets, lengths, p.T, p.B};
  const int64_t step = static_cast<int64_t>(p.B) * p.H;
  fb::GridToken token{};
  for (int t = 0; t < p.T; ++t) {
    if (t > 0) fb::grid_wait(token);
    const uint16_t* h_prev = t == 0 ? h0 : y + (t - 1) * step;
    uint16_t* y_t = y + t * step;
    for (int b0 = 0; b0 < p.B; b0 += p.b_tile) {
      __syncthreads();  // the previous rows in `stage` are no longer read
      stage_rows_lowp(h_prev, p.B, p.H, blk.ld, b0, p.b_tile, blk.stage,
                      [&](int b) { return rb.carries_into(t, b); });
      __syncthreads();
      block_product<Fmt>(blk.stage, blk.wsl, p, b0, blk.nj, [&](int b, int n, float acc) {
        const int j = blk.j0 + n;
        const int64_t i = static_cast<int64_t>(b) * p.H + j;
        float out = 0.0f;
        if (t < rb.length(b)) {
          const float z = Fmt::widen(y_t[i]) + (bias != nullptr ? bias[j] : 0.0f) + acc;
          out = activation_lowp(z, p.relu);
        }
        y_t[i] = Fmt::round(out);
      });
    }
    if (t + 1 < p.T) token = fb::grid_arrive();
  }
}

// Backward recurrence, all T steps (reverse time) in one cooperative launch.
//   grad_y, y [T, B, H], grad_h_n [B, H] or nullptr, w_hh [H, H]: in
//   dz [T, B, H]: out, every element written (0 at steps past a row's length)
//   Step t = T-1 .. 0, for row b of length L (T without lengths):
//     dz_t[b, k] = (grad_y_t[b, k] + [t = L-1] grad_h_n[b, k] + c) * act'(y_t[b, k]),
//     c = sum_j dz_{t+1}[b, j] W[j, k] where step t+1 is active for b and not reset, else 0;
//     dz_t[b] = 0 for t >= L. act' is 1 - y^2 (tanh) or a select on y > 0 (relu: a NaN y passes
//     the gradient on, a NaN gradient is dropped where y <= 0, as autograd's relu backward).
//   The block of units [j0, j0 + nj) keeps wsl[n][j] = W[j][j0 + n]. One grid barrier per step.
template <class Fmt>
__global__ void __launch_bounds__(256, 1)
    rnn_backward_mma_kernel(const uint16_t* __restrict__ grad_y,
                            const uint16_t* __restrict__ grad_h_n,
                            const uint16_t* __restrict__ w_hh, const uint16_t* __restrict__ y,
                            uint16_t* dz, const bool* resets, const int64_t* lengths,
                            LowpParams p) {
  FB_DYNAMIC_SHARED(uint16_t, smem);
  const MmaBlock blk = mma_block(smem, w_hh, p, true);
  const RowBounds rb{resets, lengths, p.T, p.B};
  const int64_t step = static_cast<int64_t>(p.B) * p.H;
  fb::GridToken token{};
  for (int t = p.T - 1; t >= 0; --t) {
    const bool last = t + 1 == p.T;
    if (!last) fb::grid_wait(token);
    // At t = T-1 no row carries: dz + t * step is never read.
    const uint16_t* dz_next = dz + (last ? t : t + 1) * step;
    for (int b0 = 0; b0 < p.B; b0 += p.b_tile) {
      __syncthreads();
      stage_rows_lowp(dz_next, p.B, p.H, blk.ld, b0, p.b_tile, blk.stage,
                      [&](int b) { return !last && rb.carries_into(t + 1, b); });
      __syncthreads();
      block_product<Fmt>(blk.stage, blk.wsl, p, b0, blk.nj, [&](int b, int n, float acc) {
        const int64_t i = static_cast<int64_t>(b) * p.H + blk.j0 + n, at = t * step + i;
        const int len = rb.length(b);
        float out = 0.0f;
        if (t < len) {
          float g = Fmt::widen(grad_y[at]) + acc;
          if (t == len - 1 && grad_h_n != nullptr) g += Fmt::widen(grad_h_n[i]);
          const float yv = Fmt::widen(y[at]);
          out = p.relu ? (yv <= 0.0f ? 0.0f : g) : g * (1.0f - yv * yv);
        }
        dz[at] = Fmt::round(out);
      });
    }
    if (t > 0) token = fb::grid_arrive();
  }
}

}  // namespace kernels_lowp
}  // namespace fused_bptt

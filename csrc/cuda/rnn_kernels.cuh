// rnn_kernels.cuh: the device code of the CUDA backend. No torch include: nvcc compiles it into
// rnn_cuda.cu, g++ compiles the same text against simt_emu.h for the CPU tests and the TSan run.
//
// Notation (see fused_bptt.h): T steps, B batch, H hidden units; all buffers contiguous, row-major.
//   y  [T, B, H]   on entry to the forward kernel y_t holds x_t W_ih^T + b_ih + b_hh (one GEMM)
//   W  [H, H]      weight_hh
//   dz [T, B, H]   workspace the backward kernel fills, for the dW_ih and dx GEMMs afterwards
//
// The persistent kernels split the H hidden units into slices of J consecutive units, one slice per
// block (grid = ceil(H / J), the last slice may be short). A block keeps the part of W its slice
// needs in shared memory for the whole launch, stored "slice-minor" as w[r][c] so kTile adjacent
// columns are one vector load. Each step's input vector (h_{t-1} or dz_{t+1}, [B, H], written by
// every block) is staged in shared memory b_tile rows at a time, so each element comes from L2 once
// per block instead of once per output.
#pragma once

#include <cstdint>
#include <type_traits>

#include "simt.cuh"

namespace fused_bptt {
namespace kernels {

// Threads per block the launcher uses for every kernel here (a multiple of 32: the warp ops need
// whole warps).
constexpr int kMaxThreads = 256;
// Each thread sums kTile adjacent output columns at once: one vector load of W serves kTile FMAs.
constexpr int kTile = 4;

template <typename T>
struct alignas(16) Tile {
  T v[kTile];
};

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Row stride of a W slice in shared memory: whole 16-byte-aligned tiles, and an odd number of them,
// so the rows read by the 8 lanes of a quarter-warp fall in distinct bank groups.
__host__ __device__ inline int slice_stride(int J) {
  const int s = round_up(J, kTile);
  return (s / kTile) % 2 == 1 ? s : s + kTile;
}

// Row stride of the staged input rows: lanes of a group read consecutive entries of one row, and
// rows of different b start `group` banks apart.
__host__ __device__ inline int stage_stride(int len, int group) { return round_up(len, 32) + group; }

// Shared memory of the persistent kernels, in scalars, laid out in this order (each part starts
// 16-byte aligned):
//   w     [H][slice_stride(J)]        the block's slice of W_hh, zero in the padding columns
//   dw    [J][H]  (backward only)     the block's rows of dW_hh, accumulated over t
//   dz    [B][round_up(J, kTile)]     (backward only) this step's dz for the block's units
//   db    [round_up(J, kTile)]        (backward only) the block's entries of db
//   stage [b_tile][stage_stride(H, group)]   rows of the step's input vector (h_{t-1} or dz_{t+1})
struct SmemLayout {
  int64_t dw, dz, db, stage, total;
};
__host__ __device__ inline SmemLayout smem_layout(bool backward, int B, int H, int J, int b_tile, int group) {
  SmemLayout l;
  const int64_t jp = round_up(J, kTile);
  l.dw = static_cast<int64_t>(H) * slice_stride(J);
  l.dz = l.dw + (backward ? round_up(J * H, kTile) : 0);
  l.db = l.dz + (backward ? B * jp : 0);
  l.stage = l.db + (backward ? jp : 0);
  l.total = l.stage + static_cast<int64_t>(b_tile) * stage_stride(H, group);
  return l;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t activation(scalar_t z, bool relu) {
  if (relu) return z < scalar_t(0) ? scalar_t(0) : z;  // NaN passes through, as torch.relu
  if constexpr (std::is_same_v<scalar_t, float>) {
    return tanhf(z);
  } else {
    return tanh(z);
  }
}

// act'(z) from y = act(z): 1 - y^2 for tanh, [y > 0] for relu.
template <typename scalar_t>
__device__ __forceinline__ scalar_t activation_grad(scalar_t y, bool relu) {
  if (relu) return y > scalar_t(0) ? scalar_t(1) : scalar_t(0);
  return scalar_t(1) - y * y;
}

// Sum over aligned groups of `group` lanes (a power of two <= 32); every lane of the warp must call.
template <typename scalar_t>
__device__ __forceinline__ scalar_t group_sum(scalar_t v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Copies the slice of W a block needs into shared memory w [H][slice_stride(J)], zero-padded:
//   columns_of_w = false (forward):  w[r][c] = W[c0 + c][r]   (rows c0.. of W, transposed)
//   columns_of_w = true  (backward): w[r][c] = W[r][c0 + c]   (columns c0.. of W)
template <typename scalar_t>
__device__ __forceinline__ void load_w_slice(const scalar_t* __restrict__ w_hh, scalar_t* w, int H, int J,
                                             int c0, int nc, bool columns_of_w) {
  const int stride = slice_stride(J);
  for (int e = threadIdx.x; e < H * stride; e += blockDim.x) {
    const int r = e / stride, c = e - (e / stride) * stride;
    scalar_t value = scalar_t(0);
    if (c < nc) value = columns_of_w ? w_hh[static_cast<int64_t>(r) * H + c0 + c]
                                     : w_hh[static_cast<int64_t>(c0 + c) * H + r];
    w[e] = value;
  }
}

// out(b, c) = sum_{r < len} v[b, r] * w[r][c]   for b < B, c < ncols; epilogue(b, c, out) once each.
//   v:     [B, len] in global memory, written by other blocks earlier in this launch: read with
//          __ldcg (from L2, never a stale L1 line), b_tile rows at a time into `stage`.
//   w:     shared, [len][slice_stride(J)] with ncols <= J.
//   stage: shared, [b_tile][stage_stride(len, group)].
// Work item = (b, tile of kTile columns); `group` consecutive lanes split r for one item and meet
// in a shuffle reduction. Loop bounds are uniform per warp, so every lane reaches every shuffle.
// Barriers: __syncthreads before and after staging each tile of rows (every thread must call).
template <typename scalar_t, typename Epilogue>
__device__ __forceinline__ void block_matvec(const scalar_t* v, int len, const scalar_t* w, int J,
                                             scalar_t* stage, int b_tile, int B, int ncols, int group,
                                             Epilogue&& epilogue) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups_per_warp = 32 / group;
  const int groups_per_block = static_cast<int>(blockDim.x >> 5) * groups_per_warp;
  const int member = lane & (group - 1);
  const int w_stride = slice_stride(J), s_stride = stage_stride(len, group);
  const int n_tiles = (ncols + kTile - 1) / kTile;
  for (int b0 = 0; b0 < B; b0 += b_tile) {
    const int nb = B - b0 < b_tile ? B - b0 : b_tile;
    __syncthreads();  // the previous rows in `stage` are no longer read
    for (int e = threadIdx.x; e < nb * len; e += blockDim.x) {
      const int b = e / len, r = e - (e / len) * len;
      stage[b * s_stride + r] = __ldcg(v + static_cast<int64_t>(b0 + b) * len + r);
    }
    __syncthreads();
    const int n_out = nb * n_tiles;
    for (int base = warp * groups_per_warp; base < n_out; base += groups_per_block) {
      const int o = base + lane / group;
      const int b = o / n_tiles, tile = o - (o / n_tiles) * n_tiles;
      scalar_t acc[kTile] = {};
      if (o < n_out) {
        const scalar_t* row = stage + b * s_stride;
        const scalar_t* col = w + tile * kTile;
        for (int r = member; r < len; r += group) {
          const scalar_t x = row[r];
          const Tile<scalar_t> wt = fb::load_as<Tile<scalar_t>>(col + r * w_stride);
FB_UNROLL
          for (int k = 0; k < kTile; ++k) acc[k] += x * wt.v[k];
        }
      }
FB_UNROLL
      for (int k = 0; k < kTile; ++k) acc[k] = group_sum(acc[k], group);
      if (o < n_out && member == 0) {
FB_UNROLL
        for (int k = 0; k < kTile; ++k)
          if (tile * kTile + k < ncols) epilogue(b0 + b, tile * kTile + k, acc[k]);
      }
    }
  }
}

// Forward, all T steps in one cooperative launch.
//   h0 [B, H], w_hh [H, H], y [T, B, H] (in: the input projection; out: h_1..h_T).
//   Block k owns hidden units j in [k*J, k*J + nj): shared w[r][jj] = W[k*J + jj][r], loaded once
//   (layout: smem_layout).
//   Step t: y_t[b, j] = act(y_t[b, j] + sum_r h_{t-1}[b, r] W[j, r]) for the block's j, with
//   h_{t-1} = y_{t-1} (h0 at t = 0) written by every block at step t-1 and staged b_tile rows at a
//   time; then one grid barrier (none after the last step).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rnn_forward_persistent_kernel(const scalar_t* __restrict__ h0, const scalar_t* __restrict__ w_hh,
                                  scalar_t* y, int T, int B, int H, int J, int b_tile, int group, bool relu) {
  FB_DYNAMIC_SHARED(scalar_t, smem);
  const SmemLayout layout = smem_layout(false, B, H, J, b_tile, group);
  scalar_t* const w = smem;
  scalar_t* const stage = smem + layout.stage;
  const int j0 = static_cast<int>(blockIdx.x) * J;
  const int nj = H - j0 < J ? H - j0 : J;
  load_w_slice(w_hh, w, H, J, j0, nj, false);  // block_matvec's first barrier orders it
  const int64_t step = static_cast<int64_t>(B) * H;
  for (int t = 0; t < T; ++t) {
    const scalar_t* h_prev = t == 0 ? h0 : y + (t - 1) * step;
    scalar_t* y_t = y + t * step;
    block_matvec(h_prev, H, w, J, stage, b_tile, B, nj, group, [&](int b, int jj, scalar_t acc) {
      scalar_t& out = y_t[static_cast<int64_t>(b) * H + j0 + jj];
      out = activation(out + acc, relu);
    });
    if (t + 1 < T) fb::grid_sync();
  }
}

// Backward, all T steps (reverse time) and dh0 in one cooperative launch.
//   grad_y, y [T, B, H], h0 [B, H], w_hh [H, H]  in
//   dz [T, B, H], dh0 [B, H], dw_hh [H, H], db [H]  out (every element written)
//   Block k owns hidden units k0 = k*J .. k0 + nk:
//     - for the recurrence it needs columns k0.. of W: shared w[j][kk] = W[j][k0 + kk];
//     - it computes dz_t[:, k0..] and therefore owns rows k0.. of dW_hh and entries k0.. of db,
//       accumulated over t in shared memory by a fixed thread each: no atomics, deterministic.
//   Shared memory: smem_layout(true, ...).
//   Step t = T-1 .. 0:
//     dz_t[b, k] = (grad_y_t[b, k] + sum_j dz_{t+1}[b, j] W[j, k]) * act'(y_t[b, k])   (no sum at T-1)
//     __syncthreads (the block's dz_t complete in shared memory)
//     dw[k - k0][:] += sum_b dz_t[b, k] h_{t-1}[b, :],  db[k - k0] += sum_b dz_t[b, k]
//     grid barrier (dz_t of every block visible; shared dz free for the next step)
//   Then dh0[b, k] = sum_j dz_0[b, j] W[j, k] and the dw / db slices are written out.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rnn_backward_persistent_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ h0,
                                   const scalar_t* __restrict__ w_hh, const scalar_t* __restrict__ y,
                                   scalar_t* dz, scalar_t* __restrict__ dh0, scalar_t* __restrict__ dw_hh,
                                   scalar_t* __restrict__ db, int T, int B, int H, int J, int b_tile,
                                   int group, bool relu) {
  FB_DYNAMIC_SHARED(scalar_t, smem);
  const SmemLayout layout = smem_layout(true, B, H, J, b_tile, group);
  scalar_t* const w = smem;
  scalar_t* const dw = smem + layout.dw;
  scalar_t* const dz_own = smem + layout.dz;
  scalar_t* const db_own = smem + layout.db;
  scalar_t* const stage = smem + layout.stage;
  const int jp = round_up(J, kTile);
  const int k0 = static_cast<int>(blockIdx.x) * J;
  const int nk = H - k0 < J ? H - k0 : J;
  const int n_tiles = (nk + kTile - 1) / kTile;
  load_w_slice(w_hh, w, H, J, k0, nk, true);
  // dz_own's padding columns stay zero: the dw tiles below read them.
  for (int e = threadIdx.x; e < layout.stage - layout.dw; e += blockDim.x) dw[e] = scalar_t(0);
  const int64_t step = static_cast<int64_t>(B) * H;
  for (int t = T - 1; t >= 0; --t) {
    const int64_t at_t = t * step;
    // At t = T-1 there is no dz_{t+1}: a zero-length sum (dz + at_t is never read).
    const scalar_t* dz_next = dz + (t + 1 < T ? at_t + step : at_t);
    block_matvec(dz_next, t + 1 < T ? H : 0, w, J, stage, b_tile, B, nk, group,
                 [&](int b, int kk, scalar_t carry) {
                   const int64_t i = at_t + static_cast<int64_t>(b) * H + k0 + kk;
                   const scalar_t g = (grad_y[i] + carry) * activation_grad(y[i], relu);
                   dz[i] = g;
                   dz_own[b * jp + kk] = g;
                 });
    __syncthreads();
    // Thread (tile, r) adds kTile rows of dw at column r: one load of h_{t-1}[b, r] per kTile FMAs.
    const scalar_t* h_prev = t == 0 ? h0 : y + at_t - step;
    for (int e = threadIdx.x; e < n_tiles * H; e += blockDim.x) {
      const int tile = e / H, r = e - (e / H) * H;
      scalar_t acc[kTile] = {};
      for (int b = 0; b < B; ++b) {
        const scalar_t x = h_prev[static_cast<int64_t>(b) * H + r];
        const Tile<scalar_t> g = fb::load_as<Tile<scalar_t>>(dz_own + b * jp + tile * kTile);
FB_UNROLL
        for (int k = 0; k < kTile; ++k) acc[k] += g.v[k] * x;
      }
FB_UNROLL
      for (int k = 0; k < kTile; ++k)
        if (tile * kTile + k < nk) dw[(tile * kTile + k) * H + r] += acc[k];
    }
    for (int kk = threadIdx.x; kk < nk; kk += blockDim.x) {
      scalar_t acc = scalar_t(0);
      for (int b = 0; b < B; ++b) acc += dz_own[b * jp + kk];
      db_own[kk] += acc;
    }
    fb::grid_sync();
  }
  block_matvec(dz, H, w, J, stage, b_tile, B, nk, group, [&](int b, int kk, scalar_t acc) {
    dh0[static_cast<int64_t>(b) * H + k0 + kk] = acc;
  });
  for (int e = threadIdx.x; e < nk * H; e += blockDim.x) dw_hh[static_cast<int64_t>(k0) * H + e] = dw[e];
  for (int kk = threadIdx.x; kk < nk; kk += blockDim.x) db[k0 + kk] = db_own[kk];
}

// One step of the per-step (fallback) backward, elementwise over n = B*H entries:
//   dz_t = (grad_y_t + carry) * act'(y_t),   carry = dz_{t+1} W_hh from a GEMM (nullptr at t = T-1).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rnn_backward_step_kernel(const scalar_t* __restrict__ grad_y_t, const scalar_t* __restrict__ carry,
                             const scalar_t* __restrict__ y_t, scalar_t* __restrict__ dz_t, int64_t n,
                             bool relu) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const scalar_t g = carry == nullptr ? grad_y_t[i] : grad_y_t[i] + carry[i];
    dz_t[i] = g * activation_grad(y_t[i], relu);
  }
}

}  // namespace kernels
}  // namespace fused_bptt

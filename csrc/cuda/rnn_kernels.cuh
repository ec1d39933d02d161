// rnn_kernels.cuh: the device code of the CUDA backend. No torch include: nvcc compiles it into
// rnn_cuda.cu; the tests compile the same text for CPU threads (simt.cuh says how).
//
// Notation (see fused_bptt.h): T steps, B batch, H hidden units; all buffers contiguous, row-major.
//   y  [T, B, H]   on entry to the forward kernel y_t holds x_t W_ih^T + b_ih + b_hh (one GEMM)
//   W  [H, H]      weight_hh
//   dz [T, B, H]   workspace the backward kernel fills, for the dW_ih and dx GEMMs afterwards
//   resets [T, B] bool, lengths [B] int64   optional sequence boundaries (SeqBounds)
//
// The persistent kernels run all T steps in one cooperative launch on a grid of
// `slices` x `groups` blocks. The H hidden units are cut into slices of J consecutive units (J a
// multiple of kTile; the last slice may be shorter), the B batch rows into groups of `rows`
// consecutive rows (the last may be shorter); block g * slices + s computes the units of slice s
// for the rows of group g. A block keeps the part of W its slice needs in shared memory for the
// whole launch, stored "slice-minor" as w[r][c] so that kTile adjacent columns are one vector
// load. Each step's input vector (h_{t-1} or dz_{t+1}: rows written by every block of the batch
// group) is staged in shared memory b_tile rows at a time: each element comes from L2 once per
// block instead of once per output, and a block copies only its own group's rows.
#pragma once

#include <cstdint>
#include <type_traits>

#include "block_matvec.cuh"

namespace fused_bptt {
namespace kernels {

// Threads per block the launcher uses for every kernel here (a multiple of 32: the warp ops need
// whole warps).
constexpr int kMaxThreads = 256;
// The launch parameters of both persistent kernels (the launcher's plan, rnn_launch.h).
struct PersistentParams {
  int T, B, H;
  int J;       // hidden units per slice, a multiple of kTile (the last slice may be shorter)
  int slices;  // the grid is slices * ceil(B / rows) blocks
  int rows;    // batch rows per group (the last group may be shorter)
  int b_tile;  // rows staged at a time, <= rows; kRows rows x (J / kTile) tiles <= one item/lane
  int group;   // lanes per work item, a power of two <= 32
  bool relu;
};

// Shared memory of the persistent kernels, in scalars, laid out in this order (every part starts
// 16-byte aligned: all sizes are multiples of kTile):
//   w     [H][slice_stride(J)]       the block's slice of W_hh, zero in the padding columns
//   dw    [J][H]     (backward only) the block's rows of dW_hh, accumulated over t
//   dz    [rows][J]  (backward only) this step's dz for the block's units and rows
//   db    [J]        (backward only) the block's entries of db
//   stage [b_tile][stage_stride(H)]  rows of the step's input vector (h_{t-1} or dz_{t+1})
struct SmemLayout {
  int64_t dw, dz, db, stage, total;
};
__host__ __device__ inline SmemLayout smem_layout(bool backward, int rows, int H, int J,
                                                  int b_tile) {
  SmemLayout l;
  l.dw = static_cast<int64_t>(H) * slice_stride(J);
  l.dz = l.dw + (backward ? static_cast<int64_t>(J) * H : 0);
  l.db = l.dz + (backward ? static_cast<int64_t>(rows) * J : 0);
  l.stage = l.db + (backward ? J : 0);
  l.total = l.stage + static_cast<int64_t>(b_tile) * stage_stride(H);
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

// dz from the incoming gradient g and y = act(z): g * (1 - y^2) for tanh. For relu a select, as
// autograd's relu backward: 0 where y <= 0, g elsewhere (a NaN y passes g on; a NaN g is dropped
// where y <= 0, which a multiply by [y > 0] would not do).
template <typename scalar_t>
__device__ __forceinline__ scalar_t backward_gate(scalar_t g, scalar_t y, bool relu) {
  if (relu) return y <= scalar_t(0) ? scalar_t(0) : g;
  return g * (scalar_t(1) - y * y);
}

// Sequence boundaries (fused_bptt.h), device pointers, nullptr when absent. Every kernel decides
// per row and step what a step does (RowStep) and selects rather than multiplies: a reset row's
// product with a non-finite state is dropped, as the reference's constant 0 state drops it.
//   resets  [T, B]: the state entering step t of row b is zero
//   lengths [B]:    row b ends after lengths[b] steps; later steps output 0, dz 0
// Neither needs a [T, B, H] buffer: a row's kind is read from these two small arrays.
struct SeqBounds {
  const bool* resets;
  const int64_t* lengths;
};

// What step t does with row b. Forward: kCarry adds h_{t-1} W^T, kFresh (a reset) does not,
// kPadded outputs 0. Backward: kCarry adds dz_{t+1} W, kFresh does not (step t+1 is reset), kLast
// does not either and adds grad_h_n (the row's last step), kPadded is 0.
enum RowStep { kCarry, kFresh, kLast, kPadded };

__device__ __forceinline__ bool reset_at(const SeqBounds& sb, int t, int b, int B) {
  return sb.resets != nullptr && sb.resets[static_cast<int64_t>(t) * B + b];
}
__device__ __forceinline__ int length_of(const SeqBounds& sb, int b, int T) {
  return sb.lengths != nullptr ? static_cast<int>(sb.lengths[b]) : T;
}
__device__ __forceinline__ RowStep forward_row_step(const SeqBounds& sb, int t, int b, int B,
                                                    int T) {
  if (t >= length_of(sb, b, T)) return kPadded;
  return reset_at(sb, t, b, B) ? kFresh : kCarry;
}
__device__ __forceinline__ RowStep backward_row_step(const SeqBounds& sb, int t, int b, int B,
                                                     int T) {
  const int len = length_of(sb, b, T);
  if (t >= len) return kPadded;
  if (t == len - 1) return kLast;
  return reset_at(sb, t + 1, b, B) ? kFresh : kCarry;
}

// Per-output flags of a lane, one bit per output k (k is a compile-time index after unrolling,
// so these stay in one register each).
__device__ __forceinline__ void set_flag(unsigned& flags, int k, bool on) {
  flags = (flags & ~(1u << k)) | (static_cast<unsigned>(on) << k);
}
__device__ __forceinline__ bool flag(unsigned flags, int k) { return (flags >> k) & 1u; }

// The block's part of the problem: units [j0, j0 + nj), batch rows [b0, b0 + nb).
struct BlockPart {
  int j0, nj, b0, nb, group_index;
};
__device__ __forceinline__ BlockPart block_part(const PersistentParams& p) {
  const int s = static_cast<int>(blockIdx.x) % p.slices;
  const int g = static_cast<int>(blockIdx.x) / p.slices;
  const int j0 = s * p.J, b0 = g * p.rows;
  return BlockPart{j0, p.H - j0 < p.J ? p.H - j0 : p.J, b0, p.B - b0 < p.rows ? p.B - b0 : p.rows,
                   g};
}

// Forward step t for one block: y_t[b, j] = act(projection + h_{t-1} W^T), without the product
// where row b is reset at t, and 0 past the row's length. b is relative to the block's first row.
template <typename scalar_t>
struct ForwardStep {
  scalar_t* y_t;
  SeqBounds sb;
  int t, T, B, H, j0, b0;
  bool relu;
  scalar_t pre[kOut];  // the projection of this lane's outputs, loaded ahead
  unsigned fresh, padded;  // per output: no h_{t-1} W^T / outputs 0
  __device__ __forceinline__ int64_t index(int b, int c) const {
    return static_cast<int64_t>(b0 + b) * H + j0 + c;
  }
  __device__ __forceinline__ void prefetch(int k, int b, int c) {
    const RowStep kind = forward_row_step(sb, t, b0 + b, B, T);
    set_flag(fresh, k, kind == kFresh);
    set_flag(padded, k, kind == kPadded);
    pre[k] = y_t[index(b, c)];
  }
  __device__ __forceinline__ void finish(int k, int b, int c, scalar_t acc) {
    y_t[index(b, c)] =
        flag(padded, k) ? scalar_t(0) : activation(flag(fresh, k) ? pre[k] : pre[k] + acc, relu);
  }
};

// Forward, all T steps in one cooperative launch.
//   h0 [B, H], w_hh [H, H], y [T, B, H] (in: the input projection; out: h_1..h_T).
//   Block (s, g) owns units j in [s*J, s*J + nj) and rows of group g: shared w[r][jj] =
//   W[s*J + jj][r], loaded once (layout: smem_layout).
//   Step t: y_t[b, j] = act(y_t[b, j] + sum_r h_{t-1}[b, r] W[j, r]), with h_{t-1} = y_{t-1} (h0
//   at t = 0) written by the group's blocks at step t-1; the sum is left out where row b is reset
//   at t, and y_t[b] = 0 from t = lengths[b] on (sb, ForwardStep). Between steps one grid
//   barrier, split: arrive once y_t is written, load step t+1's projection, then wait.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rnn_forward_persistent_kernel(const scalar_t* __restrict__ h0,
                                  const scalar_t* __restrict__ w_hh, scalar_t* y, SeqBounds sb,
                                  PersistentParams p) {
  FB_DYNAMIC_SHARED(scalar_t, smem);
  const SmemLayout layout = smem_layout(false, p.rows, p.H, p.J, p.b_tile);
  scalar_t* const w = smem;
  scalar_t* const stage = smem + layout.stage;
  const BlockPart part = block_part(p);
  // block_matvec's first barrier orders the loads of w before its reads.
  load_w_slice(w_hh, w, p.H, p.J, part.j0, part.nj, true);
  const int64_t step = static_cast<int64_t>(p.B) * p.H;
  const int64_t rows_at = static_cast<int64_t>(part.b0) * p.H;  // the block's first row
  ForwardStep<scalar_t> fs{y, sb, 0, p.T, p.B, p.H, part.j0, part.b0, p.relu, {}, 0u, 0u};
  fb::GridToken token{};
  for (int t = 0; t < p.T; ++t) {
    fs.y_t = y + t * step;
    fs.t = t;
    prefetch_first_tile(fs, part.nb, part.nj, p.b_tile, p.group);
    if (t > 0) fb::grid_wait(token);
    const scalar_t* h_prev = (t == 0 ? h0 : y + (t - 1) * step) + rows_at;
    block_matvec(h_prev, p.H, w, slice_stride(p.J), stage, p.b_tile, part.nb, part.nj, p.group, fs);
    if (t + 1 < p.T) token = fb::grid_arrive();
  }
}

// Backward step t for one block: dz_t = (grad_y_t [+ grad_h_n at the row's last step]
// [+ dz_{t+1} W unless that is the last step or step t+1 is reset]) * act', 0 past the row's end.
template <typename scalar_t>
struct BackwardStep {
  const scalar_t* grad_y_t;
  const scalar_t* grad_h_n;  // [B, H] or nullptr
  const scalar_t* y_t;
  scalar_t* dz_t;
  scalar_t* dz_own;  // shared [rows][J]
  SeqBounds sb;
  int t, T, B, H, J, j0, b0;
  bool relu;
  scalar_t pre_g[kOut], pre_y[kOut];  // incoming gradient and y of this lane's outputs
  unsigned no_carry, padded;          // per output: no dz_{t+1} W / dz is 0
  __device__ __forceinline__ int64_t index(int b, int c) const {
    return static_cast<int64_t>(b0 + b) * H + j0 + c;
  }
  __device__ __forceinline__ void prefetch(int k, int b, int c) {
    const int64_t i = index(b, c);
    const RowStep kind = backward_row_step(sb, t, b0 + b, B, T);
    set_flag(no_carry, k, kind != kCarry);
    set_flag(padded, k, kind == kPadded);
    pre_g[k] = grad_h_n != nullptr && kind == kLast ? grad_y_t[i] + grad_h_n[i] : grad_y_t[i];
    pre_y[k] = y_t[i];
  }
  __device__ __forceinline__ void finish(int k, int b, int c, scalar_t carry) {
    const scalar_t g =
        flag(padded, k)
            ? scalar_t(0)
            : backward_gate(flag(no_carry, k) ? pre_g[k] : pre_g[k] + carry, pre_y[k], relu);
    dz_t[index(b, c)] = g;
    dz_own[b * J + c] = g;
  }
};

// dh0 = dz_0 W for the block's units and rows; 0 for a row reset at t = 0 (h0 never reaches it).
template <typename scalar_t>
struct Dh0Step {
  scalar_t* dh0;
  SeqBounds sb;
  int B, H, j0, b0;
  __device__ __forceinline__ void prefetch(int, int, int) {}
  __device__ __forceinline__ void finish(int, int b, int c, scalar_t acc) {
    dh0[static_cast<int64_t>(b0 + b) * H + j0 + c] =
        reset_at(sb, 0, b0 + b, B) ? scalar_t(0) : acc;
  }
};

// dw[c][r] += sum_b dz_own[b][c] h_prev[b, r] and db[c] += sum_b dz_own[b][c] for the block's
// nc units and nb rows; h_prev [nb, H] is an input (y_{t-1} or h0). Rows b with reset[b] (the
// step's resets of these rows, or nullptr) read a constant 0 state: they add to db only.
// Thread (tile, r) adds kTile rows of dw at column r: consecutive threads read consecutive r
// (coalesced), the dz tile is a shared broadcast; the b loop is unrolled so several loads of
// h_prev are in flight.
template <typename scalar_t>
__device__ __forceinline__ void accumulate_weight_grads(const scalar_t* __restrict__ h_prev,
                                                        const scalar_t* dz_own, scalar_t* dw,
                                                        scalar_t* db, const bool* reset,
                                                        int H, int J, int nc, int nb) {
  const int n_tiles = (nc + kTile - 1) / kTile, n = n_tiles * H;
  const int step = static_cast<int>(blockDim.x);
  RowCursor at(static_cast<int>(threadIdx.x), step, H);
  for (int e = static_cast<int>(threadIdx.x); e < n; e += step, at.advance()) {
    const int tile = at.row, r = at.col;
    scalar_t acc[kTile] = {};
#pragma unroll 4
    for (int b = 0; b < nb; ++b) {
      const scalar_t x =
          reset != nullptr && reset[b] ? scalar_t(0) : h_prev[static_cast<int64_t>(b) * H + r];
      const Tile<scalar_t> g = fb::load_as<Tile<scalar_t>>(dz_own + b * J + tile * kTile);
#pragma unroll
      for (int k = 0; k < kTile; ++k) acc[k] += g.v[k] * x;
    }
#pragma unroll
    for (int k = 0; k < kTile; ++k)
      if (tile * kTile + k < nc) dw[(tile * kTile + k) * H + r] += acc[k];
  }
  for (int c = static_cast<int>(threadIdx.x); c < nc; c += step) {
    scalar_t acc = scalar_t(0);
    for (int b = 0; b < nb; ++b) acc += dz_own[b * J + c];
    db[c] += acc;
  }
}

// Backward, all T steps (reverse time) and dh0 in one cooperative launch.
//   grad_y, y [T, B, H], grad_h_n [B, H] or nullptr, h0 [B, H], w_hh [H, H]  in
//   dz [T, B, H], dh0 [B, H]  out (every element written)
//   dw_out [groups][H, H], db_out [groups][H]  out: batch group g's share of dW_hh and db (the
//   launcher sums the groups; with one group they are dW_hh and db)
//   Block (s, g) owns units k0 = s*J .. k0 + nk and the rows of group g:
//     - for the recurrence it needs columns k0.. of W: shared w[j][kk] = W[j][k0 + kk];
//     - it computes dz_t[rows of g, k0..] and therefore owns rows k0.. of group g's dW_hh and
//       entries k0.. of its db, accumulated over t in shared memory by a fixed thread each: no
//       atomics, deterministic.
//   Shared memory: smem_layout(true, ...).
//   Step t = T-1 .. 0:
//     dz_t[b, k] = (grad_y_t[b, k] [+ grad_h_n[b, k] at T-1] + sum_j dz_{t+1}[b, j] W[j, k])
//                  * act'(y_t[b, k])   (no sum at T-1)
//     with boundaries (sb): grad_h_n joins at the row's last step lengths[b]-1, which takes no
//     sum, nor does a step t whose row is reset at t+1; dz_t[b] = 0 from t = lengths[b] on
//     __syncthreads (the block's dz_t complete in shared memory); grid barrier arrive (dz_t
//     published)
//     dw[k - k0][:] += sum_b dz_t[b, k] h_{t-1}[b, :] over the rows not reset at t,
//     db[k - k0] += sum_b dz_t[b, k], while the other blocks arrive; grid barrier wait before
//     step t-1 reads dz_t
//   Then dh0[b, k] = sum_j dz_0[b, j] W[j, k] (0 where row b is reset at 0) and the dw / db
//   slices are written out.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads, 1)
    rnn_backward_persistent_kernel(const scalar_t* __restrict__ grad_y,
                                   const scalar_t* __restrict__ grad_h_n,
                                   const scalar_t* __restrict__ h0,
                                   const scalar_t* __restrict__ w_hh,
                                   const scalar_t* __restrict__ y, scalar_t* dz,
                                   scalar_t* __restrict__ dh0, scalar_t* __restrict__ dw_out,
                                   scalar_t* __restrict__ db_out, SeqBounds sb,
                                   PersistentParams p) {
  FB_DYNAMIC_SHARED(scalar_t, smem);
  const SmemLayout layout = smem_layout(true, p.rows, p.H, p.J, p.b_tile);
  scalar_t* const w = smem;
  scalar_t* const dw = smem + layout.dw;
  scalar_t* const dz_own = smem + layout.dz;
  scalar_t* const db = smem + layout.db;
  scalar_t* const stage = smem + layout.stage;
  const BlockPart part = block_part(p);
  const int w_stride = slice_stride(p.J);
  load_w_slice(w_hh, w, p.H, p.J, part.j0, part.nj, false);
  // dz_own's columns past nj stay zero: the dw tiles read them.
  for (int64_t e = threadIdx.x; e < layout.stage - layout.dw; e += blockDim.x) dw[e] = 0;
  const int64_t step = static_cast<int64_t>(p.B) * p.H;
  const int64_t rows_at = static_cast<int64_t>(part.b0) * p.H;  // the block's first row
  BackwardStep<scalar_t> bs{grad_y, grad_h_n, y, dz, dz_own, sb, 0, p.T, p.B,
                            p.H, p.J, part.j0, part.b0, p.relu, {}, {}, 0u, 0u};
  // The resets of the block's rows at step t, for the weight gradient (nullptr without resets).
  const bool* const resets_at = sb.resets != nullptr ? sb.resets + part.b0 : nullptr;
  fb::GridToken token{};
  for (int t = p.T - 1; t >= 0; --t) {
    const int64_t at_t = t * step;
    bs.t = t;
    bs.grad_y_t = grad_y + at_t;
    bs.y_t = y + at_t;
    bs.dz_t = dz + at_t;
    prefetch_first_tile(bs, part.nb, part.nj, p.b_tile, p.group);
    const bool last = t + 1 == p.T;
    if (!last) fb::grid_wait(token);
    // At t = T-1 there is no dz_{t+1}: a zero-length sum (dz + at_t is never read).
    block_matvec(dz + (last ? at_t : at_t + step) + rows_at, last ? 0 : p.H, w, w_stride, stage,
                 p.b_tile, part.nb, part.nj, p.group, bs);
    __syncthreads();
    token = fb::grid_arrive();
    const scalar_t* h_prev = (t == 0 ? h0 : y + at_t - step) + rows_at;
    accumulate_weight_grads(h_prev, dz_own, dw, db,
                            resets_at != nullptr ? resets_at + static_cast<int64_t>(t) * p.B
                                                 : nullptr,
                            p.H, p.J, part.nj, part.nb);
  }
  fb::grid_wait(token);
  Dh0Step<scalar_t> ds{dh0, sb, p.B, p.H, part.j0, part.b0};
  block_matvec(dz + rows_at, p.H, w, w_stride, stage, p.b_tile, part.nb, part.nj, p.group, ds);
  scalar_t* const dw_group = dw_out + static_cast<int64_t>(part.group_index) * p.H * p.H;
  for (int e = threadIdx.x; e < part.nj * p.H; e += blockDim.x)
    dw_group[static_cast<int64_t>(part.j0) * p.H + e] = dw[e];
  for (int c = threadIdx.x; c < part.nj; c += blockDim.x)
    db_out[static_cast<int64_t>(part.group_index) * p.H + part.j0 + c] = db[c];
}

// The per-step (fallback) path, elementwise over the n = B*H entries of one step, i = b*H + j.
// Forward step t: y_t = act(y_t + carry), carry = h_{t-1} W_hh^T from a GEMM; without carry where
// row b is reset at t, 0 past its length (forward_row_step).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    rnn_forward_step_kernel(const scalar_t* __restrict__ carry, scalar_t* __restrict__ y_t,
                            SeqBounds sb, int t, int T, int B, int H, bool relu) {
  const int64_t n = static_cast<int64_t>(B) * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const RowStep kind = forward_row_step(sb, t, static_cast<int>(i / H), B, T);
    y_t[i] = kind == kPadded ? scalar_t(0)
                             : activation(kind == kFresh ? y_t[i] : y_t[i] + carry[i], relu);
  }
}

// Backward step t: dz_t = (grad_y_t [+ grad_h_n at the row's last step] [+ carry]) * act'(y_t),
// carry = dz_{t+1} W_hh from a GEMM (nullptr at t = T-1), left out at the row's last step and
// where the row is reset at t+1; 0 past the row's length (backward_row_step). grad_h_n [B, H] or
// nullptr.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
    rnn_backward_step_kernel(const scalar_t* __restrict__ grad_y_t,
                             const scalar_t* __restrict__ grad_h_n,
                             const scalar_t* __restrict__ carry, const scalar_t* __restrict__ y_t,
                             scalar_t* __restrict__ dz_t, SeqBounds sb, int t, int T, int B, int H,
                             bool relu) {
  const int64_t n = static_cast<int64_t>(B) * H;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const RowStep kind = backward_row_step(sb, t, static_cast<int>(i / H), B, T);
    scalar_t g = grad_y_t[i];
    if (grad_h_n != nullptr && kind == kLast) g += grad_h_n[i];
    if (carry != nullptr && kind == kCarry) g += carry[i];
    dz_t[i] = kind == kPadded ? scalar_t(0) : backward_gate(g, y_t[i], relu);
  }
}

}  // namespace kernels
}  // namespace fused_bptt

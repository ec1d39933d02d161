// block_matvec.cuh: the block-level pieces of the persistent kernels (rnn_kernels.cuh): staging
// rows of the step's input vector into shared memory, loading a slice of W, and the block's
// matrix-vector product over them with its per-lane work items. No torch include (simt.cuh).
#pragma once

#include <cstdint>

#include "simt.cuh"

namespace fused_bptt {
namespace kernels {

// A work item is kRows batch rows x kTile adjacent output columns: one vector load of W serves
// kTile columns of kRows rows (kRows * kTile FMAs), one load of the input serves kTile FMAs.
constexpr int kTile = 4;
constexpr int kRows = 2;
constexpr int kOut = kRows * kTile;
// Iterations of the matrix-vector loop whose shared loads are issued before their FMAs.
constexpr int kUnroll = 4;
// Independent scalar global loads each thread has in flight in the staging copy (when rows are
// not 16-byte aligned) before its first shared store.
constexpr int kStageLoads = 8;

template <typename T>
struct alignas(16) Tile {
  T v[kTile];
};

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Row stride of a W slice in shared memory (J is a multiple of kTile): an odd number of 16-byte
// tiles, so the rows read by the 8 lanes of a quarter-warp fall in distinct bank groups.
__host__ __device__ inline int slice_stride(int J) { return (J / kTile) % 2 == 1 ? J : J + kTile; }

// Row stride of the staged input rows: 16-byte aligned rows (the 16-byte staging copies),
// consecutive rows kTile scalars apart in the banks.
__host__ __device__ inline int stage_stride(int len) { return round_up(len, 32) + kTile; }

// Sum over aligned groups of `group` lanes (a power of two <= 32); every lane of the warp must
// call.
template <typename scalar_t>
__device__ __forceinline__ scalar_t group_sum(scalar_t v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// (row, col) of the flat index e = row * len + col as a thread walks e = threadIdx.x,
// threadIdx.x + blockDim.x, ...: one division per thread, additions per element.
struct RowCursor {
  int row, col, len, step_rows, step_cols;
  __device__ __forceinline__ RowCursor(int start, int step, int len_) : len(len_) {
    row = start / len;
    col = start - row * len;
    step_rows = step / len;
    step_cols = step - step_rows * len;
  }
  __device__ __forceinline__ void advance() {
    col += step_cols;
    row += step_rows;
    if (col >= len) {
      col -= len;
      ++row;
    }
  }
};

// Copies nrows rows of len scalars, contiguous at src in global memory (written by other blocks
// earlier in this launch, so read from L2, never from a possibly stale L1 line), into shared rows
// of stride dst_stride. All threads of the block take part; the caller's __syncthreads publishes
// the rows. Every thread keeps several loads in flight before it waits on any:
//   - 16-byte aligned rows: one asynchronous 16-byte copy per vector (cp.async.cg), all of a
//     thread's copies in flight until one wait at the end;
//   - otherwise: kStageLoads independent scalar __ldcg loads before their shared stores.
// The destination row and column advance by additions (no division per element).
template <typename scalar_t>
__device__ __forceinline__ void copy_rows_async(const scalar_t* src, int len, int nrows,
                                                scalar_t* dst, int dst_stride) {
  constexpr int kV = 16 / sizeof(scalar_t);
  const int vlen = len / kV, n = vlen * nrows, step = static_cast<int>(blockDim.x);
  if (n > 0) {
    RowCursor at(static_cast<int>(threadIdx.x), step, vlen);
    for (int e = static_cast<int>(threadIdx.x); e < n; e += step, at.advance())
      fb::copy_async_16(dst + at.row * dst_stride + at.col * kV, src + e * kV);
  }
  fb::copy_async_wait();
}

template <typename scalar_t>
__device__ __forceinline__ void copy_rows_scalar(const scalar_t* src, int len, int nrows,
                                                 scalar_t* dst, int dst_stride) {
  const int n = len * nrows, step = static_cast<int>(blockDim.x);
  if (n == 0) return;
  RowCursor at(static_cast<int>(threadIdx.x), step, len);
  for (int e = static_cast<int>(threadIdx.x); e < n; e += kStageLoads * step) {
    scalar_t v[kStageLoads];
    int to[kStageLoads];
#pragma unroll
    for (int u = 0; u < kStageLoads; ++u) {
      if (e + u * step < n) v[u] = __ldcg(src + e + u * step);
      to[u] = at.row * dst_stride + at.col;
      at.advance();
    }
    // Stored last load first: a store may alias the others, so they keep their order, and the
    // first of them needs the last load; the compiler cannot hoist a store above any load.
#pragma unroll
    for (int u = kStageLoads - 1; u >= 0; --u)
      if (e + u * step < n) dst[to[u]] = v[u];
  }
}

// Stages rows [0, nrows) of v [*, len] into stage [*][stage_stride(len)]: asynchronous 16-byte
// copies when every row of v starts 16-byte aligned (the stage rows always do), scalars
// otherwise. The choice is uniform over the block.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(const scalar_t* v, int len, int nrows, scalar_t* stage) {
  constexpr int kV = 16 / sizeof(scalar_t);
  if (len % kV == 0 && reinterpret_cast<std::uintptr_t>(v) % 16 == 0) {
    copy_rows_async(v, len, nrows, stage, stage_stride(len));
  } else {
    copy_rows_scalar(v, len, nrows, stage, stage_stride(len));
  }
}

// Copies the slice of W a block needs into shared w [H][slice_stride(J)], zero in columns >= nc:
//   transposed = true  (forward):  w[r][c] = W[c0 + c][r]  (rows c0.. of W)
//   transposed = false (backward): w[r][c] = W[r][c0 + c]  (columns c0.. of W)
// Consecutive threads read consecutive addresses of W (coalesced); once per launch.
template <typename scalar_t>
__device__ __forceinline__ void load_w_slice(const scalar_t* __restrict__ w_hh, scalar_t* w, int H,
                                             int J, int c0, int nc, bool transposed) {
  const int stride = slice_stride(J), n = H * stride, step = static_cast<int>(blockDim.x);
  // transposed: walk (c, r) with r fastest; else (r, c) with c fastest.
  RowCursor at(static_cast<int>(threadIdx.x), step, transposed ? H : stride);
  for (int e = static_cast<int>(threadIdx.x); e < n; e += step, at.advance()) {
    const int r = transposed ? at.col : at.row, c = transposed ? at.row : at.col;
    w[r * stride + c] = c < nc ? w_hh[transposed ? static_cast<int64_t>(c0 + c) * H + r
                                                 : static_cast<int64_t>(r) * H + c0 + c]
                               : scalar_t(0);
  }
}

// The work item of this lane in a tile of nb staged rows: rows b, b + 1 (b + 1 may be past nb)
// and the kTile columns of `tile`, shared by `group` lanes; this lane is `member` of them.
// One pass: the launcher makes ceil(nb / kRows) * n_tiles <= blockDim / group.
struct LaneItem {
  bool valid;
  int b, tile, member;
};
__device__ __forceinline__ LaneItem lane_item(int nb, int n_tiles, int group) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int o = warp * (32 / group) + lane / group;
  const int pair = o / n_tiles;
  return LaneItem{pair * kRows < nb, pair * kRows, o - pair * n_tiles, lane & (group - 1)};
}

// Calls f(k, b, c) for the outputs k = i * kTile + jj (row b = item.b + i, column
// c = item.tile * kTile + jj) of the item that this lane finishes: those with k % group == member
// inside nb x ncols. k is a compile-time index after unrolling, so per-output registers stay
// registers.
template <class F>
__device__ __forceinline__ void for_each_output(const LaneItem& it, int nb, int ncols, int group,
                                                F&& f) {
#pragma unroll
  for (int k = 0; k < kOut; ++k) {
    const int b = it.b + k / kTile, c = it.tile * kTile + k % kTile;
    if (it.valid && (k & (group - 1)) == it.member && b < nb && c < ncols) f(k, b, c);
  }
}

// Loads what step.finish needs for the first tile of rows, ahead of the grid barrier that
// precedes block_matvec (these inputs do not depend on it).
template <class Step>
__device__ __forceinline__ void prefetch_first_tile(Step& step, int nrows, int ncols, int b_tile,
                                                    int group) {
  const int nb = nrows < b_tile ? nrows : b_tile;
  const LaneItem it = lane_item(nb, (ncols + kTile - 1) / kTile, group);
  for_each_output(it, nb, ncols, group, [&](int k, int b, int c) { step.prefetch(k, b, c); });
}

// acc[i][jj] += sum over this lane's r (r = member, member + group, ... < len) of
// x_i[r] * w[r][tile * kTile + jj]: kUnroll iterations per trip, all their shared loads first.
template <typename scalar_t>
__device__ __forceinline__ void item_dot(const scalar_t* x0, const scalar_t* x1,
                                         const scalar_t* col, int w_stride, int len, int member,
                                         int group, scalar_t (&acc)[kRows][kTile]) {
  int r = member;
  for (; r + (kUnroll - 1) * group < len; r += kUnroll * group) {
    scalar_t a[kUnroll], b[kUnroll];
    Tile<scalar_t> wt[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      a[u] = x0[r + u * group];
      b[u] = x1[r + u * group];
      wt[u] = fb::load_as<Tile<scalar_t>>(col + (r + u * group) * w_stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < kTile; ++k) {
        acc[0][k] += a[u] * wt[u].v[k];
        acc[1][k] += b[u] * wt[u].v[k];
      }
    }
  }
  for (; r < len; r += group) {
    const Tile<scalar_t> wt = fb::load_as<Tile<scalar_t>>(col + r * w_stride);
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      acc[0][k] += x0[r] * wt.v[k];
      acc[1][k] += x1[r] * wt.v[k];
    }
  }
}

// out(b, c) = sum_{r < len} v[b, r] * w[r][c]  for b < nrows, c < ncols, handed once each to
// step.finish(k, b, c, out) by the lane that owns output k of its item.
//   v:     [nrows, len] in global memory, staged b_tile rows at a time (stage_rows).
//   w:     shared, [len][w_stride], ncols <= w_stride.
//   stage: shared, [b_tile][stage_stride(len)].
//   step:  step.prefetch(k, b, c) loads what finish needs: for the first tile of rows the caller
//          has called it (prefetch_first_tile); for the others it is called here before staging.
// `group` consecutive lanes split r for one item and meet in a shuffle reduction. Loop bounds are
// uniform per warp, so every lane reaches every shuffle. Barriers: __syncthreads before and after
// staging each tile of rows (every thread must call).
template <typename scalar_t, class Step>
__device__ __forceinline__ void block_matvec(const scalar_t* v, int len, const scalar_t* w,
                                             int w_stride, scalar_t* stage, int b_tile,
                                             int nrows, int ncols, int group, Step& step) {
  const int n_tiles = (ncols + kTile - 1) / kTile, s_stride = stage_stride(len);
  for (int b0 = 0; b0 < nrows; b0 += b_tile) {
    const int nb = nrows - b0 < b_tile ? nrows - b0 : b_tile;
    const LaneItem it = lane_item(nb, n_tiles, group);
    if (b0 > 0)
      for_each_output(it, nb, ncols, group,
                      [&](int k, int b, int c) { step.prefetch(k, b0 + b, c); });
    __syncthreads();  // the previous rows in `stage` are no longer read
    stage_rows(v + static_cast<int64_t>(b0) * len, len, nb, stage);
    __syncthreads();
    scalar_t acc[kRows][kTile] = {};
    if (it.valid) {
      const scalar_t* x0 = stage + it.b * s_stride;
      // A lone last row is summed twice and its copy dropped: the loop stays branch-free.
      const scalar_t* x1 = it.b + 1 < nb ? x0 + s_stride : x0;
      item_dot(x0, x1, w + it.tile * kTile, w_stride, len, it.member, group, acc);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int k = 0; k < kTile; ++k) acc[i][k] = group_sum(acc[i][k], group);
    }
    for_each_output(it, nb, ncols, group, [&](int k, int b, int c) {
      step.finish(k, b0 + b, c, acc[k / kTile][k % kTile]);
    });
  }
}

}  // namespace kernels
}  // namespace fused_bptt

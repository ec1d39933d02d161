// tsan_main.cpp: the kernels of csrc/cuda/rnn_kernels.cuh on plain arrays under simt_emu.h, no
// torch, built by tests/test_cuda_emulated.py with g++ -fsanitize=thread. Modes (argv[1]):
//   rnn           forward + backward persistent kernels (with grad_h_n) on three small plans, one
//                 with the batch in two groups, one with resets and lengths, and the per-step
//                 kernels, checked against naive loops; exit 0 when they agree (TSan must stay
//                 silent)
//   race          a deliberately racy kernel (unsynchronized shared-memory read-modify-write):
//                 the negative control, TSan must report it
//   warp_ops      the emulator's own warp ops and atomics on known inputs; exit 0 when right
//   partial_warp  a full-mask shuffle in a 48-thread block: the emulator must abort
//   grid_sync     grid_sync() in a non-cooperative launch: the emulator must abort
//   early_exit    a block returns while the others wait at a grid barrier: the emulator must abort
//   misaligned    a 16-byte load from an address 8 bytes off: the emulator must abort
#include "simt_emu.h"  // before the kernels: they take CUDA's names from it

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/rnn_kernels.cuh"
#include "host_boundaries.h"

using fused_bptt::kernels::PersistentParams;
using fused_bptt::kernels::rnn_backward_persistent_kernel;
using fused_bptt::kernels::rnn_backward_step_kernel;
using fused_bptt::kernels::rnn_forward_persistent_kernel;
using fused_bptt::kernels::rnn_forward_step_kernel;
using fused_bptt::kernels::SeqBounds;
using fused_bptt::kernels::smem_layout;

namespace {

using Vec = std::vector<double>;

double act(double z, bool relu) { return relu ? (z < 0 ? 0 : z) : std::tanh(z); }
double gate(double g, double y, bool relu) { return relu ? (y <= 0 ? 0 : g) : g * (1 - y * y); }

SeqBounds seq_bounds(const HostBoundaries& bd) { return {bd.resets_ptr(), bd.lengths_ptr()}; }

// y_t = act(xw_t + h_{t-1} W^T), without the product where the row is reset at t, 0 past its
// length; returns y [T, B, H].
Vec naive_forward(const PersistentParams& p, const HostBoundaries& bd, const Vec& xw,
                  const Vec& h0, const Vec& w) {
  const int B = p.B, H = p.H;
  Vec y(xw);
  for (int t = 0; t < p.T; ++t)
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < H; ++j) {
        double z = y[(t * B + b) * H + j];
        if (bd.carries_into(t, b))
          for (int k = 0; k < H; ++k)
            z += (t == 0 ? h0[b * H + k] : y[((t - 1) * B + b) * H + k]) * w[j * H + k];
        y[(t * B + b) * H + j] = bd.active(t, b) ? act(z, p.relu) : 0.0;
      }
  return y;
}

struct Grads {
  Vec dz, dh0, dw, db;
};

// dz [T, B, H], dh0 [B, H], dW_hh [H, H], db [H], from fused_bptt.h.
Grads naive_backward(const PersistentParams& p, const HostBoundaries& bd, const Vec& gy,
                     const Vec& ghn, const Vec& h0, const Vec& w, const Vec& y) {
  const int T = p.T, B = p.B, H = p.H;
  Grads g{Vec(T * B * H), Vec(B * H), Vec(H * H), Vec(H)};
  for (int t = T - 1; t >= 0; --t)
    for (int b = 0; b < B; ++b)
      for (int k = 0; k < H; ++k) {
        if (!bd.active(t, b)) continue;  // padded: dz stays 0
        const bool last = t == bd.lengths[b] - 1;
        double c = gy[(t * B + b) * H + k] + (last ? ghn[b * H + k] : 0.0);
        if (t + 1 < T && bd.carries_into(t + 1, b))
          for (int j = 0; j < H; ++j) c += g.dz[((t + 1) * B + b) * H + j] * w[j * H + k];
        g.dz[(t * B + b) * H + k] = gate(c, y[(t * B + b) * H + k], p.relu);
      }
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < H; ++k)
      for (int j = 0; j < H; ++j)
        if (!bd.reset(0, b)) g.dh0[b * H + k] += g.dz[b * H + j] * w[j * H + k];
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < H; ++j) {
        const double d = g.dz[(t * B + b) * H + j];
        g.db[j] += d;
        if (bd.reset(t, b)) continue;
        for (int k = 0; k < H; ++k)
          g.dw[j * H + k] += d * (t == 0 ? h0[b * H + k] : y[((t - 1) * B + b) * H + k]);
      }
  return g;
}

double max_diff(const Vec& a, const Vec& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return a.size() == b.size() ? m : INFINITY;
}

// Runs both persistent kernels on plan p with `threads` threads per block, with or without
// boundaries; prints one line per output and returns the number that disagree with the naive
// loops.
int check_plan(const char* name, const PersistentParams& p, int threads, bool boundaries) {
  const int T = p.T, B = p.B, H = p.H, groups = (B + p.rows - 1) / p.rows;
  const int grid = p.slices * groups;
  std::mt19937 gen(0);
  std::normal_distribution<double> nd(0.0, 0.5);
  auto rnd = [&](int n) {
    Vec v(n);
    for (auto& e : v) e = nd(gen);
    return v;
  };
  const Vec xw = rnd(T * B * H), h0 = rnd(B * H), w = rnd(H * H), gy = rnd(T * B * H);
  const Vec ghn = rnd(B * H);
  const HostBoundaries bd = make_boundaries(p.T, p.B, boundaries);

  Vec y(xw);
  const size_t fwd_smem = smem_layout(false, p.rows, H, p.J, p.b_tile).total * sizeof(double);
  simt::launch_cooperative(&rnn_forward_persistent_kernel<double>, dim3(grid), dim3(threads),
                           fwd_smem, h0.data(), w.data(), y.data(), seq_bounds(bd), p);
  const Vec y_ref = naive_forward(p, bd, xw, h0, w);

  Vec dz(T * B * H), dh0(B * H), dw(groups * H * H), db(groups * H);
  const size_t bwd_smem = smem_layout(true, p.rows, H, p.J, p.b_tile).total * sizeof(double);
  simt::launch_cooperative(&rnn_backward_persistent_kernel<double>, dim3(grid), dim3(threads),
                           bwd_smem, gy.data(), ghn.data(), h0.data(), w.data(), y_ref.data(),
                           dz.data(), dh0.data(), dw.data(), db.data(), seq_bounds(bd), p);
  for (int g = 1; g < groups; ++g) {  // the launcher's sum over batch groups
    for (int i = 0; i < H * H; ++i) dw[i] += dw[g * H * H + i];
    for (int i = 0; i < H; ++i) db[i] += db[g * H + i];
  }
  dw.resize(H * H);
  db.resize(H);
  const Grads ref = naive_backward(p, bd, gy, ghn, h0, w, y_ref);

  const double errs[] = {max_diff(y, y_ref), max_diff(dz, ref.dz), max_diff(dh0, ref.dh0),
                         max_diff(dw, ref.dw), max_diff(db, ref.db)};
  const char* names[] = {"y", "dz", "dh0", "dW_hh", "db"};
  int bad = 0;
  for (int i = 0; i < 5; ++i) {
    std::printf("%s: max |%s - naive| = %.3g\n", name, names[i], errs[i]);
    bad += !(errs[i] < 1e-12);
  }
  return bad;
}

// The per-step kernels on 2 blocks of 32 threads, relu, B = 5 rows of H = 14 (70 entries) with
// resets and lengths (make_boundaries): the forward at every step, and the backward at the last
// step (grad_h_n, no carry) and the one before (carry; grad_h_n where a row ends there).
int check_step_kernels() {
  const PersistentParams p{4, 5, 14, 0, 0, 0, 0, 0, true};
  const int n = p.B * p.H;
  const HostBoundaries bd = make_boundaries(p.T, p.B, true);
  std::mt19937 gen(1);
  std::normal_distribution<double> nd(0.0, 1.0);
  Vec gy(n), ghn(n), carry(n), y(n), dz(n), pre(n);
  for (int i = 0; i < n; ++i)
    gy[i] = nd(gen), ghn[i] = nd(gen), carry[i] = nd(gen), y[i] = nd(gen), pre[i] = nd(gen);
  int bad = 0;
  double err = 0;
  for (int t = 0; t < p.T; ++t) {
    Vec yt(pre);
    simt::launch(&rnn_forward_step_kernel<double>, dim3(2), dim3(32), 0, carry.data(), yt.data(),
                 seq_bounds(bd), t, p.T, p.B, p.H, p.relu);
    for (int i = 0; i < n; ++i) {
      const int b = i / p.H;
      const double want =
          bd.active(t, b) ? act(pre[i] + (bd.reset(t, b) ? 0.0 : carry[i]), p.relu) : 0.0;
      err = std::fmax(err, std::fabs(yt[i] - want));
    }
  }
  std::printf("forward step kernel: max |y - naive| = %.3g\n", err);
  bad += !(err < 1e-12);
  for (int t = p.T - 1; t >= p.T - 2; --t) {
    const bool last = t == p.T - 1;
    simt::launch(&rnn_backward_step_kernel<double>, dim3(2), dim3(32), 0, gy.data(), ghn.data(),
                 last ? nullptr : carry.data(), y.data(), dz.data(), seq_bounds(bd), t, p.T, p.B,
                 p.H, p.relu);
    err = 0;
    for (int i = 0; i < n; ++i) {
      const int b = i / p.H, len = static_cast<int>(bd.lengths[b]);
      const bool with_carry = t + 1 < p.T && bd.carries_into(t + 1, b);
      const double g = gy[i] + (t == len - 1 ? ghn[i] : 0.0) + (with_carry ? carry[i] : 0.0);
      err = std::fmax(err, std::fabs(dz[i] - (t >= len ? 0.0 : gate(g, y[i], p.relu))));
    }
    std::printf("backward step kernel: max |dz - naive| = %.3g\n", err);
    bad += !(err < 1e-12);
  }
  return bad;
}

int run_rnn() {
  // T, B, H, J, slices, rows, b_tile, group, relu.
  // 3 slices of 4, 4, 2 units; input rows staged 2 at a time (tiles of 2 and 1 rows).
  const PersistentParams tiles{3, 3, 10, 4, 3, 3, 2, 4, false};
  // The batch in 2 groups (3 and 2 rows) x 2 slices (8 and 2 units): 4 blocks; relu.
  const PersistentParams groups{3, 5, 10, 8, 2, 3, 3, 2, true};
  // The same with resets and lengths, over 4 steps.
  const PersistentParams bounded{4, 5, 10, 8, 2, 3, 3, 2, true};
  return check_plan("row tiles", tiles, 64, false) + check_plan("batch groups", groups, 32, false) +
         check_plan("boundaries", bounded, 32, true) + check_step_kernels();
}

// Every thread adds to one shared counter without synchronization: a data race TSan must see.
__global__ void racy_kernel(int* out) {
  FB_DYNAMIC_SHARED(int, counter);
  if (threadIdx.x == 0) *counter = 0;
  __syncthreads();
  *counter += 1;
  __syncthreads();
  if (threadIdx.x == 0) *out = *counter;
}

// Per thread of 2 warps: out[0] ballot of odd lanes, out[1] lane+1's value (shfl_down; the last
// lane keeps its own), out[2] lane 0's value (shfl), out[3] lane^3's value (shfl_xor); `sum`
// counts all.
__global__ void warp_ops_kernel(unsigned* out, unsigned* sum) {
  const unsigned lane = threadIdx.x & 31u, v = 100u * threadIdx.x;
  unsigned* o = out + 4 * threadIdx.x;
  o[0] = __ballot_sync(0xffffffffu, lane & 1u);
  __syncwarp();
  o[1] = __shfl_down_sync(0xffffffffu, v, 1);
  o[2] = __shfl_sync(0xffffffffu, v, 0);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 3);
  atomicAdd(sum, 1u);
}

int run_warp_ops() {
  std::vector<unsigned> out(4 * 64);
  unsigned sum = 0;
  simt::launch(&warp_ops_kernel, dim3(1), dim3(64), 0, out.data(), &sum);
  int bad = sum != 64;
  for (unsigned t = 0; t < 64; ++t) {
    const unsigned lane = t & 31u, warp0 = t - lane;
    const unsigned expect[4] = {0xAAAAAAAAu, 100u * (lane == 31 ? t : t + 1), 100u * warp0,
                                100u * (warp0 + (lane ^ 3u))};
    for (int k = 0; k < 4; ++k)
      if (out[4 * t + k] != expect[k]) {
        std::printf("thread %u op %d: got %u, expected %u\n", t, k, out[4 * t + k], expect[k]);
        bad = 1;
      }
  }
  std::printf("warp ops %s\n", bad ? "WRONG" : "ok");
  return bad;
}

__global__ void shuffle_kernel(double* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, double(threadIdx.x), 1);
}

__global__ void grid_sync_kernel(int* out) {
  fb::grid_sync();
  out[blockIdx.x] = 1;
}

// Block 1 has nothing to do and returns; block 0 then waits for it at the grid barrier.
__global__ void early_exit_kernel(int* out) {
  if (blockIdx.x == 1) return;
  fb::grid_sync();
  out[threadIdx.x] = 1;
}

// A float4 read 8 bytes past a 16-byte boundary.
__global__ void misaligned_kernel(const float* in, float* out) {
  const float4 v = __ldcg(reinterpret_cast<const float4*>(in + 2));
  out[threadIdx.x] = v.x;
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "rnn";
  if (std::strcmp(mode, "rnn") == 0) return run_rnn();
  if (std::strcmp(mode, "race") == 0) {
    int out = 0;
    simt::launch(&racy_kernel, dim3(1), dim3(8), sizeof(int), &out);
    std::printf("racy counter = %d\n", out);
    return 0;
  }
  if (std::strcmp(mode, "warp_ops") == 0) return run_warp_ops();
  if (std::strcmp(mode, "partial_warp") == 0) {
    std::vector<double> out(48);
    simt::launch(&shuffle_kernel, dim3(1), dim3(48), 0, out.data());
    return 0;
  }
  if (std::strcmp(mode, "grid_sync") == 0) {
    std::vector<int> out(2);
    simt::launch(&grid_sync_kernel, dim3(2), dim3(32), 0, out.data());
    return 0;
  }
  if (std::strcmp(mode, "early_exit") == 0) {
    std::vector<int> out(32);
    simt::launch_cooperative(&early_exit_kernel, dim3(2), dim3(32), 0, out.data());
    return 0;
  }
  if (std::strcmp(mode, "misaligned") == 0) {
    alignas(16) float in[8] = {};
    std::vector<float> out(32);
    simt::launch(&misaligned_kernel, dim3(1), dim3(32), 0, in, out.data());
    return 0;
  }
  std::fprintf(stderr,
               "unknown mode %s (rnn, race, warp_ops, partial_warp, grid_sync, early_exit, "
               "misaligned)\n",
               mode);
  return 2;
}

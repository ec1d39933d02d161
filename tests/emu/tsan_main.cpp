// tsan_main.cpp: the kernels of csrc/cuda/rnn_kernels.cuh on plain arrays under simt_emu.h, no torch,
// built by tests/test_cuda_emulated.py with g++ -fsanitize=thread. Modes (argv[1]):
//   rnn           forward + backward persistent kernels and the per-step backward kernel on a small
//                 shape, checked against naive loops; exit 0 when they agree (TSan must stay silent)
//   race          a deliberately racy kernel (unsynchronized shared-memory read-modify-write):
//                 the negative control, TSan must report it
//   warp_ops      the emulator's own warp ops and atomics on known inputs; exit 0 when right
//   partial_warp  a full-mask shuffle in a 48-thread block: the emulator must abort
//   grid_sync     grid_sync() in a non-cooperative launch: the emulator must abort
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/rnn_kernels.cuh"

using fused_bptt::kernels::rnn_backward_persistent_kernel;
using fused_bptt::kernels::rnn_backward_step_kernel;
using fused_bptt::kernels::rnn_forward_persistent_kernel;
using fused_bptt::kernels::smem_layout;

namespace {

// 3 blocks (slices of 4, 4, 2 units), input rows staged 2 at a time (tiles of 2 and 1 rows).
constexpr int T = 3, B = 3, H = 10, J = 4, kGrid = 3, kThreads = 64, kGroup = 4, kRowTile = 2;
using Vec = std::vector<double>;

// y_t = tanh(xw_t + h_{t-1} W^T); returns y [T, B, H].
Vec naive_forward(const Vec& xw, const Vec& h0, const Vec& w) {
  Vec y(xw);
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < H; ++j) {
        double z = y[(t * B + b) * H + j];
        for (int k = 0; k < H; ++k) z += (t == 0 ? h0[b * H + k] : y[((t - 1) * B + b) * H + k]) * w[j * H + k];
        y[(t * B + b) * H + j] = std::tanh(z);
      }
  return y;
}

// dz [T, B, H], dh0 [B, H], dW_hh [H, H], db [H], from fused_bptt.h.
void naive_backward(const Vec& gy, const Vec& h0, const Vec& w, const Vec& y, Vec& dz, Vec& dh0, Vec& dw, Vec& db) {
  dz.assign(T * B * H, 0.0), dh0.assign(B * H, 0.0), dw.assign(H * H, 0.0), db.assign(H, 0.0);
  for (int t = T - 1; t >= 0; --t)
    for (int b = 0; b < B; ++b)
      for (int k = 0; k < H; ++k) {
        double c = gy[(t * B + b) * H + k];
        if (t + 1 < T)
          for (int j = 0; j < H; ++j) c += dz[((t + 1) * B + b) * H + j] * w[j * H + k];
        const double yv = y[(t * B + b) * H + k];
        dz[(t * B + b) * H + k] = c * (1 - yv * yv);
      }
  for (int b = 0; b < B; ++b)
    for (int k = 0; k < H; ++k)
      for (int j = 0; j < H; ++j) dh0[b * H + k] += dz[b * H + j] * w[j * H + k];
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < H; ++j) {
        const double g = dz[(t * B + b) * H + j];
        db[j] += g;
        for (int k = 0; k < H; ++k) dw[j * H + k] += g * (t == 0 ? h0[b * H + k] : y[((t - 1) * B + b) * H + k]);
      }
}

double max_diff(const Vec& a, const Vec& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return a.size() == b.size() ? m : INFINITY;
}

int run_rnn() {
  std::mt19937 gen(0);
  std::normal_distribution<double> nd(0.0, 0.5);
  auto rnd = [&](int n) { Vec v(n); for (auto& e : v) e = nd(gen); return v; };
  const Vec xw = rnd(T * B * H), h0 = rnd(B * H), w = rnd(H * H), gy = rnd(T * B * H);

  Vec y(xw);
  const size_t fwd_smem = smem_layout(false, B, H, J, kRowTile, kGroup).total * sizeof(double);
  simt::launch_cooperative(&rnn_forward_persistent_kernel<double>, dim3(kGrid), dim3(kThreads), fwd_smem,
                           h0.data(), w.data(), y.data(), T, B, H, J, kRowTile, kGroup, false);
  const Vec y_ref = naive_forward(xw, h0, w);

  Vec dz(T * B * H), dh0(B * H), dw(H * H), db(H);
  const size_t bwd_smem = smem_layout(true, B, H, J, kRowTile, kGroup).total * sizeof(double);
  simt::launch_cooperative(&rnn_backward_persistent_kernel<double>, dim3(kGrid), dim3(kThreads), bwd_smem,
                           gy.data(), h0.data(), w.data(), y_ref.data(), dz.data(), dh0.data(), dw.data(),
                           db.data(), T, B, H, J, kRowTile, kGroup, false);
  Vec dz_ref, dh0_ref, dw_ref, db_ref;
  naive_backward(gy, h0, w, y_ref, dz_ref, dh0_ref, dw_ref, db_ref);

  // The per-step kernel for the last step (no carry): dz_{T-1} = grad_y_{T-1} * (1 - y^2).
  Vec dz_last(B * H);
  const int64_t off = int64_t(T - 1) * B * H;
  simt::launch(&rnn_backward_step_kernel<double>, dim3(2), dim3(32), 0, gy.data() + off,
               static_cast<const double*>(nullptr), y_ref.data() + off, dz_last.data(), int64_t(B * H), false);
  const Vec dz_last_ref(dz_ref.begin() + off, dz_ref.end());

  const double errs[] = {max_diff(y, y_ref), max_diff(dz, dz_ref), max_diff(dh0, dh0_ref),
                         max_diff(dw, dw_ref), max_diff(db, db_ref), max_diff(dz_last, dz_last_ref)};
  const char* names[] = {"y", "dz", "dh0", "dW_hh", "db", "dz (per-step kernel)"};
  int bad = 0;
  for (int i = 0; i < 6; ++i) {
    std::printf("max |%s - naive| = %.3g\n", names[i], errs[i]);
    if (!(errs[i] < 1e-12)) bad = 1;
  }
  return bad;
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

// Per thread of 2 warps: out[0] ballot of odd lanes, out[1] lane+1's value (shfl_down; the last lane
// keeps its own), out[2] lane 0's value (shfl), out[3] lane^3's value (shfl_xor); `sum` counts all.
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
    const unsigned expect[4] = {0xAAAAAAAAu, 100u * (lane == 31 ? t : t + 1), 100u * warp0, 100u * (warp0 + (lane ^ 3u))};
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
  std::fprintf(stderr, "unknown mode %s (rnn, race, warp_ops, partial_warp, grid_sync)\n", mode);
  return 2;
}

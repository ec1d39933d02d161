// tsan_lowp_main.cpp: the bfloat16 tensor-core kernels of csrc/cuda/rnn_kernels_lowp.cuh on plain
// arrays under simt_emu.h and mma_emu.h, no torch, built by tests/test_cuda_emulated_lowp.py with
// g++ -fsanitize=thread. Forward and backward, with resets and lengths, on plans of 3 blocks
// staging B = 19 rows 16 at a time (the staging buffer reused within a step), with H = 20 (rows
// staged one element at a time) and H = 24 (16-byte asynchronous copies), checked against naive
// loops that round where the kernels do (fused_bptt.h's math, rnn_kernels_lowp.cuh's rounding
// points); exit 0 when they agree within a bf16 rounding (the sums run in another order), so TSan
// must stay silent and the numbers right.
#include "simt_emu.h"  // before the kernels: they take CUDA's names from it
#include "mma_emu.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/rnn_kernels_lowp.cuh"
#include "host_boundaries.h"

namespace {

using Bits = std::vector<uint16_t>;

float f(uint16_t v) { return fb::bf16_to_float(v); }
uint16_t r(float x) { return fb::float_to_bf16(x); }

struct Problem {
  int T = 5, B = 19, H = 20;
  Bits h0, w, proj, gy, ghn;
  std::vector<float> bias;
  HostBoundaries bd;
};

Problem make_problem(int H) {
  Problem p;
  p.H = H;
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto fill = [&](Bits& v, size_t n, float s) {
    v.resize(n);
    for (auto& e : v) e = r(s * u(gen));
  };
  const size_t BH = static_cast<size_t>(p.B) * p.H;
  fill(p.h0, BH, 0.5f);
  fill(p.w, static_cast<size_t>(p.H) * p.H, 0.3f);
  fill(p.proj, p.T * BH, 1.0f);
  fill(p.gy, p.T * BH, 1.0f);
  fill(p.ghn, BH, 1.0f);
  p.bias.resize(p.H);
  for (auto& e : p.bias) e = 0.2f * u(gen);
  p.bd = make_boundaries(p.T, p.B, true);
  return p;
}

Bits naive_forward(const Problem& p) {
  const int B = p.B, H = p.H;
  Bits y(p.proj);
  for (int t = 0; t < p.T; ++t)
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < H; ++j) {
        const size_t i = (static_cast<size_t>(t) * B + b) * H + j;
        if (!p.bd.active(t, b)) {
          y[i] = 0;
          continue;
        }
        double z = f(p.proj[i]) + p.bias[j];
        for (int k = 0; k < H && p.bd.carries_into(t, b); ++k)
          z += f(t == 0 ? p.h0[b * H + k] : y[((t - 1) * B + b) * H + k]) * f(p.w[j * H + k]);
        y[i] = r(std::tanh(static_cast<float>(z)));
      }
  return y;
}

Bits naive_backward(const Problem& p, const Bits& y) {
  const int B = p.B, H = p.H;
  Bits dz(y.size(), 0);
  for (int t = p.T - 1; t >= 0; --t)
    for (int b = 0; b < B; ++b)
      for (int k = 0; k < H; ++k) {
        const size_t i = (static_cast<size_t>(t) * B + b) * H + k;
        if (!p.bd.active(t, b)) continue;
        double g = f(p.gy[i]);
        if (t == p.bd.lengths[b] - 1) g += f(p.ghn[b * H + k]);
        for (int j = 0; j < H && t + 1 < p.T && p.bd.carries_into(t + 1, b); ++j)
          g += f(dz[((t + 1) * B + b) * H + j]) * f(p.w[j * H + k]);
        const float yv = f(y[i]);
        dz[i] = r(static_cast<float>(g) * (1.0f - yv * yv));
      }
  return dz;
}

// Largest |a - b| relative to max |b|.
double max_rel(const Bits& a, const Bits& b) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::fmax(err, std::fabs(f(a[i]) - f(b[i])));
    scale = std::fmax(scale, std::fabs(f(b[i])));
  }
  return err / scale;
}

// Runs both kernels on p; true when they agree with the naive loops.
bool check(const Problem& p) {
  namespace kl = fused_bptt::kernels_lowp;
  // 3 blocks of 8 units (the last owns 4 where H = 20), 2 warps each; rows staged 16 at a time.
  const kl::LowpParams params{p.T, p.B, p.H, 32, 8, 3, 16, false};
  const size_t smem = kl::lowp_smem_elements(params.J, params.b_tile, params.Kp) * 2;
  const dim3 grid(params.slices), block(64);
  Bits y(p.proj), dz(p.proj.size(), 0xFFFF);
  simt::launch_cooperative(&kl::rnn_forward_mma_kernel<kl::Bf16>, grid, block, smem, p.h0.data(),
                           p.w.data(), p.bias.data(), y.data(), p.bd.resets_ptr(),
                           p.bd.lengths_ptr(), params);
  simt::launch_cooperative(&kl::rnn_backward_mma_kernel<kl::Bf16>, grid, block, smem, p.gy.data(),
                           p.ghn.data(), p.w.data(), y.data(), dz.data(), p.bd.resets_ptr(),
                           p.bd.lengths_ptr(), params);
  // The naive backward from the kernels' own y: each is held to its own rounding.
  const double ey = max_rel(y, naive_forward(p)), edz = max_rel(dz, naive_backward(p, y));
  std::printf("lowp H=%d: max rel |y - naive| = %.3g, |dz - naive| = %.3g\n", p.H, ey, edz);
  // Sums in another order may round a few elements to the neighbouring bf16 value (2^-8
  // relative), which the next steps carry on.
  return ey < 3e-2 && edz < 3e-2;
}

}  // namespace

int main() {
  const bool scalar = check(make_problem(20)), vector = check(make_problem(24));
  return scalar && vector ? 0 : 1;
}

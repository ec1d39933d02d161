// host_boundaries.h: sequence boundaries on the host for the naive loops of the TSan mains
// (tsan_main.cpp, tsan_lowp_main.cpp), as fused_bptt.h defines them (test-only, no torch):
//   resets [T, B] bool: at a reset step the row's state restarts from 0 (h_{t-1} is not used,
//       and dz_t does not flow back into step t - 1);
//   lengths [B] int64: steps t >= lengths[b] are padding (y = 0, dz = 0, no carry past them).
// Both kernel families take the two arrays as device pointers (nullptr where absent).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

struct HostBoundaries {
  int T = 0, B = 0;
  std::unique_ptr<bool[]> resets;  // [T, B], nullptr: none (std::vector<bool> has no data())
  std::vector<int64_t> lengths;    // [B]; all T where the kernels get no lengths
  bool has_lengths = false;

  bool reset(int t, int b) const { return resets && resets[t * B + b]; }
  bool active(int t, int b) const { return t < lengths[b]; }
  // Step t takes h_{t-1}: the row is still running and not reset at t.
  bool carries_into(int t, int b) const { return active(t, b) && !reset(t, b); }
  const bool* resets_ptr() const { return resets.get(); }
  const int64_t* lengths_ptr() const { return has_lengths ? lengths.data() : nullptr; }
};

// No boundaries (every row T steps long), or resets at (t, b) where (t + 2 * b) % 3 == 0 and
// lengths T, 1, T - 1, T, ... (ties, a row of one step, full rows).
inline HostBoundaries make_boundaries(int T, int B, bool with) {
  HostBoundaries bd;
  bd.T = T;
  bd.B = B;
  bd.lengths.assign(B, T);
  if (!with) return bd;
  bd.resets.reset(new bool[T * B]);
  for (int t = 0; t < T; ++t)
    for (int b = 0; b < B; ++b) bd.resets[t * B + b] = (t + 2 * b) % 3 == 0;
  const int64_t pattern[] = {T, 1, T - 1, T};
  for (int b = 0; b < B; ++b) bd.lengths[b] = pattern[b % 4];
  bd.has_lengths = true;
  return bd;
}

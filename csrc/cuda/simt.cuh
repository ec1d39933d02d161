// simt.cuh: the few names kernel source needs beyond plain CUDA, so that one source builds with nvcc
// (for the GPU) and with g++ -std=c++20 (CPU threads, through simt_emu.h; see there for what that
// emulation covers and what it cannot).
//
//   FB_DYNAMIC_SHARED(type, name)   `type* name` pointing at the block's dynamic shared memory
//                                   (`extern __shared__` is not C++; one use per kernel)
//   fb::grid_sync()                 the grid-wide barrier of a cooperative launch
//   FB_UNROLL                       `#pragma unroll` for the next loop, in each compiler's spelling
//   fb::load_as<V>(p)               one V (e.g. an aligned struct of 4 floats) read from p: a vector
//                                   load under nvcc, a memcpy on the CPU (no aliasing questions)
//
// Kernels use only dynamic shared memory: a static __shared__ array would be shared by every block
// under emulation, so simt_emu.h refuses it at compile time.
#pragma once

#if defined(__CUDACC__)

#include <cooperative_groups.h>

#define FB_UNROLL _Pragma("unroll")

#define FB_DYNAMIC_SHARED(type, name)                                   \
  extern __shared__ __align__(16) unsigned char fb_dynamic_shared_[];   \
  type* name = reinterpret_cast<type*>(fb_dynamic_shared_)

namespace fb {
__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
template <typename V, typename T>
__device__ __forceinline__ V load_as(const T* p) { return *reinterpret_cast<const V*>(p); }
}  // namespace fb

#else

#include "simt_emu.h"

#define FB_UNROLL _Pragma("GCC unroll 8")

#include <cstring>

namespace fb {
inline void grid_sync() { simt::grid_sync(); }
template <typename V, typename T>
inline V load_as(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
}  // namespace fb

#endif

// simt.cuh: the few names the kernels use beyond plain CUDA.
//
//   FB_DYNAMIC_SHARED(type, name)   `type* name` pointing at the block's dynamic shared memory
//                                   (`extern __shared__` is not C++; one use per kernel)
//   fb::grid_sync()                 the grid-wide barrier of a cooperative launch
//   fb::grid_arrive() -> token,     the same barrier in two halves: arrive publishes this block's
//   fb::grid_wait(token)            writes (release), wait returns once every block has arrived
//                                   (acquire); work in between overlaps the other blocks' arrival
//   fb::load_as<V>(p)               one V (an aligned struct of scalars) read from p, and
//   fb::store_as(p, v)              written to p: one vector access
//   fb::copy_async_16(dst, src)     16 bytes from global src to shared dst without a register,
//                                   through L2 only (as __ldcg); both 16-byte aligned. Complete
//   fb::copy_async_wait()           once the issuing thread has waited (then a __syncthreads
//                                   shows every thread's copies to the block). cp.async on sm_80+
//
// The same kernel source also runs on CPU threads in the tests: their translation units include
// tests/emu/simt_emu.h first, which defines FB_SIMT_EMULATION and these names (and the CUDA ones
// the kernels use: threadIdx, __syncthreads, __shfl_xor_sync, __ldcg, float4, ...). That is the
// one seam between the product and its emulation; nothing here includes test code.
//
// Kernels use only dynamic shared memory: a static __shared__ array would be shared by every block
// under emulation, so simt_emu.h refuses it at compile time.
#pragma once

#if defined(__CUDACC__)

#include <cooperative_groups.h>

#define FB_DYNAMIC_SHARED(type, name)                                 \
  extern __shared__ __align__(16) unsigned char fb_dynamic_shared_[]; \
  type* name = reinterpret_cast<type*>(fb_dynamic_shared_)

namespace fb {
using GridToken = cooperative_groups::grid_group::arrival_token;

__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }
__device__ __forceinline__ GridToken grid_arrive() {
  return cooperative_groups::this_grid().barrier_arrive();
}
__device__ __forceinline__ void grid_wait(GridToken token) {
  cooperative_groups::this_grid().barrier_wait(static_cast<GridToken&&>(token));
}

template <typename V, typename T>
__device__ __forceinline__ V load_as(const T* p) {
  return *reinterpret_cast<const V*>(p);
}
template <typename T, typename V>
__device__ __forceinline__ void store_as(T* p, const V& v) {
  *reinterpret_cast<V*>(p) = v;
}

__device__ __forceinline__ void copy_async_16(void* dst, const void* src) {
#if __CUDA_ARCH__ >= 800
  // Every copy a thread issues is in flight until its wait: no register, no dependent store.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(__cvta_generic_to_global(src))
               : "memory");
#else
  *static_cast<float4*>(dst) = __ldcg(static_cast<const float4*>(src));
#endif
}
__device__ __forceinline__ void copy_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
}  // namespace fb

#elif !defined(FB_SIMT_EMULATION)
#error "CUDA kernel source: compile it with nvcc, or include tests/emu/simt_emu.h before it"
#endif

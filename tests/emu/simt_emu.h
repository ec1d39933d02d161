// simt_emu.h: runs CUDA kernel source on CPU threads, one std::thread per CUDA thread. Test-only:
// the product never includes it.
//
// A translation unit of the tests includes this file first and then the kernels
// (csrc/cuda/rnn_kernels.cuh); csrc/cuda/simt.cuh sees FB_SIMT_EMULATION and takes the names below
// instead of CUDA's. It exists so the tests can run the exact kernels on a machine without a GPU,
// and so ThreadSanitizer can look for races in them. Build with g++ -std=c++20 and
// -Wno-unknown-pragmas (the kernels' `#pragma unroll` is CUDA's; GCC before 13 cannot be told
// from source to ignore it).
//
// What is emulated:
//   - threadIdx / blockIdx / blockDim / gridDim: thread-local per emulated thread.
//   - __syncthreads(): a std::barrier per block; threads that return leave it (arrive_and_drop),
//     as on the GPU.
//   - fb::grid_sync(), fb::grid_arrive(), fb::grid_wait(token): one barrier over every thread of
//     a cooperative launch. Outside one they abort (on a GPU a hand-made grid barrier would
//     deadlock). A barrier phase that some threads reach by returning from the kernel while
//     others wait in it aborts too: on a GPU the waiting blocks would hang. (Stricter than a GPU,
//     where only a block's first thread counts.)
//   - __shfl_*_sync / __ballot_sync / __syncwarp: a per-warp exchange buffer between two per-warp
//     barriers; a mask that is not exactly the warp's live lanes, or a source lane outside it,
//     aborts.
//   - atomicAdd / atomicCAS / atomicExch / atomicMax: std::atomic_ref. __ldcg: a plain load.
//     __threadfence: a seq_cst fence.
//   - float4 / double2, fb::load_as / store_as, fb::copy_async_16: 16-byte aligned types; a
//     vector access (these, __ldcg of a vector, an asynchronous copy) at an address not aligned
//     to its size aborts, as it faults on a GPU. Asynchronous copies complete at once.
//   - dynamic shared memory: one buffer per block, filled with 0xFF bytes (NaN for float/double)
//     so reads before writes show up. A static __shared__ array is refused at compile time: under
//     emulation it would be one array shared by every block.
//   - launches: simt::launch (blocks one after another) and simt::launch_cooperative (all blocks
//     at once); both abort after SIMT_EMU_TIMEOUT_S seconds (default 120) instead of hanging on
//     a deadlock.
//
// What is NOT emulated: the GPU memory model (every emulated access is coherent, so a missing
// __threadfence or a stale L1 read cannot show up here), occupancy and co-residency (the launcher
// asks the caller's device config), warp lock-step execution and independent thread scheduling
// details, timing, fast-math and FMA contraction, and texture/constant memory.
#pragma once

#define FB_SIMT_EMULATION 1

#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A static __shared__ array would be one object for every emulated block: use FB_DYNAMIC_SHARED.
#define __shared__ static_shared_memory_is_not_emulated_use_FB_DYNAMIC_SHARED
#define FB_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(simt::dynamic_shared())

namespace simt {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "simt_emu: %s (block %u, thread %u)\n", what, blockIdx.x, threadIdx.x);
  std::fflush(stderr);
  std::abort();
}

template <typename V, typename T>
void check_aligned(const T* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(V) != 0)
    fail("misaligned vector access (a GPU faults on it)");
}

struct Warp {
  explicit Warp(int lanes) : sync(lanes), live(lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u) {}
  std::barrier<> sync;
  std::atomic<unsigned> live;  // lanes that exist and have not returned
  alignas(8) unsigned char slot[32][8];
};

struct Block {
  Block(int threads, size_t smem_bytes) : sync(threads), smem((smem_bytes + 15) / 16 + 1) {
    std::memset(smem.data(), 0xFF, smem.size() * 16);
    for (int w = 0; w * 32 < threads; ++w)
      warps.push_back(std::make_unique<Warp>(threads - w * 32 < 32 ? threads - w * 32 : 32));
  }
  std::barrier<> sync;
  struct alignas(16) Chunk {
    unsigned char b[16];
  };
  std::vector<Chunk> smem;
  std::vector<std::unique_ptr<Warp>> warps;
};

// The barrier of a cooperative launch, over every thread of the grid. arrive() returns the phase
// the arrival belongs to; wait(phase) returns once that phase is complete. A thread that returns
// from the kernel arrives too (exit()), so the last phase completes; a phase completed by a mix of
// exits and arrivals means some thread waits for a thread that is gone: abort.
class GridBarrier {
 public:
  explicit GridBarrier(int threads) : expected_(threads) {}

  unsigned arrive() {
    std::lock_guard<std::mutex> g(m_);
    const unsigned phase = phase_;
    add(false);
    return phase;
  }
  void exit() {
    std::lock_guard<std::mutex> g(m_);
    add(true);
  }
  void wait(unsigned phase) {
    std::unique_lock<std::mutex> g(m_);
    cv_.wait(g, [&] { return phase_ != phase; });
    if (broken_)
      fail("a thread returned from the kernel while others wait at a grid barrier "
           "(on a GPU the grid hangs)");
  }

 private:
  void add(bool exiting) {
    exits_ += exiting;
    if (++count_ < expected_) return;
    if (exits_ > 0 && exits_ < count_) broken_ = true;
    count_ = exits_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  const int expected_;
  int count_ = 0, exits_ = 0;
  unsigned phase_ = 0;
  bool broken_ = false;
};

struct Context {
  Block* block = nullptr;
  GridBarrier* grid = nullptr;  // non-null only in a cooperative launch
};
inline thread_local Context ctx;

inline void* dynamic_shared() { return ctx.block->smem.data(); }

inline GridBarrier& grid_barrier() {
  if (ctx.grid == nullptr)
    fail("grid barrier outside a cooperative launch (it would deadlock on a GPU)");
  return *ctx.grid;
}

inline unsigned lane_id() { return threadIdx.x & 31u; }
inline Warp& this_warp() { return *ctx.block->warps[threadIdx.x >> 5]; }

// Every warp-collective op: publish this lane's value, wait for the warp, read, wait again so no
// lane overwrites its slot before every lane has read.
template <typename T, typename Read>
T warp_exchange(unsigned mask, T v, Read read) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>,
                "simt_emu: warp op on a type > 8 bytes");
  Warp& w = this_warp();
  if (mask != w.live.load())
    fail("warp op whose mask is not exactly the warp's live lanes (partial warp?)");
  std::memcpy(w.slot[lane_id()], &v, sizeof(T));
  w.sync.arrive_and_wait();
  T out = read(w);
  w.sync.arrive_and_wait();
  return out;
}

template <typename T>
T shuffle_from(unsigned mask, T v, unsigned src) {
  return warp_exchange(mask, v, [&](Warp& w) {
    if (src >= 32 || !((mask >> src) & 1u)) fail("shuffle reads a lane outside the mask");
    T r;
    std::memcpy(&r, w.slot[src], sizeof(T));
    return r;
  });
}

// Runs `threads` std::threads of one grid (all blocks when cooperative, else one block) and waits;
// aborts after the timeout so a deadlocked kernel fails a test instead of hanging it.
template <typename Body>
void run_threads(int threads, Body body) {
  std::mutex m;
  std::condition_variable cv;
  int done = 0;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&, i] {
      body(i);
      std::lock_guard<std::mutex> g(m);
      if (++done == threads) cv.notify_all();
    });
  const char* env = std::getenv("SIMT_EMU_TIMEOUT_S");
  const int timeout_s = env ? std::atoi(env) : 120;
  {
    std::unique_lock<std::mutex> g(m);
    if (!cv.wait_for(g, std::chrono::seconds(timeout_s), [&] { return done == threads; })) {
      std::fprintf(stderr,
                   "simt_emu: launch did not finish in %d s (deadlock?): %d of %d threads done\n",
                   timeout_s, done, threads);
      std::fflush(stderr);
      std::abort();
    }
  }
  for (auto& t : pool) t.join();
}

template <typename... KArgs, typename... Args>
void launch_impl(bool cooperative, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                 Args&&... args) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1)
    fail("only 1-D grids and blocks are emulated");
  const std::tuple<std::decay_t<KArgs>...> typed(std::forward<Args>(args)...);
  const int nb = static_cast<int>(grid.x), nt = static_cast<int>(block.x);
  if (nb == 0 || nt == 0) return;
  auto thread_body = [&](Block* blk, GridBarrier* gbar, int b, int t) {
    gridDim = grid;
    blockDim = block;
    blockIdx = dim3(b);
    threadIdx = dim3(t);
    ctx = Context{blk, gbar};
    std::apply(kernel, typed);
    // A returned thread no longer takes part in the warp and block barriers, as on the GPU.
    Warp& w = this_warp();
    w.live.fetch_and(~(1u << lane_id()));
    w.sync.arrive_and_drop();
    blk->sync.arrive_and_drop();
    if (gbar) gbar->exit();
    ctx = Context{};
  };
  if (cooperative) {
    std::vector<std::unique_ptr<Block>> blocks;
    for (int b = 0; b < nb; ++b) blocks.push_back(std::make_unique<Block>(nt, smem));
    GridBarrier gbar(nb * nt);
    run_threads(nb * nt,
                [&](int i) { thread_body(blocks[i / nt].get(), &gbar, i / nt, i % nt); });
  } else {
    for (int b = 0; b < nb; ++b) {
      Block blk(nt, smem);
      run_threads(nt, [&](int t) { thread_body(&blk, nullptr, b, t); });
    }
  }
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  launch_impl(false, kernel, grid, block, smem, std::forward<Args>(args)...);
}

template <typename... KArgs, typename... Args>
void launch_cooperative(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                        Args&&... args) {
  launch_impl(true, kernel, grid, block, smem, std::forward<Args>(args)...);
}

}  // namespace simt

// The names csrc/cuda/simt.cuh gives the kernels, emulated.
namespace fb {
struct GridToken {
  unsigned phase;
};
inline void grid_sync() {
  simt::GridBarrier& g = simt::grid_barrier();
  g.wait(g.arrive());
}
inline GridToken grid_arrive() { return GridToken{simt::grid_barrier().arrive()}; }
inline void grid_wait(GridToken token) { simt::grid_barrier().wait(token.phase); }

template <typename V, typename T>
inline V load_as(const T* p) {
  simt::check_aligned<V>(p);
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename T, typename V>
inline void store_as(T* p, const V& v) {
  simt::check_aligned<V>(p);
  std::memcpy(p, &v, sizeof(V));
}
// The copy happens at once; the GPU's may land any time before the wait, which the kernels'
// __syncthreads after the wait covers either way.
inline void copy_async_16(void* dst, const void* src) {
  simt::check_aligned<float4>(dst);
  simt::check_aligned<float4>(src);
  std::memcpy(dst, src, 16);
}
inline void copy_async_wait() {}
}  // namespace fb

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt::shuffle_from(mask, v,
                           (simt::lane_id() & ~unsigned(width - 1)) + unsigned(src % width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const unsigned lane = simt::lane_id(), src = lane ^ unsigned(lane_mask);
  // Lanes outside the caller's width segment read their own value, as on the GPU.
  const bool inside = (src & ~unsigned(width - 1)) == (lane & ~unsigned(width - 1));
  return simt::shuffle_from(mask, v, inside ? src : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const unsigned lane = simt::lane_id(), seg_end = (lane & ~unsigned(width - 1)) + unsigned(width);
  return simt::shuffle_from(mask, v, lane + delta < seg_end ? lane + delta : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return simt::warp_exchange(mask, static_cast<unsigned>(pred != 0), [&](simt::Warp& w) {
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l) & 1u) {
        unsigned p;
        std::memcpy(&p, w.slot[l], sizeof(p));
        bits |= p << l;
      }
    return bits;
  });
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::warp_exchange(mask, 0u, [](simt::Warp&) { return 0u; });
}
inline void __syncthreads() { simt::ctx.block->sync.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldcg(const T* p) {
  simt::check_aligned<T>(p);
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

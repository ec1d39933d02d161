// rnn_cuda.cu: the CUDA implementations of fused_bptt::rnn_forward / rnn_backward.
//
// The CUDA backend is three files side by side:
//   rnn_cuda.cu       this file: the ops, and what only a GPU has (device guard, current stream,
//                     device attributes, occupancy, the launches and the checks on every call)
//   rnn_launch.h      the host logic: GEMMs, the launch plan and the path choice
//   rnn_kernels.cuh   the kernels, and block_matvec.cuh the block-level pieces they share
// rnn_launch.h and the kernels are shared with the CPU emulation the tests run
// (tests/emu/rnn_emu.cpp).
//
// Environment: FUSED_BPTT_CUDA_PATH=auto|persistent|per_step forces a path (tests, benchmarks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include "env.h"
#include "rnn_launch.h"

namespace fused_bptt {
namespace {

using cuda_impl::DeviceConfig;
using cuda_impl::PathChoice;

// Device attributes and occupancy answers do not change while the process lives: ask the driver
// once per device (and kernel, threads, shared memory size), not on every call. One mutex guards
// the caches; the driver calls made under it run once per key.
struct DeviceAttributes {
  int sms = 0, smem_optin = 0, cooperative = 0;
};

std::mutex g_cache_mutex;

const DeviceAttributes& device_attributes(int dev) {
  static std::map<int, DeviceAttributes> cache;
  const std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto it = cache.find(dev);
  if (it == cache.end()) {
    DeviceAttributes a;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&a.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&a.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&a.cooperative, cudaDevAttrCooperativeLaunch, dev));
    it = cache.emplace(dev, a).first;  // std::map: references stay valid as it grows
  }
  return it->second;
}

// Blocks of `kernel` that can be resident at once on device `dev`, `threads` threads and `smem`
// bytes of dynamic shared memory each. Above 48 KiB a kernel must opt in; the attribute is per
// process and device, so it is set once per (device, kernel) to the device maximum: every caller
// wants that same value, so no host thread can shrink it under another's launch.
int64_t co_resident_blocks_cached(int dev, const void* kernel, int threads, int64_t smem) {
  static std::set<std::pair<int, const void*>> opted_in;
  static std::map<std::tuple<int, const void*, int, int64_t>, int64_t> cache;
  const DeviceAttributes& a = device_attributes(dev);
  const std::lock_guard<std::mutex> lock(g_cache_mutex);
  const auto key = std::make_tuple(dev, kernel, threads, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (opted_in.insert({dev, kernel}).second) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, a.smem_optin));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                               static_cast<size_t>(smem)));
  const int64_t blocks = static_cast<int64_t>(per_sm) * a.sms;
  cache.emplace(key, blocks);
  return blocks;
}

// The current device and stream, set by the CUDAGuard the op holds while this object lives.
struct CudaDevice {
  int dev;
  cudaStream_t stream;

  DeviceConfig config() const {
    const DeviceAttributes& a = device_attributes(dev);
    PathChoice path = static_cast<PathChoice>(
        env_choice("FUSED_BPTT_CUDA_PATH", {"auto", "persistent", "per_step"}));
    // Without cooperative launch there is no grid barrier: only the per-step path can run.
    TORCH_CHECK(a.cooperative || path != PathChoice::Persistent,
                "fused_bptt: FUSED_BPTT_CUDA_PATH=persistent, but device ", dev,
                " does not support cooperative launch, which the persistent kernels need");
    if (!a.cooperative) path = PathChoice::PerStep;
    return DeviceConfig{a.sms, a.smem_optin, kernels::kMaxThreads, path};
  }

  template <class Kernel>
  int64_t co_resident_blocks(Kernel kernel, int threads, int64_t smem) const {
    return co_resident_blocks_cached(dev, reinterpret_cast<const void*>(kernel), threads, smem);
  }

  template <class... KArgs, class... Args>
  void launch(void (*kernel)(KArgs...), int grid, int threads, int64_t smem,
              Args&&... args) const {
    kernel<<<grid, threads, static_cast<size_t>(smem), stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // False when the device refuses the launch as too large or unsupported: under MPS thread
  // limits or in a green context the occupancy query above can promise more than the launch gets.
  // That error is cleared, so the caller can take the per-step path; any other error throws.
  template <class... KArgs, class... Args>
  bool launch_cooperative(void (*kernel)(KArgs...), int grid, int threads, int64_t smem,
                          Args&&... args) const {
    // cudaLaunchCooperativeKernel takes the arguments as pointers to values of the exact
    // parameter types, so convert them into a tuple of those types first.
    std::tuple<KArgs...> typed(std::forward<Args>(args)...);
    void* argv[sizeof...(KArgs)];
    std::apply(
        [&](auto&... a) {
          int i = 0;
          ((argv[i++] = static_cast<void*>(&a)), ...);
        },
        typed);
    const cudaError_t err =
        cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid),
                                    dim3(threads), argv, static_cast<size_t>(smem), stream);
    if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported) {
      (void)cudaGetLastError();  // not sticky: clearing it leaves the context usable
      return false;
    }
    C10_CUDA_CHECK(err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

CudaDevice current_device(const at::Tensor& x) {
  return CudaDevice{x.get_device(), c10::cuda::getCurrentCUDAStream(x.get_device()).stream()};
}

at::Tensor rnn_forward_cuda(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
                            const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                            const std::optional<at::Tensor>& bias_hh, bool relu,
                            const std::optional<at::Tensor>& resets,
                            const std::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_impl::rnn_forward_impl(current_device(x), x, h0, weight_ih, weight_hh, bias_ih,
                                     bias_hh, relu, resets, lengths);
}

RnnGrads rnn_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                           const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                           const at::Tensor& y, bool relu,
                           const std::optional<at::Tensor>& grad_h_n,
                           const std::optional<at::Tensor>& resets,
                           const std::optional<at::Tensor>& lengths) {
  const c10::cuda::CUDAGuard guard(x.device());
  return cuda_impl::rnn_backward_impl(current_device(x), grad_y, x, h0, weight_ih, weight_hh, y,
                                      relu, grad_h_n, resets, lengths);
}

}  // namespace
}  // namespace fused_bptt

TORCH_LIBRARY_IMPL(fused_bptt, CUDA, m) {
  m.impl("rnn_forward", &fused_bptt::rnn_forward_cuda);
  m.impl("rnn_backward", &fused_bptt::rnn_backward_cuda);
}

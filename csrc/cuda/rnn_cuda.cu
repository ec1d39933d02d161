// rnn_cuda.cu: the CUDA implementations of fused_bptt::rnn_forward / rnn_backward.
//
// The host logic (GEMMs, path choice) is rnn_launch.h and the kernels are rnn_kernels.cuh, both
// shared with the CPU emulation the tests run (tests/emu/rnn_emu.cpp). This file adds only what is
// GPU-specific: the device guard, the current stream, the occupancy query, the cooperative launch,
// and the checks on every CUDA call.
//
// Environment: FUSED_BPTT_CUDA_PATH=persistent|per_step forces a path (benchmarks); unset = auto.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "rnn_launch.h"

namespace fused_bptt {
namespace {

using cuda_impl::DeviceConfig;
using cuda_impl::PathChoice;

cuda_impl::PathChoice path_from_env() {
  const char* v = std::getenv("FUSED_BPTT_CUDA_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return PathChoice::Auto;
  if (std::strcmp(v, "persistent") == 0) return PathChoice::Persistent;
  if (std::strcmp(v, "per_step") == 0) return PathChoice::PerStep;
  TORCH_CHECK(false, "fused_bptt: FUSED_BPTT_CUDA_PATH must be auto, persistent or per_step, but is '", v, "'");
}

// The current device and stream, set by the CUDAGuard the op holds while this object lives.
struct CudaDevice {
  cudaStream_t stream;

  DeviceConfig config() const {
    int dev = 0, sms = 0, smem_optin = 0, coop = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
    PathChoice path = path_from_env();
    // Without cooperative launch there is no grid barrier: only the per-step path can run.
    TORCH_CHECK(coop || path != PathChoice::Persistent,
                "fused_bptt: FUSED_BPTT_CUDA_PATH=persistent, but device ", dev,
                " does not support cooperative launch, which the persistent kernels need");
    if (!coop) path = PathChoice::PerStep;
    return DeviceConfig{sms, smem_optin, kernels::kMaxThreads, path};
  }

  // Blocks of `kernel` that can be resident at once on the whole device with `smem` bytes each.
  template <class Kernel>
  int64_t co_resident_blocks(Kernel kernel, int threads, int64_t smem) const {
    int dev = 0, sms = 0, per_sm = 0, smem_optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // Above 48 KiB of dynamic shared memory a kernel must opt in. The attribute is per process, so
    // every caller sets the same value, the device maximum: a per-call size would let one host
    // thread shrink it under another's launch.
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                                 static_cast<size_t>(smem)));
    return static_cast<int64_t>(per_sm) * sms;
  }

  template <class... KArgs, class... Args>
  void launch(void (*kernel)(KArgs...), int grid, int threads, int64_t smem, Args&&... args) const {
    kernel<<<grid, threads, static_cast<size_t>(smem), stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <class... KArgs, class... Args>
  void launch_cooperative(void (*kernel)(KArgs...), int grid, int threads, int64_t smem, Args&&... args) const {
    // cudaLaunchCooperativeKernel takes the arguments as pointers to values of the exact parameter
    // types, so convert them into a tuple of those types first.
    std::tuple<KArgs...> typed(std::forward<Args>(args)...);
    void* argv[sizeof...(KArgs)];
    std::apply([&](auto&... a) {
      int i = 0;
      ((argv[i++] = static_cast<void*>(&a)), ...);
    }, typed);
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(threads),
                                               argv, static_cast<size_t>(smem), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor rnn_forward_cuda(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
                            const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                            const std::optional<at::Tensor>& bias_hh, bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaDevice dev{c10::cuda::getCurrentCUDAStream().stream()};
  return cuda_impl::rnn_forward_impl(dev, x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu);
}

RnnGrads rnn_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                           const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& y,
                           bool relu, const std::optional<at::Tensor>& grad_h_n) {
  const c10::cuda::CUDAGuard guard(x.device());
  const CudaDevice dev{c10::cuda::getCurrentCUDAStream().stream()};
  return cuda_impl::rnn_backward_impl(dev, grad_y, x, h0, weight_ih, weight_hh, y, relu, grad_h_n);
}

}  // namespace
}  // namespace fused_bptt

TORCH_LIBRARY_IMPL(fused_bptt, CUDA, m) {
  m.impl("rnn_forward", &fused_bptt::rnn_forward_cuda);
  m.impl("rnn_backward", &fused_bptt::rnn_backward_cuda);
}

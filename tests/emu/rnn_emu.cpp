// rnn_emu.cpp: the CUDA backend built for the CPU. rnn_launch.h and rnn_kernels.cuh compile here
// unchanged; kernel launches go to simt_emu.h (CPU threads) and the GEMMs to ATen's CPU kernels.
// Built by tests/test_cuda_emulated.py with torch.utils.cpp_extension.load (-std=c++20).
//
// Registers into its own namespace, fused_bptt_emu, so it can sit next to fused_bptt._C:
//   rnn_forward / rnn_backward   the schemas of csrc/ops.cpp, on CPU tensors
//   set_device(num_sms, max_smem_per_block, max_coresident_blocks, threads, path)
//                                the emulated device the launcher plans for; path 0 auto,
//                                1 persistent forced, 2 per-step forced
//   last_launch() -> [persistent, grid, J, group, b_tile, smem]   what the last op ran
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fused_bptt.h"

#include "cuda/rnn_launch.h"

#include <mutex>

namespace fused_bptt {
namespace {

using cuda_impl::DeviceConfig;
using cuda_impl::LaunchRecord;
using cuda_impl::PathChoice;

std::mutex g_mutex;
DeviceConfig g_config{4, 48 * 1024, 64, PathChoice::Auto};
int64_t g_max_coresident = 4;
LaunchRecord g_last;

struct EmuDevice {
  DeviceConfig config() const {
    std::lock_guard<std::mutex> g(g_mutex);
    return g_config;
  }
  template <class Kernel>
  int64_t co_resident_blocks(Kernel, int, int64_t smem) const {
    std::lock_guard<std::mutex> g(g_mutex);
    return smem <= g_config.max_smem_per_block ? g_max_coresident : 0;
  }
  template <class... KArgs, class... Args>
  void launch(void (*kernel)(KArgs...), int grid, int threads, int64_t smem, Args&&... args) const {
    simt::launch(kernel, dim3(grid), dim3(threads), smem, std::forward<Args>(args)...);
  }
  template <class... KArgs, class... Args>
  void launch_cooperative(void (*kernel)(KArgs...), int grid, int threads, int64_t smem, Args&&... args) const {
    simt::launch_cooperative(kernel, dim3(grid), dim3(threads), smem, std::forward<Args>(args)...);
  }
};

void set_device(int64_t num_sms, int64_t max_smem_per_block, int64_t max_coresident_blocks, int64_t threads,
                int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "fused_bptt_emu.set_device: path must be 0 (auto), 1 (persistent) or ",
              "2 (per-step), but got ", path);
  std::lock_guard<std::mutex> g(g_mutex);
  g_config = DeviceConfig{static_cast<int>(num_sms), max_smem_per_block, static_cast<int>(threads),
                          static_cast<PathChoice>(path)};
  g_max_coresident = max_coresident_blocks;
  cuda_impl::check_config(g_config);
}

std::vector<int64_t> last_launch() {
  std::lock_guard<std::mutex> g(g_mutex);
  return {g_last.persistent, g_last.grid, g_last.J, g_last.group, g_last.b_tile, g_last.smem};
}

at::Tensor rnn_forward_emu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, bool relu) {
  LaunchRecord rec;
  at::Tensor y = cuda_impl::rnn_forward_impl(EmuDevice{}, x, h0, w_ih, w_hh, b_ih, b_hh, relu, &rec);
  std::lock_guard<std::mutex> g(g_mutex);
  g_last = rec;
  return y;
}

RnnGrads rnn_backward_emu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& y, bool relu,
                          const std::optional<at::Tensor>& grad_h_n) {
  LaunchRecord rec;
  RnnGrads grads = cuda_impl::rnn_backward_impl(EmuDevice{}, grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n, &rec);
  std::lock_guard<std::mutex> g(g_mutex);
  g_last = rec;
  return grads;
}

}  // namespace
}  // namespace fused_bptt

TORCH_LIBRARY(fused_bptt_emu, m) {
  m.def(fused_bptt::kRnnForwardSchema);  // the schemas of csrc/ops.cpp, in this namespace
  m.def(fused_bptt::kRnnBackwardSchema);
  m.def("set_device(int num_sms, int max_smem_per_block, int max_coresident_blocks, int threads, int path) -> ()",
        &fused_bptt::set_device);
  m.def("last_launch() -> int[]", &fused_bptt::last_launch);
}

TORCH_LIBRARY_IMPL(fused_bptt_emu, CPU, m) {
  m.impl("rnn_forward", &fused_bptt::rnn_forward_emu);
  m.impl("rnn_backward", &fused_bptt::rnn_backward_emu);
}

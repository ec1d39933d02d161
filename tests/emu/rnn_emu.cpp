// rnn_emu.cpp: the CUDA backend built for the CPU. csrc/cuda/rnn_launch.h and the kernels compile
// here unchanged; kernel launches go to simt_emu.h (CPU threads) and the GEMMs to ATen's CPU
// kernels. Built by tests/test_cuda_emulated.py with torch.utils.cpp_extension.load.
//
// Registers into its own namespace, fused_bptt_emu, so it can sit next to fused_bptt._C:
//   rnn_forward / rnn_backward   CPU kernels only: the test defines their schemas from the real
//                                ops' (torch.ops.fused_bptt.*.default._schema), so they cannot
//                                drift apart
//   set_device(num_sms, max_smem_per_block, max_coresident_blocks, threads, path,
//              refuse_cooperative)
//                                the emulated device the launcher plans for; path "auto",
//                                "persistent" or "per_step" (FUSED_BPTT_CUDA_PATH's values);
//                                refuse_cooperative: every cooperative launch is refused, as
//                                under MPS thread limits
//   last_launch() -> [persistent, refused, grid, J, slices, rows, b_tile, group, smem]
//                                what the last op ran, recorded by the emulated device
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "fused_bptt.h"
#include "simt_emu.h"  // before the kernels: they take CUDA's names from it
#include "cuda/rnn_launch.h"

namespace fused_bptt {
namespace {

using cuda_impl::DeviceConfig;
using cuda_impl::PathChoice;
using kernels::PersistentParams;

struct LaunchRecord {
  bool persistent = false, refused = false;
  int grid = 0;
  int64_t smem = 0;
  PersistentParams params{};
};

std::mutex g_mutex;
DeviceConfig g_config{4, 48 * 1024, 64, PathChoice::Auto};
int64_t g_max_coresident = 4;
bool g_refuse_cooperative = false;
LaunchRecord g_last;

// The device of rnn_launch.h on CPU threads; it notes what it ran in *record.
struct EmuDevice {
  LaunchRecord* record;

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
  void launch(void (*kernel)(KArgs...), int grid, int threads, int64_t smem,
              Args&&... args) const {
    simt::launch(kernel, dim3(grid), dim3(threads), smem, std::forward<Args>(args)...);
  }
  template <class... KArgs, class... Args>
  bool launch_cooperative(void (*kernel)(KArgs...), int grid, int threads, int64_t smem,
                          Args&&... args) const {
    record->grid = grid;
    record->smem = smem;
    (note_params(args), ...);
    {
      std::lock_guard<std::mutex> g(g_mutex);
      record->refused = g_refuse_cooperative;
    }
    if (record->refused) return false;
    record->persistent = true;
    simt::launch_cooperative(kernel, dim3(grid), dim3(threads), smem, std::forward<Args>(args)...);
    return true;
  }

 private:
  template <class A>
  void note_params(const A& a) const {
    if constexpr (std::is_same_v<std::decay_t<A>, PersistentParams>) record->params = a;
  }
};

void set_device(int64_t num_sms, int64_t max_smem_per_block, int64_t max_coresident_blocks,
                int64_t threads, const std::string& path, bool refuse_cooperative) {
  const PathChoice choice = path == "auto"         ? PathChoice::Auto
                            : path == "persistent" ? PathChoice::Persistent
                            : path == "per_step"   ? PathChoice::PerStep
                                                   : PathChoice(-1);
  TORCH_CHECK(choice != PathChoice(-1),
              "fused_bptt_emu.set_device: path must be auto, persistent or per_step, but is '",
              path, "'");
  const DeviceConfig config{static_cast<int>(num_sms), max_smem_per_block,
                            static_cast<int>(threads), choice};
  cuda_impl::check_config(config);
  std::lock_guard<std::mutex> g(g_mutex);
  g_config = config;
  g_max_coresident = max_coresident_blocks;
  g_refuse_cooperative = refuse_cooperative;
}

std::vector<int64_t> last_launch() {
  std::lock_guard<std::mutex> g(g_mutex);
  const PersistentParams& p = g_last.params;
  return {g_last.persistent, g_last.refused, g_last.grid, p.J, p.slices, p.rows, p.b_tile, p.group,
          g_last.smem};
}

template <class Op>
auto recorded(Op op) {
  LaunchRecord rec;
  auto out = op(EmuDevice{&rec});
  std::lock_guard<std::mutex> g(g_mutex);
  g_last = rec;
  return out;
}

at::Tensor rnn_forward_emu(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, bool relu,
                           const std::optional<at::Tensor>& resets,
                           const std::optional<at::Tensor>& lengths) {
  return recorded([&](const EmuDevice& dev) {
    return cuda_impl::rnn_forward_impl(dev, x, h0, w_ih, w_hh, b_ih, b_hh, relu, resets,
                                       lengths);
  });
}

RnnGrads rnn_backward_emu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h0,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& y,
                          bool relu, const std::optional<at::Tensor>& grad_h_n,
                          const std::optional<at::Tensor>& resets,
                          const std::optional<at::Tensor>& lengths) {
  return recorded([&](const EmuDevice& dev) {
    return cuda_impl::rnn_backward_impl(dev, grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n, resets,
                                        lengths);
  });
}

}  // namespace
}  // namespace fused_bptt

TORCH_LIBRARY(fused_bptt_emu, m) {
  m.def(
      "set_device(int num_sms, int max_smem_per_block, int max_coresident_blocks, int threads, "
      "str path, bool refuse_cooperative) -> ()",
      &fused_bptt::set_device);
  m.def("last_launch() -> int[]", &fused_bptt::last_launch);
}

// rnn_forward / rnn_backward are defined by the test (a fragment of this namespace) from the real
// ops' schemas; the dispatcher takes kernels registered before their schema.
TORCH_LIBRARY_IMPL(fused_bptt_emu, CPU, m) {
  m.impl("rnn_forward", &fused_bptt::rnn_forward_emu);
  m.impl("rnn_backward", &fused_bptt::rnn_backward_emu);
}

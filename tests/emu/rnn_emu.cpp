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
//                                what the last op ran, recorded by the emulated device (for the
//                                bfloat16/float16 kernels rows = B and group = 0)
//   set_mma(has_mma)             whether the emulated device has bf16/fp16 mma (sm_80+; default
//                                true): false emulates an older GPU
//   mma_tile(a, bt, c, ld) -> (regs, d)
//                                one emulated warp loads the fragments of a [16, 16] and of
//                                B = bt^T (bt [8, 16]), both bfloat16 or both float16, with the
//                                kernels' fragment loaders from buffers of row stride ld, and runs
//                                one mma on the accumulator c [16, 8] (float32, in its ISA layout):
//                                regs [32, 6] int32 = each lane's a[0..3], b[0..1]; d [16, 8]
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "fused_bptt.h"
#include "simt_emu.h"  // before the kernels: they take CUDA's names from it
#include "mma_emu.h"   // the tensor-core instruction and 16-bit conversions, likewise
#include "cuda/rnn_launch.h"
#include "cuda/rnn_launch_lowp.h"

namespace fused_bptt {
namespace {

using cuda_impl::DeviceConfig;
using cuda_impl::PathChoice;
using kernels::PersistentParams;
using kernels_lowp::LowpParams;

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
bool g_has_mma = true;
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
    if constexpr (std::is_same_v<std::decay_t<A>, LowpParams>)
      record->params = PersistentParams{a.T, a.B, a.H, a.J, a.slices, a.B, a.b_tile, 0, a.relu};
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

void set_mma(bool has_mma) {
  std::lock_guard<std::mutex> g(g_mutex);
  g_has_mma = has_mma;
}

bool has_mma() {
  std::lock_guard<std::mutex> g(g_mutex);
  return g_has_mma;
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
  if (cuda_impl::is_low_precision(x)) {
    return recorded([&](const EmuDevice& dev) {
      return cuda_impl::rnn_forward_lowp_impl(dev, has_mma(), x, h0, w_ih, w_hh, b_ih, b_hh, relu,
                                              resets, lengths);
    });
  }
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
  if (cuda_impl::is_low_precision(x)) {
    return recorded([&](const EmuDevice& dev) {
      return cuda_impl::rnn_backward_lowp_impl(dev, has_mma(), grad_y, x, h0, w_ih, w_hh, y, relu,
                                               grad_h_n, resets, lengths);
    });
  }
  return recorded([&](const EmuDevice& dev) {
    return cuda_impl::rnn_backward_impl(dev, grad_y, x, h0, w_ih, w_hh, y, relu, grad_h_n, resets,
                                        lengths);
  });
}

// One warp: fragments of a (row stride ld) and of B[k][n] = bt[n][k] (row stride ld) through the
// kernels' loaders, then one mma on c, whose fragment is read and written in the accumulator
// layout of csrc/cuda/mma.cuh.
template <class Fmt>
void mma_tile_kernel(const uint16_t* a, const uint16_t* bt, int ld, const float* c,
                     int32_t* regs, float* d) {
  const int lane = static_cast<int>(threadIdx.x);
  uint32_t fa[4], fb_[2];
  kernels_lowp::load_a_fragment(fa, a, ld, lane);
  kernels_lowp::load_b_fragment(fb_, bt, ld, lane);
  // Element i of the accumulator fragment: row lane / 4 (+ 8 for i >= 2), column 2 (lane % 4) +
  // (i % 2) of the row-major [16, 8] c and d.
  auto at = [&](int i) { return ((lane >> 2) + (i >= 2 ? 8 : 0)) * 8 + 2 * (lane & 3) + (i & 1); };
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[at(i)];
  fb::mma_m16n8k16<Fmt::kIsBf16>(acc, fa, fb_);
  for (int i = 0; i < 4; ++i) regs[lane * 6 + i] = static_cast<int32_t>(fa[i]);
  for (int i = 0; i < 2; ++i) regs[lane * 6 + 4 + i] = static_cast<int32_t>(fb_[i]);
  for (int i = 0; i < 4; ++i) d[at(i)] = acc[i];
}

std::tuple<at::Tensor, at::Tensor> mma_tile(const at::Tensor& a, const at::Tensor& bt,
                                            const at::Tensor& c, int64_t ld) {
  TORCH_CHECK(cuda_impl::is_low_precision(a) && bt.scalar_type() == a.scalar_type(),
              "mma_tile: a and bt must both be bfloat16 or both float16");
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && bt.sizes() == at::IntArrayRef({8, 16}) &&
                  c.sizes() == at::IntArrayRef({16, 8}) && c.scalar_type() == at::kFloat,
              "mma_tile: expected a [16, 16], bt [8, 16], c [16, 8] float32");
  TORCH_CHECK(ld >= 16 && ld % 2 == 0, "mma_tile: ld must be even and >= 16, but is ", ld);
  // The operands copied into buffers of row stride ld (the padding is NaN: a loader that reads
  // it shows up in d).
  auto strided = [&](const at::Tensor& t) {
    at::Tensor buf = at::full({t.size(0), ld}, NAN, t.options());
    buf.narrow(1, 0, 16).copy_(t);
    return buf;
  };
  const at::Tensor a_buf = strided(a), bt_buf = strided(bt), c_in = c.contiguous();
  at::Tensor regs = at::empty({32, 6}, a.options().dtype(at::kInt));
  at::Tensor d = at::empty({16, 8}, c.options());
  auto run = [&](auto kernel) {
    simt::launch(kernel, dim3(1), dim3(32), 0,
                 reinterpret_cast<const uint16_t*>(a_buf.const_data_ptr()),
                 reinterpret_cast<const uint16_t*>(bt_buf.const_data_ptr()), static_cast<int>(ld),
                 c_in.const_data_ptr<float>(), regs.mutable_data_ptr<int32_t>(),
                 d.mutable_data_ptr<float>());
  };
  if (a.scalar_type() == at::kBFloat16) {
    run(&mma_tile_kernel<kernels_lowp::Bf16>);
  } else {
    run(&mma_tile_kernel<kernels_lowp::F16>);
  }
  return {regs, d};
}

}  // namespace
}  // namespace fused_bptt

TORCH_LIBRARY(fused_bptt_emu, m) {
  m.def(
      "set_device(int num_sms, int max_smem_per_block, int max_coresident_blocks, int threads, "
      "str path, bool refuse_cooperative) -> ()",
      &fused_bptt::set_device);
  m.def("last_launch() -> int[]", &fused_bptt::last_launch);
  m.def("set_mma(bool has_mma) -> ()", &fused_bptt::set_mma);
  m.def("mma_tile(Tensor a, Tensor bt, Tensor c, int ld) -> (Tensor, Tensor)",
        &fused_bptt::mma_tile);
}

// rnn_forward / rnn_backward are defined by the test (a fragment of this namespace) from the real
// ops' schemas; the dispatcher takes kernels registered before their schema.
TORCH_LIBRARY_IMPL(fused_bptt_emu, CPU, m) {
  m.impl("rnn_forward", &fused_bptt::rnn_forward_emu);
  m.impl("rnn_backward", &fused_bptt::rnn_backward_emu);
}

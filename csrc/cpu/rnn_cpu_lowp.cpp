// rnn_cpu_lowp.cpp: the CPU ops in bfloat16 and float16 (S): rnn_cpu.cpp's structure, with every
// tensor of the op's interface in S and all arithmetic in float32.
//
// Shapes and math as in rnn_cpu.cpp (x [T, B, I], h0 [B, H], W_ih [H, I], W_hh [H, H], y, grad_y
// [T, B, H]). Where the rounding to S happens, and why:
// - Forward: the input projection x W_ih^T of all T steps is one GEMM into a float32 [T*B, H]
//   buffer (freed on return; nothing extra is saved for backward). Each step adds b_ih + b_hh
//   (summed in float32) and h_{t-1} W_hh^T (float32 sums) and takes act in float32; y_t is the
//   one rounding to S per element and step.
// - The state carried from step to step is y_t, rounded to S, as nn.RNN carries it: the next step
//   reads the numbers the caller gets, the backward's act'(z_t) = 1 - y_t^2 and h_{t-1} = y_{t-1}
//   are exactly the forward's, and an S-operand GEMM (MKL's AMX or AVX512-FP16 code) can run the
//   step at large H. A float32 state kept inside a call gives about half these errors
//   (bench/accuracy_lowp.py measures both; README), but no S-operand GEMM could take it, and the
//   backward would read other h_{t-1} than the y it is given.
// - Backward: dz_t = (grad_y_t + dz_{t+1} W_hh) * act'(y_t) stays float32 for the whole call (it
//   is internal: nothing forces a rounding); grad_h_n is added in float32. dh0, dW_hh, dW_ih and
//   dx are float32-accumulated GEMMs, rounded once to S; db is ATen's float64 column sum of dz,
//   rounded once.
// - Boundaries (resets, lengths) as in rnn_cpu.cpp: runs of rows of one RowKind per step.
// - GEMMs (cpu_gemm.h): where MKL's S GEMM is the fast one (bfloat16 on AMX) or asked for
//   (FUSED_BPTT_CPU_GEMM=blas/aten), on S operands, dz rounded to S for them; elsewhere the float32
//   GEMM on operands widened once per call. The step kernel reads W_hh widened to float32. The
//   backward's float32 GEMMs run side by side as in rnn_cpu.cpp (rnn_cpu.h, concurrent_products).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "cpu/rnn_cpu.h"
#include "cpu/rnn_step_kernel.h"

namespace fused_bptt {
namespace cpu {
namespace {

// t as a dense float32 matrix.
at::Tensor widened(const at::Tensor& t) {
  return t.to(at::kFloat, false, false, at::MemoryFormat::Contiguous);
}

at::Tensor float_buffer(int64_t rows, int64_t cols, const at::Tensor& like) {
  return at::empty({rows, cols}, like.options().dtype(at::kFloat));
}

// The GEMMs of one call: each operand is a tensor in S; in float32 mode (lowp_gemms_in_float32)
// it is widened once, on first use, and gemm<float> runs on the copies; otherwise gemm_lowp runs
// on the S data. C [M, N] (float32, row stride ldc) = op(A) op(B) + beta C, where A and B are
// row-major matrices of `a_cols` / `b_cols` columns starting at element offset a_at / b_at.
template <typename S>
class Gemms {
 public:
  explicit Gemms(GemmMode mode) : mode_(mode), float32_(lowp_gemms_in_float32<S>(mode)) {}

  bool float32() const { return float32_; }

  // A row-major matrix of `cols` columns: a contiguous S tensor (widened on first use in float32
  // mode), or a float32 one alone (which only float32 mode reads).
  struct Operand {
    Operand(const at::Tensor& in_s, int64_t cols) : s(in_s), cols(cols) {}
    Operand(const at::Tensor& in_s, const at::Tensor& in_f, int64_t cols)
        : s(in_s), f(in_f), cols(cols) {}
    const S* data() const { return s.data_ptr<S>(); }
    const float* wide() {
      if (!f.defined()) f = widened(s);
      return f.data_ptr<float>();
    }
    at::Tensor s, f;
    int64_t cols;
  };

  void operator()(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, Operand& a,
                  int64_t a_at, Operand& b, int64_t b_at, float beta, float* C, int64_t ldc) {
    if (float32_) {
      gemm<float>(mode_, trans_a, trans_b, M, N, K, 1.0f, a.wide() + a_at, a.cols, b.wide() + b_at,
                  b.cols, beta, C, ldc);
    } else {
      gemm_lowp<S>(mode_, trans_a, trans_b, M, N, K, a.data() + a_at, a.cols, b.data() + b_at,
                   b.cols, beta, C, ldc);
    }
  }

 private:
  GemmMode mode_;
  bool float32_;
};

}  // namespace

template <typename S>
void forward_lowp(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const std::optional<at::Tensor>& bias_ih,
                  const std::optional<at::Tensor>& bias_hh, at::Tensor& y, const RnnShape& s,
                  bool relu, const Bounds& bounds) {
  const int64_t T = s.T, B = s.B, H = s.H, BH = s.B * s.H;
  const GemmMode mode = gemm_mode_from_env();
  const StepKernels<S>& k = step_kernels<S>();
  Gemms<S> gemms(mode);
  using Operand = typename Gemms<S>::Operand;
  std::vector<float> bias(H, 0.0f);  // b_ih + b_hh once, in float32
  for (const auto* b : {&bias_ih, &bias_hh}) {
    if (!b->has_value()) continue;
    const at::Tensor bc = (*b)->contiguous();
    const S* bp = bc.data_ptr<S>();
    for (int64_t j = 0; j < H; ++j) bias[j] += static_cast<float>(bp[j]);
  }
  S* yp = y.data_ptr<S>();
  const S* h0p = h0.data_ptr<S>();
  auto h_prev = [&](int64_t t) { return t == 0 ? h0p : yp + (t - 1) * BH; };

  at::Tensor xw = float_buffer(T * B, H, x);  // x W_ih^T over all T*B rows, float32
  float* xwp = xw.data_ptr<float>();
  {
    Operand xo(x, s.I), wo(w_ih, s.I);
    gemms(false, true, T * B, H, s.I, xo, 0, wo, 0, 0, xwp, H);
  }
  if (use_blas_step<float>(k, mode, H)) {
    // h_{t-1} W_hh^T added into the projection of step t, then the elementwise pass (K = 0).
    Operand w(w_hh, H);
    Operand h(h0, H);  // the state entering step h_step: made (and widened) once per step
    int64_t h_step = 0;
    blas_recurrence</*kReverse=*/false>(
        s, bounds, yp,
        [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
          if (kind != RowKind::kCarry) return;
          if (h_step != t) h = Operand(y[t - 1], H), h_step = t;
          gemms(false, true, e - a, H, H, h, a * H, w, 0, 1, xwp + t * BH + a * H, H);
        },
        [&](RowKind, int64_t t, int64_t a, int64_t e) {
          const int64_t o = t * BH + a * H;
          k.forward(nullptr, nullptr, nullptr, bias.data(), xwp + o, yp + o, e - a, 0, H, relu);
        });
    return;
  }
  std::vector<float> w(H * H), part(BH);  // the kernel's w: W_hh^T, widened and packed
  k.pack(w_hh.data_ptr<S>(), H, H, 1, H, w.data());
  const float* wp = w.data();
  kernel_recurrence</*kReverse=*/false>(
      s, bounds, yp, [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
        const int64_t o = t * BH + a * H;
        const bool carry = kind == RowKind::kCarry;
        k.forward(carry ? h_prev(t) + a * H : nullptr, wp, part.data() + a * H, bias.data(),
                  xwp + o, yp + o, e - a, carry ? H : 0, H, relu);
      });
}

template <typename S>
void backward_lowp(const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& x,
                   const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const at::Tensor& y, const RnnShape& s, bool relu, const Bounds& bounds,
                   at::Tensor& dx, at::Tensor& dh0, at::Tensor& dw_ih, at::Tensor& dw_hh,
                   at::Tensor& db) {
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, BH = s.B * s.H;
  const GemmMode mode = gemm_mode_from_env();
  const StepKernels<S>& k = step_kernels<S>();
  Gemms<S> gemms(mode);
  using Operand = typename Gemms<S>::Operand;
  at::Tensor dz = float_buffer(T * B, H, y);  // float32 for the whole call
  float* dzp = dz.data_ptr<float>();
  const S* yp = y.data_ptr<S>();
  // grad_y read in place, rows ld apart (see rnn_cpu.cpp); grad_h_n joins at a row's last step as
  // a float32 addend, so grad_y + grad_h_n is never rounded to S.
  const S* gy = grad_y.data_ptr<S>();
  const int64_t gy_t = grad_y.stride(0), gy_ld = grad_y.stride(1);
  const at::Tensor last = grad_h_n.defined() ? widened(grad_h_n) : at::Tensor();
  // What a run of rows adds to grad_y besides the kernel's product: grad_h_n at the last step.
  auto addend = [&](RowKind kind, int64_t row) -> const float* {
    return kind == RowKind::kLast && last.defined() ? last.data_ptr<float>() + row * H : nullptr;
  };
  auto zero_rows = [&](float* p, int64_t rows) { std::fill(p, p + rows * H, 0.0f); };

  const bool blas_step = use_blas_step<float>(k, mode, H);
  if (blas_step) {
    const at::Tensor whh_wide = gemms.float32() ? widened(w_hh) : at::Tensor();
    std::vector<float> product(BH);  // dz_{t+1} W_hh, for the rows that carry
    blas_recurrence</*kReverse=*/true>(
        s, bounds, dzp,
        [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
          if (kind != RowKind::kCarry) return;
          if (gemms.float32()) {
            gemm<float>(mode, false, false, e - a, H, H, 1.0f, dzp + (t + 1) * BH + a * H, H,
                        whh_wide.data_ptr<float>(), H, 0.0f, product.data() + a * H, H);
          } else {  // the S operand the low-precision GEMM takes
            const at::Tensor dz_s = dz.narrow(0, (t + 1) * B + a, e - a).to(y.scalar_type());
            gemm_lowp<S>(mode, false, false, e - a, H, H, dz_s.data_ptr<S>(), H, w_hh.data_ptr<S>(),
                         H, 0.0f, product.data() + a * H, H);
          }
        },
        [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
          const int64_t o = t * BH + a * H;
          const float* add = kind == RowKind::kCarry ? product.data() + a * H : addend(kind, a);
          k.backward(nullptr, nullptr, nullptr, gy + t * gy_t + a * gy_ld, gy_ld, add, yp + o,
                     dzp + o, e - a, 0, H, relu);
        });
  } else {
    std::vector<float> w(H * H), part(BH);  // the kernel's w: W_hh, widened and packed
    k.pack(w_hh.data_ptr<S>(), H, H, H, 1, w.data());
    const float* wp = w.data();
    kernel_recurrence</*kReverse=*/true>(
        s, bounds, dzp, [&](RowKind kind, int64_t t, int64_t a, int64_t e) {
          const int64_t o = t * BH + a * H;
          const bool carry = kind == RowKind::kCarry;
          k.backward(carry ? dzp + o + BH : nullptr, wp, part.data() + a * H,
                     gy + t * gy_t + a * gy_ld, gy_ld, addend(kind, a), yp + o, dzp + o, e - a,
                     carry ? H : 0, H, relu);
        });
  }

  // The GEMMs over all T*B rows accumulate into float32 buffers, rounded once into the outputs.
  // dz is their A operand: float32 as it is, or rounded to S for the low-precision GEMMs.
  Operand dzo = gemms.float32() ? Operand(at::Tensor(), dz, H) : Operand(dz.to(y.scalar_type()), H);
  Operand whh(w_hh, H), h0o(h0, H), yo(y, H), xo(x, I), wih(w_ih, I);
  at::Tensor f_dh0 = float_buffer(B, H, x), f_dwhh = float_buffer(H, H, x);
  at::Tensor f_dwih = float_buffer(H, I, x), f_dx = float_buffer(T * B, I, x);
  float* dwhh = f_dwhh.data_ptr<float>();
  auto dx_rows = [&](int64_t t0, int64_t t1) {  // dx over the steps [t0, t1)
    gemms(false, false, (t1 - t0) * B, I, H, dzo, t0 * BH, wih, 0, 0,
          f_dx.data_ptr<float>() + t0 * B * I, I);
  };
  auto dw_ih_all = [&] {
    gemms(true, false, H, I, T * B, dzo, 0, xo, 0, 0, f_dwih.data_ptr<float>(), I);
  };
  auto dh0_and_dw_hh = [&] {
    gemms(false, false, B, H, H, dzo, 0, whh, 0, 0, f_dh0.data_ptr<float>(), H);
    gemms(true, false, H, H, B, dzo, 0, h0o, 0, 0, dwhh, H);
    gemms(true, false, H, H, (T - 1) * B, dzo, BH, yo, 0, 1, dwhh, H);
  };
  // db: ATen's column sum of dz accumulated in float64 (as the float32/float64 backward sums db),
  // rounded once to float32 and then to S.
  auto column_sum = [&] { db.copy_(dz.sum(0, false, at::kDouble).to(at::kFloat)); };
  const bool resets = bounds.reset != nullptr;
  // Side by side, one thread each, as the float32/float64 backward (rnn_cpu.cpp): only on the
  // float32 GEMMs, whose operands are widened here first (Operand widens on first use, which
  // two threads must not race to do).
  const bool concurrent = gemms.float32() && concurrent_products(s, blas_step);
  if (concurrent) {
    for (Operand* o : {&whh, &h0o, &yo, &xo, &wih}) o->wide();
    products_side_by_side(T, resets, dw_ih_all, dh0_and_dw_hh, dx_rows, column_sum);
  } else {
    dw_ih_all();
    dx_rows(0, T);
    column_sum();
  }
  // dh0 and dW_hh take dz through h_{t-1}, a constant 0 where the state was reset: zero those
  // rows of dz (and of its S copy), which dx, dW_ih and db have used already.
  if (resets) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        if (!bounds.reset_at(t, b)) continue;
        zero_rows(dzp + t * BH + b * H, 1);
        if (dzo.s.defined()) std::fill_n(dzo.s.template data_ptr<S>() + t * BH + b * H, H, S(0));
      }
    }
  }
  if (!concurrent || resets) dh0_and_dw_hh();
  dh0.copy_(f_dh0);
  dw_hh.copy_(f_dwhh);
  dw_ih.copy_(f_dwih);
  dx.copy_(f_dx.view({T, B, I}));
}

template void forward_lowp<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, at::Tensor&,
                                          const RnnShape&, bool, const Bounds&);
template void forward_lowp<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const std::optional<at::Tensor>&,
                                      const std::optional<at::Tensor>&, at::Tensor&,
                                      const RnnShape&, bool, const Bounds&);
template void backward_lowp<c10::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const RnnShape&, bool, const Bounds&,
                                           at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                           at::Tensor&);
template void backward_lowp<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const RnnShape&, bool, const Bounds&,
                                       at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                       at::Tensor&);

}  // namespace cpu
}  // namespace fused_bptt

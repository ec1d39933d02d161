// autograd.cpp: fused_bptt::rnn_layer, one layer with its autograd in C++ (any device).
//
//   rnn_layer(x [T,B,I], h0 [B,H], weight_ih [H,I], weight_hh [H,H], bias_ih [H]?, bias_hh [H]?,
//             relu, resets [T,B]?, lengths [B]?) -> (y [T,B,H], h_n [B,H])
//
// The same math as the Python autograd.Function in fused_bptt/function.py, which serves
// torch.compile, tracing and saved-tensor hooks; this one is the eager training path, where the
// Python Function's bookkeeping (tens of microseconds a call) would cost more than a small layer's
// arithmetic. Saved for backward: x, h0 and the weights, and y as a detached alias with its
// version (no extra [T, B, H] tensor; if y was changed in place after the forward, the backward
// recomputes it, bit for bit, from the saved inputs). h_n is a copy of y[T-1] (of y[lengths[b]-1, b]
// per row with lengths), whose gradient the backward op adds at that step.
//
// A backward that must itself be differentiable (create_graph=True, or batched gradients under
// torch.func) calls fused_bptt::rnn_layer_grads, which fused_bptt/function.py implements with the
// reference's plain PyTorch ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "fused_bptt.h"

namespace fused_bptt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_op(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
                      const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                      const std::optional<at::Tensor>& bias_hh, bool relu,
                      const std::optional<at::Tensor>& resets,
                      const std::optional<at::Tensor>& lengths) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_bptt::rnn_forward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, bool,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&)>();
  // Below autograd: the op's own (Python) autograd kernel is for traced graphs, not for us.
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets, lengths);
}

// h0 as the ops take it: [B, H], from [B, H] or a one-layer module's [1, B, H].
bool has_lead(const at::Tensor& h0) { return h0.dim() == 3 && h0.size(0) == 1; }
at::Tensor state_2d(const at::Tensor& t) { return has_lead(t) ? t.squeeze(0) : t; }

// h_n: a copy of each row's last step (y[T-1], or y[lengths[b]-1, b]), [1, B, H] if lead.
at::Tensor last_state(const at::Tensor& y, const std::optional<at::Tensor>& lengths, bool lead) {
  if (!lengths.has_value()) {
    const int64_t T = y.size(0);
    return lead ? y.narrow(0, T - 1, 1).clone() : y.select(0, T - 1).clone();
  }
  at::Tensor rows = at::arange(y.size(1), lengths->options());
  at::Tensor steps = *lengths - 1;
  if (lead) steps = steps.unsqueeze(0), rows = rows.unsqueeze(0);  // an index of shape [1, B]
  return y.index({steps, rows});
}

// True when a gradient arrives wrapped by torch.func (vmap over the backward).
bool is_functorch_wrapped(const at::Tensor& t) {
  return t.defined() && (t.key_set().has(c10::DispatchKey::FuncTorchBatched) ||
                         t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper));
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class RnnLayerFunction : public torch::autograd::Function<RnnLayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0,
                               const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                               const std::optional<at::Tensor>& bias_ih,
                               const std::optional<at::Tensor>& bias_hh, bool relu,
                               const std::optional<at::Tensor>& resets,
                               const std::optional<at::Tensor>& lengths) {
    at::Tensor y = forward_op(x, state_2d(h0), weight_ih, weight_hh, bias_ih, bias_hh, relu,
                              resets, lengths);
    at::Tensor h_n = last_state(y, lengths, has_lead(h0));
    ctx->save_for_backward({x, h0, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()),
                            bias_hh.value_or(at::Tensor()), resets.value_or(at::Tensor()),
                            lengths.value_or(at::Tensor())});
    ctx->saved_data["y"] = y.detach();
    ctx->saved_data["version"] = static_cast<int64_t>(y._version());
    ctx->saved_data["relu"] = relu;
    ctx->set_materialize_grads(false);
    return {y, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined() && !grads[1].defined()) return variable_list(9);
    const at::Tensor grad_h_n = grads[1].defined() ? state_2d(grads[1]) : grads[1];
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& h0_in = saved[1];  // [B, H] or [1, B, H]: dh0 gets its shape
    const at::Tensor h0 = state_2d(h0_in);
    const at::Tensor &w_ih = saved[2], &w_hh = saved[3];
    const at::Tensor &b_ih = saved[4], &b_hh = saved[5], &resets = saved[6], &lengths = saved[7];
    const bool relu = ctx->saved_data["relu"].toBool();
    if (at::GradMode::is_enabled() || is_functorch_wrapped(grad_y) ||
        is_functorch_wrapped(grad_h_n)) {
      static const auto grads_op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("fused_bptt::rnn_layer_grads", "")
              .typed<std::vector<at::Tensor>(
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
      std::vector<at::Tensor> g = grads_op.call(opt(grad_y), opt(grad_h_n), x, h0, w_ih, w_hh,
                                                opt(b_ih), opt(b_hh), relu, opt(resets),
                                                opt(lengths));
      return {g[0], g[1].reshape(h0_in.sizes()), g[2], g[3], b_ih.defined() ? g[4] : at::Tensor(),
              b_hh.defined() ? g[5] : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    at::Tensor y = ctx->saved_data["y"].toTensor();
    if (y._version() != ctx->saved_data["version"].toInt()) {  // changed in place: recompute
      y = forward_op(x, h0, w_ih, w_hh, opt(b_ih), opt(b_hh), relu, opt(resets), opt(lengths));
    }
    static const auto backward_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fused_bptt::rnn_backward", "")
            .typed<RnnGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
    const at::Tensor gy = grad_y.defined() ? grad_y : at::zeros_like(y);
    auto [dx, dh0, dw_ih, dw_hh, db] =
        backward_op.call(gy, x, h0, w_ih, w_hh, y, relu, opt(grad_h_n), opt(resets), opt(lengths));
    // The two biases get equal gradients; each its own tensor, so their .grad never alias.
    at::Tensor db_ih = b_ih.defined() ? db : at::Tensor();
    at::Tensor db_hh = b_hh.defined() ? (b_ih.defined() ? db.clone() : db) : at::Tensor();
    return {dx, dh0.reshape(h0_in.sizes()), dw_ih, dw_hh, db_ih, db_hh, at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rnn_layer_autograd(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, bool relu, const std::optional<at::Tensor>& resets,
    const std::optional<at::Tensor>& lengths) {
  variable_list out = RnnLayerFunction::apply(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu,
                                              resets, lengths);
  return {out[0], out[1]};
}

// Below autograd (no graph wanted, or fake tensors): the forward op and a copy of its last step.
std::tuple<at::Tensor, at::Tensor> rnn_layer_plain(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, bool relu, const std::optional<at::Tensor>& resets,
    const std::optional<at::Tensor>& lengths) {
  at::Tensor y = forward_op(x, state_2d(h0), weight_ih, weight_hh, bias_ih, bias_hh, relu, resets,
                            lengths);
  return {y, last_state(y, lengths, has_lead(h0))};
}

}  // namespace
}  // namespace fused_bptt

TORCH_LIBRARY_IMPL(fused_bptt, Autograd, m) {
  m.impl("rnn_layer", &fused_bptt::rnn_layer_autograd);
}

TORCH_LIBRARY_IMPL(fused_bptt, CompositeExplicitAutograd, m) {
  m.impl("rnn_layer", &fused_bptt::rnn_layer_plain);
}

// ops.cpp: the schemas of the fused RNN ops (defined once, here; their math is in fused_bptt.h)
// and the Python module that `import fused_bptt._C` loads.
// Each backend (cpu/, cuda/) registers only its own dispatch key.
#include "fused_bptt.h"

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_bptt, m) {
  // y [T, B, H] = the outputs h_1..h_T of one layer.
  m.def(
      "rnn_forward(Tensor x, Tensor h0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, bool relu, Tensor? resets=None, Tensor? lengths=None) -> Tensor");
  // (dx, dh0, dW_ih, dW_hh, db) from grad_y (+ grad_h_n at each row's last step) and the saved y.
  m.def(
      "rnn_backward(Tensor grad_y, Tensor x, Tensor h0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor y, bool relu, Tensor? grad_h_n=None, Tensor? resets=None, Tensor? lengths=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One layer with its autograd in C++ (autograd.cpp): the eager training path. h0 may also be
  // [1, B, H] (a one-layer module's hx); h_n then has that shape too, and no view of either is
  // taken outside the op (each would be one more autograd node per call).
  m.def(
      "rnn_layer(Tensor x, Tensor h0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, bool relu, Tensor? resets=None, Tensor? lengths=None) -> (Tensor, Tensor)");
  // The 6 input gradients of rnn_layer built from differentiable ops (the entries of absent biases
  // are empty): implemented in Python (fused_bptt/function.py), for double backward.
  m.def(
      "rnn_layer_grads(Tensor? grad_y, Tensor? grad_h_n, Tensor x, Tensor h0, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, bool relu, Tensor? resets=None, "
      "Tensor? lengths=None) -> Tensor[]");
}

namespace fused_bptt {
PyMethodDef* eager_call_methods();  // eager_call.cpp
}

// `import fused_bptt._C` loads this shared library, which runs the registrations above; the
// module's functions are the eager path's call of rnn_layer (eager_call.cpp).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT,
                                      "_C",
                                      nullptr,
                                      -1,
                                      fused_bptt::eager_call_methods(),
                                      nullptr,
                                      nullptr,
                                      nullptr,
                                      nullptr};
  return PyModule_Create(&module);
}

// eager_call.cpp: fused_bptt._C.rnn_layer, FusedRNN's eager way into the rnn_layer op.
//
//   rnn_layer(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets, lengths) -> (y, h_n)
//
// The arguments and result of torch.ops.fused_bptt.rnn_layer (ops.cpp has the schema). That call
// matches its Python arguments against the schema, builds a boxed stack and unboxes it again for
// the kernel: about as long as a small layer's arithmetic, on every call. This one calls the same
// op through the dispatcher, unboxed, so autograd, dispatch modes, the profiler and every backend
// see what they see from torch.ops; like torch.ops it releases the GIL while the op runs.
//
// It takes only what needs no conversion: each tensor argument exactly a Tensor or Parameter
// (None for the optional ones), relu a bool, nine positional arguments and no torch function
// mode. Anything else (a tensor subclass, which may override __torch_function__; a wrong type;
// a keyword) goes unchanged to the torch.ops call set by set_rnn_layer_fallback, which handles
// it or raises its own error.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <tuple>

namespace fused_bptt {
namespace {

PyObject* fallback = nullptr;  // torch.ops.fused_bptt.rnn_layer's call (a new reference)

bool is_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj);
}
bool is_optional_tensor(PyObject* obj) {
  return obj == Py_None || is_tensor(obj);
}

std::optional<at::Tensor> optional_tensor(PyObject* obj) {
  if (obj == Py_None) return std::nullopt;
  return THPVariable_Unpack(obj);
}

bool handled_here(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  if (nargs != 9 || kwnames != nullptr) return false;
  for (int i = 0; i < 4; ++i) {
    if (!is_tensor(args[i])) return false;
  }
  for (int i : {4, 5, 7, 8}) {
    if (!is_optional_tensor(args[i])) return false;
  }
  return PyBool_Check(args[6]) && !at::impl::torch_function_mode_enabled();
}

PyObject* rnn_layer(PyObject* /*module*/, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  if (!handled_here(args, nargs, kwnames)) {
    if (fallback == nullptr) {
      PyErr_SetString(PyExc_RuntimeError,
                      "fused_bptt._C.rnn_layer: set_rnn_layer_fallback was not called");
      return nullptr;
    }
    return PyObject_Vectorcall(fallback, args, nargsf, kwnames);
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_bptt::rnn_layer", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  // Owning copies (a reference count each), as torch.ops' stack holds: while the GIL is released
  // another thread may rebind an argument's tensor (x.data = ...).
  const at::Tensor x = THPVariable_Unpack(args[0]), h0 = THPVariable_Unpack(args[1]);
  const at::Tensor weight_ih = THPVariable_Unpack(args[2]);
  const at::Tensor weight_hh = THPVariable_Unpack(args[3]);
  const std::optional<at::Tensor> bias_ih = optional_tensor(args[4]);
  const std::optional<at::Tensor> bias_hh = optional_tensor(args[5]);
  const std::optional<at::Tensor> resets = optional_tensor(args[7]);
  const std::optional<at::Tensor> lengths = optional_tensor(args[8]);
  const bool relu = args[6] == Py_True;
  std::tuple<at::Tensor, at::Tensor> out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, relu, resets, lengths);
  }
  PyObject* y = THPVariable_Wrap(std::move(std::get<0>(out)));
  if (y == nullptr) return nullptr;
  PyObject* h_n = THPVariable_Wrap(std::move(std::get<1>(out)));
  if (h_n == nullptr) {
    Py_DECREF(y);
    return nullptr;
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) {
    Py_DECREF(y);
    Py_DECREF(h_n);
    return nullptr;
  }
  PyTuple_SET_ITEM(result, 0, y);  // steals the references
  PyTuple_SET_ITEM(result, 1, h_n);
  return result;
  END_HANDLE_TH_ERRORS
}

PyObject* set_rnn_layer_fallback(PyObject* /*module*/, PyObject* call) {
  if (!PyCallable_Check(call)) {
    PyErr_SetString(PyExc_TypeError, "set_rnn_layer_fallback: expected a callable");
    return nullptr;
  }
  PyObject* old = fallback;
  Py_INCREF(call);
  fallback = call;
  Py_XDECREF(old);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"rnn_layer", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&rnn_layer)),
     METH_FASTCALL | METH_KEYWORDS,
     "torch.ops.fused_bptt.rnn_layer(...), called through the dispatcher without the boxed "
     "argument parsing; other arguments go to the fallback"},
    {"set_rnn_layer_fallback", &set_rnn_layer_fallback, METH_O,
     "the call that takes arguments rnn_layer does not handle itself"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* eager_call_methods() {
  return methods;
}

}  // namespace fused_bptt

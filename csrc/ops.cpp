// ops.cpp: the schemas of the fused RNN ops (defined once, here, from the strings in fused_bptt.h)
// and the Python module stub that lets `import fused_bptt._C` load this library.
// Each backend (cpu/, cuda/) registers only its own dispatch key.
#include "fused_bptt.h"

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_bptt, m) {
  m.def(fused_bptt::kRnnForwardSchema);
  m.def(fused_bptt::kRnnBackwardSchema);
}

// `import fused_bptt._C` loads this shared library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

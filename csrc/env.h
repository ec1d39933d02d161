// env.h: the run-time switches read from environment variables (FUSED_BPTT_CPU_GEMM,
// FUSED_BPTT_CPU_ISA, FUSED_BPTT_CPU_INPUT, FUSED_BPTT_CPU_OVERLAP, FUSED_BPTT_CPU_HANDOFF,
// FUSED_BPTT_CPU_PRODUCTS, FUSED_BPTT_CPU_EARLY_DX, FUSED_BPTT_CUDA_PATH), parsed one way for every
// backend.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace fused_bptt {

// The position in `allowed` of the value of the environment variable `name`, read at every call
// (tests and benchmarks switch it at run time). Unset or empty reads as allowed[0], the default.
// Any other value is an error that names the variable and lists the allowed values.
inline int env_choice(const char* name, std::initializer_list<const char*> allowed) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  int index = 0;
  std::string list;
  for (const char* a : allowed) {
    if (std::strcmp(value, a) == 0) return index;
    list += (index++ == 0 ? "" : ", ") + std::string(a);
  }
  TORCH_CHECK(false, "fused_bptt: ", name, " must be one of ", list, " (unset means ",
              *allowed.begin(), "), but is '", value, "'");
}

}  // namespace fused_bptt

#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (torch with CUDA and nvcc installed, no network
# needed):
#   1. builds fused_bptt._C with the CUDA ops, in place, for this GPU's architecture
#      (TORCH_CUDA_ARCH_LIST overrides, e.g. TORCH_CUDA_ARCH_LIST=9.0);
#   2. runs the CUDA tests (tests/test_cuda.py: against the reference and against
#      torch.nn.RNN/cuDNN) and the emulated-kernel tests;
#   3. benchmarks forward and forward+backward against cuDNN (bench/bench_gpu.py), writing
#      bench/results/gpu_<device>.csv and .png. Extra arguments go to bench_gpu.py (e.g. --quick).
# Stops at the first failure: no benchmark of a build whose tests fail.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: torch.cuda.is_available() is False: this needs a CUDA GPU and a CUDA "
           "build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$(python -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST
echo "== build (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
# In place, so that tests and benchmark run from this checkout import the fresh _C; the same build
# as `pip install --no-build-isolation .` (setup.py), without needing pip or the network.
FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" python setup.py build_ext --inplace
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import sys
import fused_bptt
backends = fused_bptt.available_backends()
print("backends:", backends)
sys.exit(0 if "cuda" in backends else "the CUDA backend did not load")
PY

echo "== tests"
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q tests/test_cuda.py tests/test_cuda_emulated.py
else
  echo "pytest is not installed: tests skipped (install pytest to run tests/test_cuda.py)" >&2
  exit 1
fi

echo "== benchmark"
python bench/bench_gpu.py "$@"

#!/usr/bin/env bash
# Compatibility check: for each torch release, a throwaway venv with that torch, the package built
# the way the README builds it (pip install --no-build-isolation .) from a copy of this working
# tree, then the whole test suite against the installed package, as .ci/run runs it.
# Not part of .ci/run: the CUDA torch wheels are ~4.7 GB installed and the check takes minutes per
# version. Its summary lines go in README ("Backends and build flags"), and pyproject.toml's torch
# range covers only versions it passed.
#
#   bash tools/compat.sh                   # 2.13.0, 2.14.1 and the newest torch the index serves
#   bash tools/compat.sh 2.14.1 2.15.0     # these versions
#
# Where the torch is a CUDA build and a CUDA toolkit of its major version is found (CUDA_HOME if
# set, else what setup.py suggests: /usr/local/cuda-<major>.*, /usr/local/cuda), the CUDA ops are
# built too (FORCE_CUDA=1), so their compile against that torch is checked; they run only on a GPU
# (tests/test_cuda.py). pip constraint files are lifted for these venvs (PIP_CONSTRAINT = an empty
# file) so that a machine's cap does not hide the version asked for; setup.py's own range check is
# lifted too (FUSED_BPTT_UNVERIFIED_TORCH=1, --no-deps), since checking new versions is the point.
# KEEP=1 keeps the venvs (under $TMPDIR). Exits non-zero if any version failed.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fused_bptt_compat.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
: > "$WORK/no-constraints.txt"
export PIP_CONSTRAINT="$WORK/no-constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1

newest_torch() {
  "$PYTHON" -m pip index versions torch 2>/dev/null | sed -n 's/^torch (\(.*\))$/\1/p'
}

if [ $# -gt 0 ]; then
  VERSIONS=("$@")
else
  newest="$(newest_torch)"
  [ -n "$newest" ] || { echo "cannot ask the index for the newest torch: name the versions: bash tools/compat.sh 2.13.0 ..." >&2; exit 2; }
  VERSIONS=(2.13.0 2.14.1)
  [[ " ${VERSIONS[*]} " == *" $newest "* ]] || VERSIONS+=("$newest")
fi

commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] || commit="$commit+uncommitted changes"
echo "== fused_bptt compat check at $commit: torch ${VERSIONS[*]}"
echo "== $("$PYTHON" --version 2>&1), $(c++ --version 2>/dev/null | head -n1), nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || true), $(nproc) cores"

# The test command's packages (.ci/run, verbatim the README's), with torch==<version> for its pin.
TEST_DEPS="$(sed -n 's/.*pip install -q torch==[^ ]* \([^&]*\)&&.*/\1/p' "$ROOT/.ci/run" | head -n1)"
[ -n "$TEST_DEPS" ] || { echo "cannot read the test command's packages from .ci/run" >&2; exit 2; }

SUMMARY=()
FAILED=0

check_version() {
  local v="$1" dir="$WORK/torch-$v"
  local py="$dir/venv/bin/python" t0 t1 build_s install_s torch_ver cuda home force config imported tests rc
  mkdir -p "$dir/src"
  # The working tree as it stands: tracked and untracked-but-not-ignored files (no build outputs).
  (cd "$ROOT" && git ls-files -z -c -o --exclude-standard |
     tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -C "$dir/src" -xf -

  echo "== torch $v: installing into a fresh venv"
  t0=$(date +%s)
  "$PYTHON" -m venv "$dir/venv" &&
    "$py" -m pip install -q "torch==$v" $TEST_DEPS > "$dir/install.log" 2>&1
  rc=$?
  install_s=$(( $(date +%s) - t0 ))
  if [ $rc -ne 0 ]; then
    tail -n 20 "$dir/install.log"
    SUMMARY+=("torch $v: FAIL (pip install torch==$v failed, $install_s s)"); FAILED=1; return
  fi
  read -r torch_ver cuda < <("$py" -c 'import torch; print(torch.__version__, torch.version.cuda or "-")')

  # FORCE_CUDA=1 where the CUDA ops can be built; otherwise setup.py's default, which says why not.
  force="" home="${CUDA_HOME:-}"
  if [ "$cuda" != "-" ]; then
    [ -n "$home" ] || home="$(cd "$dir/src" && "$py" -c \
      "import runpy; print(runpy.run_path('setup.py', run_name='compat')['suggest_cuda_home']('$cuda') or '')")"
    [ -n "$home" ] && force=1
  fi
  echo "== torch $torch_ver (CUDA $cuda): building (${force:+FORCE_CUDA=1, }CUDA_HOME=${home:-unset})"
  t1=$(date +%s)
  (cd "$dir/src" && env ${home:+CUDA_HOME="$home"} ${force:+FORCE_CUDA=1} FUSED_BPTT_UNVERIFIED_TORCH=1 \
     "$py" -m pip install -v --no-build-isolation --no-deps . > "$dir/build.log" 2>&1)
  rc=$?
  build_s=$(( $(date +%s) - t1 ))
  # setup.py runs twice under pip (metadata, then the build): its CUDA line once.
  config="$(grep -E '^ *CUDA ops *:' "$dir/build.log" | sed 's/^ *//; s/  */ /g' | head -n1)"
  if [ $rc -ne 0 ]; then
    grep -E 'error|fused_bptt:' "$dir/build.log" | head -n 20
    SUMMARY+=("torch $torch_ver: FAIL (build failed after $build_s s; $config)"); FAILED=1; return
  fi

  # From outside the source tree, so that the installed package is what is imported.
  imported="$(cd "$dir" && "$py" -c '
from fused_bptt import _ops, available_backends
kernels = "+".join(k for k in ("CPU", "CUDA") if _ops.has_kernel(k)) or "none"
backends = "/".join(available_backends())
print(f"loaded, kernels {kernels}, backends {backends}" if _ops.loaded() else f"NOT LOADED: {_ops.LOAD_ERROR}")' 2>&1 | tail -n1)"

  echo "== torch $torch_ver: running the test suite"
  (cd "$dir/src" && env ${home:+CUDA_HOME="$home"} PATH="$dir/venv/bin:$PATH" \
     "$dir/venv/bin/pytest" -q -p no:cacheprovider > "$dir/tests.log" 2>&1)
  rc=$?
  tests="$(tail -n1 "$dir/tests.log" | sed 's/^=* *//; s/ *=*$//')"
  # A CUDA build (FORCE_CUDA=1) must also have registered its CUDA kernels.
  if [ $rc -ne 0 ] || [[ "$imported" != loaded* ]] || { [ -n "$force" ] && [[ "$imported" != *"+CUDA"* ]]; }; then
    grep -E '^(FAILED|ERROR)' "$dir/tests.log" | head -n 20
    FAILED=1; tests="FAIL: $tests"
  fi
  SUMMARY+=("torch $torch_ver (CUDA $cuda): install $install_s s, build $build_s s ($config), import: $imported, tests: $tests")
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
}

for v in "${VERSIONS[@]}"; do check_version "$v"; done

echo "== summary ($commit)"
printf '%s\n' "${SUMMARY[@]}"
[ $FAILED -eq 0 ] && echo "== all passed" || echo "== FAILED"
exit $FAILED

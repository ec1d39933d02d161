"""Build fused_bptt._C: the C++ CPU ops always, the CUDA ops when they can be built.

The extension uses torch's C++ ABI, which changes between torch releases, so it must be compiled
against the very torch it will be imported with: build with `pip install --no-build-isolation .`.
Before compiling anything, setup.py stops with one line saying what to do when
- torch cannot be imported (pip's default isolated build hides the installed one; torch is not in
  [build-system] requires on purpose, so that an isolated build fails in seconds instead of first
  downloading gigabytes of a torch the user does not run), or the torch found lives in a temporary
  build environment;
- torch is outside the range pyproject.toml declares (the versions tools/compat.sh verified): pip
  would otherwise replace the user's torch after the build, leaving an extension that cannot load.
  FUSED_BPTT_UNVERIFIED_TORCH=1 builds anyway (install with --no-deps to keep your torch).

CUDA sources (csrc/cuda/*.cu) are compiled when torch is a CUDA build AND the CUDA toolkit torch
uses (CUDA_HOME, else its guess from nvcc on PATH) has bin/nvcc, lib64/libcudart.so and the major
version torch was built with; otherwise the build is CPU-only and the configuration print-out says
why and which variable to set. FORCE_CUDA=1 makes any of that an error, FORCE_CUDA=0 skips CUDA.
Whether a GPU is present at build time is never consulted. A compile error fails the install.
setup.py reads the environment and never writes to it.
"""

import glob
import importlib
import os
import re
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# One standard for g++ and nvcc: torch 2.14's headers need C++20 (std::strong_ordering,
# string_view::starts_with, requires), and torch 2.13 compiles its own extensions with it too.
CXX_STANDARD = "-std=c++20"
# Compiled when TORCH_CUDA_ARCH_LIST is not set (torch's own default needs a visible GPU).
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")
BUILD_FIX = "build with: pip install --no-build-isolation ."
# Where build frontends put the temporary environment they install build requirements into:
# pip (pip-build-env-*), pypa/build (build-env-*), uv (builds-v0/).
BUILD_ENV_PATH = re.compile(r"(^|[/\\])(pip-build-env-|build-env-|builds-v0[/\\])")


class BuildStop(SystemExit):
    """Stops setup.py before anything is compiled, with one line that says what to do."""

    def __init__(self, message):
        super().__init__(f"fused_bptt: {message}")


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def import_build_torch(import_module=importlib.import_module):
    """The torch to build against; BuildStop where it is not the torch the user will run."""
    try:
        torch = import_module("torch")
    except ImportError as error:
        raise BuildStop(
            f"cannot import torch here ({error}): pip's default isolated build does not "
            f"see your installed torch. Install torch, then {BUILD_FIX}"
        ) from None
    location = os.path.dirname(os.path.abspath(torch.__file__))
    if BUILD_ENV_PATH.search(location):
        raise BuildStop(
            f"torch {torch.__version__} at {location} is a temporary build "
            f"environment's, not the one fused_bptt will run with: {BUILD_FIX}"
        )
    return torch


PYPROJECT = os.path.join(ROOT, "pyproject.toml")


def torch_requirement(pyproject=PYPROJECT):
    """The torch range of pyproject.toml's [project] dependencies, e.g. ">=2.13.0,<=2.15.0"."""
    with open(pyproject, encoding="utf-8") as f:
        found = re.search(r'^dependencies\s*=\s*\[\s*"torch\s*([^";]+)"', f.read(), re.M)
    if found is None:
        raise BuildStop(f"no torch requirement in the dependencies of {pyproject}")
    return found.group(1).replace(" ", "")


def release(version):
    """(major, minor, patch) of a torch version string: '2.14.1+cu130' -> (2, 14, 1)."""
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if found is None:
        raise BuildStop(f"cannot read the torch version {version!r}")
    return tuple(int(p or 0) for p in found.groups())


def in_range(version, requirement):
    """Whether `version` satisfies `requirement` (comma-separated >=, <=, >, <, == clauses). The
    local part (+cu130) is ignored, as pip does for these comparisons."""
    compare = {
        ">=": tuple.__ge__,
        "<=": tuple.__le__,
        ">": tuple.__gt__,
        "<": tuple.__lt__,
        "==": tuple.__eq__,
    }
    have = release(version)
    for clause in requirement.split(","):
        op, bound = re.match(r"(>=|<=|==|>|<)(.+)", clause).groups()
        if not compare[op](have, release(bound)):
            return False
    return True


def check_torch_version(version, requirement, environ):
    if in_range(version, requirement) or environ.get("FUSED_BPTT_UNVERIFIED_TORCH") == "1":
        return
    raise BuildStop(
        f"torch {version} is outside the verified range torch{requirement} "
        f"(pyproject.toml, checked by tools/compat.sh): install a torch in that range, or "
        f"build anyway with FUSED_BPTT_UNVERIFIED_TORCH=1 pip install --no-build-isolation "
        f"--no-deps ."
    )


def toolkit_version(nvcc):
    """'13.0' from `nvcc --version`, or None where it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def toolkit_problem(home, torch_cuda):
    """None if the CUDA toolkit at `home` can build for a torch built with CUDA `torch_cuda`
    (e.g. '13.0'), else what is wrong with it."""
    if not home:
        return "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME not set)"
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"{nvcc} does not exist"
    # torch links -lcudart from lib64/ (lib/ on toolkits that have no lib64/).
    cudart = [os.path.join(home, d, "libcudart.so") for d in ("lib64", "lib")]
    if not any(os.path.exists(c) for c in cudart):
        return f"{cudart[0]} does not exist"
    version = toolkit_version(nvcc)
    if version is None:
        return f"cannot read the CUDA version from {nvcc} --version"
    if version.split(".")[0] != torch_cuda.split(".")[0]:
        return f"the toolkit is CUDA {version} but torch was built with CUDA {torch_cuda}"
    return None


def suggest_cuda_home(torch_cuda, candidates=None):
    """A toolkit that would do, for the message: /usr/local/cuda-<major>.*, then /usr/local/cuda."""
    if candidates is None:
        major = torch_cuda.split(".")[0]
        candidates = sorted(glob.glob(f"/usr/local/cuda-{major}.*"), reverse=True) + [
            "/usr/local/cuda"
        ]
    return next((c for c in candidates if toolkit_problem(c, torch_cuda) is None), None)


def want_cuda(environ, torch_cuda, cuda_home, torch_version):
    """(build the CUDA ops?, why): BuildStop where FORCE_CUDA=1 and they cannot be built.
    `cuda_home` is the toolkit torch will compile and link with (cpp_extension.CUDA_HOME)."""
    force = environ.get("FORCE_CUDA", "")
    if force not in ("", "0", "1"):
        raise BuildStop(f"FORCE_CUDA must be 0 or 1, got {force!r}")
    if force == "0":
        return False, "FORCE_CUDA=0"
    if torch_cuda is None:
        problem = f"torch {torch_version} is a CPU-only build"
    else:
        problem = toolkit_problem(cuda_home, torch_cuda)
        if problem is not None:
            origin = next(
                (f"{v}={environ[v]}" for v in ("CUDA_HOME", "CUDA_PATH") if environ.get(v)),
                f"CUDA_HOME not set, torch guessed {cuda_home}",
            )
            better = suggest_cuda_home(torch_cuda)
            problem = (
                f"{problem} ({origin}); set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x "
                f"toolkit" + (f", e.g. CUDA_HOME={better}" if better else "")
            )
    if problem is None:
        return True, (
            f"CUDA {toolkit_version(os.path.join(cuda_home, 'bin', 'nvcc'))} at "
            f"{cuda_home}, torch built with CUDA {torch_cuda}"
        )
    if force == "1":
        raise BuildStop(f"FORCE_CUDA=1 but {problem}")
    return False, problem


def cuda_arch_flags(environ):
    """(nvcc flags, description). A TORCH_CUDA_ARCH_LIST the user set is left to torch, which reads
    it; otherwise the defaults are passed as -gencode flags (torch then adds none of its own)."""
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return [], f"TORCH_CUDA_ARCH_LIST={environ['TORCH_CUDA_ARCH_LIST']}"
    flags = [
        f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}"
        for a in DEFAULT_CUDA_ARCHS
    ]
    return flags, f"{';'.join(DEFAULT_CUDA_ARCHS)} (default; set TORCH_CUDA_ARCH_LIST to change)"


def build_info_define(torch_version):
    """-D flag for csrc/build_info.cpp: the torch version, as character codes (a quoted string
    does not survive the shell that ninja runs the compiler through)."""
    text = f"fused_bptt built against torch {torch_version}"
    return "-DFUSED_BPTT_BUILD_INFO_CHARS=" + ",".join(str(ord(c)) for c in text)


def openmp_flags(platform=sys.platform):
    """(compile, link) flags for OpenMP, which ATen's inline at::parallel_for needs in our own
    translation units to use threads: GCC on Linux, MSVC on Windows; Apple's clang has no
    -fopenmp, so there the CPU loops run on one thread (said in the configuration print-out)."""
    if platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    if platform == "win32":
        return ["/openmp"], []
    return [], []


def extension(environ=os.environ):
    torch = import_build_torch()
    check_torch_version(torch.__version__, torch_requirement(), environ)
    from torch.utils import cpp_extension

    opt = ["-O0", "-g"] if environ.get("FUSED_BPTT_DEBUG") == "1" else ["-O3"]
    omp_compile, omp_link = openmp_flags()
    cxx = [CXX_STANDARD, *opt, *omp_compile, "-Wall", "-Wextra", "-Wno-unused-parameter"]
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")  # csrc/build_info.cpp among them
    with_cuda, why = want_cuda(
        environ, torch.version.cuda, cpp_extension.CUDA_HOME, torch.__version__
    )
    kwargs = dict(
        extra_compile_args={"cxx": [*cxx, build_info_define(torch.__version__)]},
        extra_link_args=omp_link,
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
        arch_flags, archs = cuda_arch_flags(environ)
        kwargs["extra_compile_args"]["nvcc"] = [
            *opt,
            CXX_STANDARD,
            "--expt-relaxed-constexpr",
            *arch_flags,
        ]
        why += f", archs {archs}"
        ext = cpp_extension.CUDAExtension("fused_bptt._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("fused_bptt._C", sources, **kwargs)
    print("fused_bptt build configuration:")
    print(f"  torch   : {torch.__version__} at {os.path.dirname(torch.__file__)}")
    print(f"  CPU ops : yes ({len(rel('csrc/cpu/*.cpp'))} source file(s))")
    print(f"  CUDA ops: {'yes' if with_cuda else 'no'} ({why})")
    print(f"  OpenMP  : {'yes' if omp_compile else 'no (the CPU loops run on one thread)'}")
    print(f"  flags   : {' '.join(cxx)}")
    return ext


# setuptools runs this file as __main__ (pip, python -m build, python setup.py); tests import it.
if __name__ == "__main__":
    ext_module = extension()  # first: it stops with a one-line fix where torch is not usable
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[ext_module],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )

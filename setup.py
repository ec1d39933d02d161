"""Build fused_bptt._C: the C++ CPU ops always, the CUDA ops when they can be built.

CUDA sources (csrc/cuda/*.cu) are compiled when nvcc is found AND torch is a CUDA build, or when
FORCE_CUDA=1. Whether a GPU is present at build time is never consulted: a build box without one
must still produce the CUDA ops. FORCE_CUDA=0 turns them off. A compile error fails the install.
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force != "":
        return force == "1", f"FORCE_CUDA={force}"
    import torch

    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME or FORCE_CUDA=1)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    return True, f"nvcc at {cpp_extension.CUDA_HOME}, torch built with CUDA {torch.version.cuda}"


def extension():
    debug = os.environ.get("FUSED_BPTT_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = ["-std=c++17", *opt, "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    with_cuda, why = want_cuda()
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        kwargs["extra_compile_args"]["nvcc"] = [*opt, "-std=c++17", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension("fused_bptt._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("fused_bptt._C", sources, **kwargs)
    print("fused_bptt build configuration:")
    print(f"  CPU ops : yes ({len(rel('csrc/cpu/*.cpp'))} source file(s))")
    print(f"  CUDA ops: {'yes' if with_cuda else 'no'} ({why})"
          + (f", archs {os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""))
    print(f"  flags   : {' '.join(cxx)}")
    return ext


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)

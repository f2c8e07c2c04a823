"""Builds pyrebasin and its native extension pyrebasin._C (CPU kernels always, CUDA when possible).

CUDA joins only when the installed torch was built with CUDA *and* a toolkit is found (CUDA_HOME):
the CPU wheel cannot compile .cu sources through cpp_extension. PYREBASIN_NO_NATIVE=1 skips the
extension entirely (pure-Python package, "reference" backend).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    if os.environ.get("PYREBASIN_NO_NATIVE", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None
    extra = {"cxx": ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]}  # bit-exact RNG (philox.h)
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo"]
        extra["cxx"].append("-DPYREBASIN_WITH_CUDA")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "7.0;8.0;9.0"
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        "pyrebasin._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Build of imer_fast: the Python package, the Triton kernels (``kernels/`` installed as
``imer_fast._kernels``) and the ``imer_fast._C`` extension.

``_C`` holds the C++ CPU kernels (OpenMP) and, where a CUDA build of torch and nvcc are present,
the CUDA C++ sources in ``csrc/cuda``. ``FORCE_CUDA=1`` insists on the CUDA sources (and fails if
they cannot be built); ``IMER_FAST_NO_CUDA=1`` skips them.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted(torch_module):
    if os.environ.get("IMER_FAST_NO_CUDA") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    has_cuda_torch = torch_module.version.cuda is not None
    if os.environ.get("FORCE_CUDA") == "1":
        if not has_cuda_torch or CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but torch has no CUDA build or nvcc was not found")
        return True
    return has_cuda_torch and CUDA_HOME is not None


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "imer_fast builds against an installed torch. Install torch first "
            "(CPU machines: `pip install torch==2.13.0`), then `pip install --no-build-isolation .`"
        )
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    libs = ["gomp"] if sys.platform.startswith("linux") else []
    if _cuda_wanted(torch):
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        ext = CUDAExtension(
            "imer_fast._C", sources, extra_compile_args={"cxx": cxx + ["-DIMER_FAST_WITH_CUDA"], "nvcc": ["-O3"]},
            libraries=libs,
        )
    else:
        ext = CppExtension("imer_fast._C", sources, extra_compile_args={"cxx": cxx}, libraries=libs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["imer_fast", "imer_fast.*"]) + ["imer_fast._kernels"],
    package_dir={"imer_fast._kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

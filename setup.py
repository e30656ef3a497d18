"""Builds the optional C++/CUDA packing extension tic_kernels._C; everything else lives in
pyproject.toml. Install with ``pip install --no-build-isolation -e .`` (the build needs the
torch it will run with).

- CUDA extension (csrc/*.cpp + csrc/*.cu) when torch has CUDA and nvcc is found (CUDA_HOME);
- C++ (CPU) extension otherwise;
- nothing when TIC_KERNELS_BUILD_EXT=0 or torch is missing: the package then packs with its
  pure-PyTorch fallback.
"""
import os

from setuptools import setup


def extensions():
    if os.environ.get("TIC_KERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    sources = ["csrc/packing.cpp"] + (["csrc/packing_cuda.cu"] if use_cuda else [])
    if use_cuda:
        ext = CUDAExtension("tic_kernels._C", sources,
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        ext = CppExtension("tic_kernels._C", sources, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

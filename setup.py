"""Build script. Metadata lives in pyproject.toml; this file builds the C++/CUDA extension
`itm_engine._C` from csrc/ (the fused ops, registered as torch.ops.itm_engine.*).

It imports torch, so install with `pip install --no-build-isolation` (the Makefile does).

Environment:
    ITM_BUILD_EXT=0        skip the extension (the package then uses its Triton/PyTorch kernels)
    ITM_BUILD_CUDA=0|1     force the CUDA part off/on; default: on when torch is a CUDA build and
                           a CUDA toolkit (nvcc) is found
    TORCH_CUDA_ARCH_LIST   GPU architectures to compile for; default "8.0;8.6;9.0+PTX" (PTX: runs on newer GPUs too)
    MAX_JOBS               parallel compile jobs (ninja); default: all cores
"""
from __future__ import annotations

import os
import shutil

from setuptools import setup


def _find_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else /usr/local/cuda, else the parent of `nvcc`'s bin folder: the first
    that has bin/nvcc and include/cuda_runtime.h. (torch guesses from the `nvcc` on PATH alone,
    which is wrong when that is a wrapper script, as /usr/local/bin/nvcc is on our machines.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _want_cuda(torch, cpp_extension) -> bool:
    home = cpp_extension.CUDA_HOME
    toolkit = home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))
    available = torch.version.cuda is not None and toolkit
    choice = os.environ.get("ITM_BUILD_CUDA", "auto")
    if choice == "auto":
        return available
    if choice not in ("0", "1"):
        raise ValueError(f"ITM_BUILD_CUDA must be 0, 1 or unset, got {choice!r}")
    if choice == "1" and not available:
        raise RuntimeError(
            f"ITM_BUILD_CUDA=1 but no CUDA build is possible (torch CUDA version: {torch.version.cuda}, "
            f"CUDA toolkit: {home})"
        )
    return choice == "1"


def extension_args() -> dict:
    if os.environ.get("ITM_BUILD_EXT", "1") == "0":
        return {}
    cuda_home = _find_cuda_home()
    if cuda_home:  # read by torch.utils.cpp_extension when it is first imported
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:
        raise RuntimeError(
            "building itm_engine's C++/CUDA extension needs torch in the build environment: install torch "
            "first and then this package with `pip install --no-build-isolation` (or set ITM_BUILD_EXT=0)"
        ) from err

    # -ffp-contract=off: no fused multiply-adds, so float32 results round as the reference's do.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    sources = ["csrc/ops.cpp"]
    if _want_cuda(torch, cpp_extension):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0+PTX")
        extension = cpp_extension.CUDAExtension(
            "itm_engine._C",
            sources + ["csrc/ops_cuda.cpp", "csrc/kernels.cu"],
            define_macros=[("ITM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "itm_engine._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**extension_args())

"""The csrc/ C++/CUDA extension backend (`itm_engine._C`, ops in `torch.ops.itm_engine`).

`load()` imports the compiled module once; when it is missing (not built) it says so once with a
warning and the dispatcher uses the other backends.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch


@functools.lru_cache(maxsize=1)
def load() -> bool:
    """Import `itm_engine._C` (registering its ops); False, with one warning, when it is absent."""
    try:
        importlib.import_module("itm_engine._C")
    except ImportError as err:
        warnings.warn(
            f"itm_engine's C++/CUDA extension is not available ({err}); using the Triton and PyTorch "
            "kernel backends. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def supports(device: torch.device) -> bool:
    """CPU always (once built); CUDA when the extension was compiled with CUDA kernels."""
    if not load():
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and bool(torch.ops.itm_engine.has_cuda())

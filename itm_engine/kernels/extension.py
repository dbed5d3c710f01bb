"""The csrc/ C++/CUDA extension backend (`itm_engine._C`, ops in `torch.ops.itm_engine`).

`load()` imports the compiled module once; when it is missing (not built) it says so once with a
warning and the dispatcher uses the other backends. The wrappers below have the signatures and
return conventions of `reference.py`, so the dispatcher calls either the same way; they convert
index tensors to int64 on the inputs' device, allocate outputs, and leave the checks of shapes,
dtypes, devices, index ranges and coefficients to the C++ ops (which raise RuntimeError).
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

from itm_engine.kernels.reference import check_topk_args


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


def _ops():
    if not load():
        raise RuntimeError("itm_engine's C++/CUDA extension is not built; see the warning above")
    return torch.ops.itm_engine


def _long(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(index, dtype=torch.long, device=device)


def noisy_latents(
    latents: torch.Tensor,
    noise: torch.Tensor,
    img_idx: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t [B, C, H, W] written into `out` (allocated in the latents' dtype when None); see
    `reference.noisy_latents`."""
    device = latents.device
    img_idx = _long(img_idx, device)
    if out is None:
        out = torch.empty((img_idx.shape[0], *latents.shape[1:]), dtype=latents.dtype, device=device)
    return _ops().noisy_latents(latents, noise, img_idx, _long(sample_idx, device), coefficients, out)


def item_error(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    coefficients: torch.Tensor,
    latents: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item MSE against c z0 + d eps, float32 [B]; see `reference.item_error` (without latents
    the CPU op raises on a c != 0, the CUDA kernel asserts c == 0)."""
    device = pred.device
    img_idx = None if latents is None or img_idx is None else _long(img_idx, device)
    return _ops().item_error(pred, noise, _long(sample_idx, device), coefficients, latents, img_idx)


def topk_similarity(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [Q, k], indices int64 [Q, k]), best first, lower index first among ties; see
    `reference.topk_similarity`."""
    check_topk_args(queries, gallery, k)
    values, indices = _ops().topk_similarity(queries, gallery, k, chunk_size)
    return values, indices

"""The csrc/ C++/CUDA extension backend (`itm_engine._C`, ops in `torch.ops.itm_engine`).

`load()` imports the compiled module once; when it is missing (not built) it says so once with a
warning and the dispatcher uses the other backends. The wrappers below have the signatures and
return conventions of `reference.py`, so the dispatcher calls either the same way; they convert
index tensors to int64 and `alphas_cumprod` to float32 on the inputs' device, allocate outputs,
and leave the checks of shapes, dtypes and index ranges to the C++ ops (which raise RuntimeError).
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


def _float(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=device)


def noisy_latents(
    latents: torch.Tensor,
    noise: torch.Tensor,
    img_idx: torch.Tensor,
    sample_idx: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t [B, C, H, W] written into `out` (allocated in the latents' dtype when None); see
    `reference.noisy_latents`."""
    device = latents.device
    img_idx = _long(img_idx, device)
    if out is None:
        out = torch.empty((img_idx.shape[0], *latents.shape[1:]), dtype=latents.dtype, device=device)
    sample_idx, timesteps = _long(sample_idx, device), _long(timesteps, device)
    return _ops().noisy_latents(latents, noise, img_idx, sample_idx, timesteps, _float(alphas_cumprod, device), out)


def item_error(
    pred: torch.Tensor,
    noise: torch.Tensor,
    sample_idx: torch.Tensor,
    latents: torch.Tensor | None = None,
    img_idx: torch.Tensor | None = None,
    target: str = "epsilon",
    timesteps: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item MSE against eps or v, float32 [B]; see `reference.item_error`."""
    device = pred.device
    if target == "epsilon":
        latents = img_idx = timesteps = alphas_cumprod = None
    elif target == "v":
        if latents is None or img_idx is None or timesteps is None or alphas_cumprod is None:
            raise ValueError("target='v' needs latents, img_idx, timesteps and alphas_cumprod")
        img_idx, timesteps = _long(img_idx, device), _long(timesteps, device)
        alphas_cumprod = _float(alphas_cumprod, device)
    else:
        raise ValueError(f"target must be 'epsilon' or 'v', got {target!r}")
    return _ops().item_error(
        pred, noise, _long(sample_idx, device), latents, img_idx, timesteps, alphas_cumprod, target == "v"
    )


def topk_similarity(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [Q, k], indices int64 [Q, k]), best first, lower index first among ties; see
    `reference.topk_similarity`."""
    check_topk_args(queries, gallery, k)
    values, indices = _ops().topk_similarity(queries, gallery, k, chunk_size)
    return values, indices
